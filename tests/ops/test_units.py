"""Pure parts of the operations tools, and the recorder and exporter against a real Redis."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from typer.testing import CliRunner

from passbridge import metrics
from passbridge.cli import app
from passbridge.event import EventKind, PassEvent, Platform
from passbridge.keys import ACCOUNTS_INDEX, ACTIVE_ACCOUNTS, REMOVED_ACCOUNTS, account_keys
from passbridge.metrics import BUCKET_S, BUCKETS_PER_HOUR, Recorder, report_field, sample
from passbridge.queue import enqueue
from passbridge.redis_server import free_port
from producer.dashboard import auth
from producer.dashboard.charts import Line, line_chart, polyline_segments, recent
from worker import exporter, inspect
from worker.inspect import AccountInfo, effective_state, parse_when
from worker.pause import Pause
from worker.report import ReportRow, ratio, summarize

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


# --- pure --------------------------------------------------------------------------------------------------


def test_report_rates_by_dimension() -> None:
    rows = [
        ReportRow("created", "apple", "loyalty", 10),
        ReportRow("installed", "apple", "loyalty", 6),
        ReportRow("uninstalled", "apple", "loyalty", 2),
        ReportRow("created", "google", "loyalty", 4),
        ReportRow("installed", "google", "coupon", 3),
    ]
    report = summarize(rows)
    assert report.total.counts["created"] == 14
    assert report.total.save_rate == round(9 / 14, 4)
    assert report.total.install_uninstall_ratio == 4.5
    assert report.by_platform["google"].save_rate == 0.75
    assert report.by_platform["google"].install_uninstall_ratio is None
    assert report.by_pass_type["coupon"].save_rate is None  # installs without a create: undefined
    assert report.by_platform_and_pass_type[("apple", "loyalty")].counts["uninstalled"] == 2
    doc = report.to_doc()
    assert [(r["platform"], r["pass_type"]) for r in doc["by_platform_and_pass_type"]] == [
        ("apple", "loyalty"),
        ("google", "coupon"),
        ("google", "loyalty"),
    ]
    assert summarize([]).total.to_doc()["save_rate"] is None
    assert ratio(1, 3) == 0.3333


def test_parse_when() -> None:
    assert parse_when("2h", now=NOW) == int(datetime(2026, 11, 25, 10, 0, tzinfo=UTC).timestamp() * 1000)
    assert parse_when("1w", now=NOW) == int(datetime(2026, 11, 18, 12, 0, tzinfo=UTC).timestamp() * 1000)
    assert parse_when("now", now=NOW) == int(NOW.timestamp() * 1000)
    assert parse_when("2026-11-25T10:00:00Z") == parse_when("2026-11-25T10:00:00")
    assert parse_when("2026-11-25T11:00:00+01:00") == parse_when("2026-11-25T10:00Z")
    for bad in ("yesterday", "2h ago", "", "m"):
        with pytest.raises(ValueError, match="neither ISO 8601"):
            parse_when(bad, now=NOW)
    for huge in (
        "infd",
        "1e309s",
        "99999999999999999999d",
        "-1e20w",
        "0001-01-01T00:00:00+01:00",
        "1969-12-31",
    ):
        with pytest.raises(ValueError, match="out of range"):
            parse_when(huge, now=NOW)
    assert parse_when("9999-12-31T23:59:59Z") < inspect.MAX_WHEN_MS


def test_an_out_of_range_time_is_a_one_line_cli_error() -> None:
    result = CliRunner().invoke(app, ["report", "acme", "--since", "infd"])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert "'infd' is out of range" in result.output
    assert "Traceback" not in result.output


def test_effective_state() -> None:
    connected = AccountInfo("a", registry_state="connected")
    auth_pause = Pause("a", 1, "auth", "HTTP 401")
    assert effective_state(connected, None) == "connected"
    assert effective_state(connected, auth_pause) == "paused"
    assert effective_state(AccountInfo("a", registry_state="disconnected"), auth_pause) == "disconnected"
    assert effective_state(AccountInfo("a"), None) == "unknown"
    assert effective_state(AccountInfo("a"), auth_pause) == "paused"


def test_chart_geometry_gaps_and_escaping() -> None:
    segments = polyline_segments([0, 10, None, 5, None], width=100, height=22, top=10)
    assert segments == ["0.0,21.0 25.0,1.0", "65.0,11.0 85.0,11.0"]  # a lone point becomes a short stroke
    assert polyline_segments([], 100, 20, 1) == []
    svg = str(line_chart('<b>"x"</b>', [Line("in<", [1, 2], "line-in")], width=50, height=10, unit="/s"))
    assert "<b>" not in svg
    assert "&lt;b&gt;" in svg
    assert "in&lt; 2/s" in svg
    assert svg.count("<polyline") == 1
    trimmed = recent({"a": [None, 0, None, 3, 4], "b": [0, 0, 0, 0, 1]}, min_points=2)
    assert trimmed == {"a": [3, 4], "b": [0, 1]}
    assert recent({"a": [0, 0, 0]}, min_points=2) == {"a": [0, 0]}


def test_session_and_csrf_values_depend_on_the_token() -> None:
    assert auth.session_value("t1") != auth.session_value("t2")
    assert auth.session_value("t1") != auth.csrf_value("t1")
    assert "t1" not in auth.session_value("t1")
    assert auth.token_ok(" t1 ", "t1")
    assert not auth.token_ok("t", "t1")


def test_alert_rules_are_valid_and_reference_exposed_metrics() -> None:
    doc = yaml.safe_load((ROOT / "docs" / "alerts.yml").read_text())
    assert isinstance(doc, dict)
    assert set(doc) == {"groups"}
    exposed = _exposed_names()
    names = []
    for group in doc["groups"]:
        assert set(group) == {"name", "rules"}
        assert group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            names.append(rule["alert"])
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"])
            expr = rule["expr"]
            assert isinstance(expr, str)
            assert expr.strip()
            assert expr.count("(") == expr.count(")"), rule["alert"]
            assert expr.count("{") == expr.count("}"), rule["alert"]
            if "for" in rule:
                assert re.fullmatch(r"\d+[smhd]", rule["for"]), rule["alert"]
            assert rule["labels"]["severity"] in {"page", "ticket"}
            assert rule["annotations"]["summary"]
            assert rule["annotations"]["description"]
            for metric in re.findall(r"passbridge_[a-z0-9_]+", expr):
                assert metric in exposed, f"{rule['alert']} uses {metric}, which /metrics does not expose"
    assert len(names) == len(set(names))
    # What operators asked for: backlog age, DLQ growth, account paused.
    assert {"PassbridgeBacklogOld", "PassbridgeDLQGrowing", "PassbridgeAccountPaused"} <= set(names)


def _rule(alert: str) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "docs" / "alerts.yml").read_text())
    [rule] = [r for g in doc["groups"] for r in g["rules"] if r["alert"] == alert]
    assert isinstance(rule, dict)
    return rule


def test_backlog_rules_leave_paused_accounts_to_the_pause_alert() -> None:
    """A paused account's backlog ages and grows by design: only PassbridgeAccountPaused pages for it."""
    paused = "max by (account) (passbridge_account_paused) == 1"
    assert " ".join(_rule("PassbridgeAccountPaused")["expr"].split()) == paused
    for alert in ("PassbridgeBacklogOld", "PassbridgeBacklogGrowing"):
        expr = " ".join(_rule(alert)["expr"].split())
        # unless binds looser than the comparisons and and: it drops the paused accounts from the whole rule
        assert expr.endswith(f" unless on (account) ({paused})"), alert


def test_klaviyo_error_rule_counts_requests_that_got_no_answer() -> None:
    """Timeouts and network errors are Klaviyo failures as much as 5xx; 429s and other 4xx are not."""
    expr = _rule("PassbridgeKlaviyoErrors")["expr"]
    [errors] = re.findall(r'passbridge_klaviyo_requests_total\{status=~"([^"]+)"\}', expr)
    for status in ("500", "503", "timeout", "network"):  # PromQL regexes match the whole value
        assert re.fullmatch(errors, status), status
    for status in ("200", "202", "400", "401", "429"):
        assert not re.fullmatch(errors, status), status


def _exposed_names() -> set[str]:
    """Sample names /metrics can expose: the process's metrics (children of counters and histograms) and the
    scrape-time gauges."""
    names = set()
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        names.add(family.name)
    for metric in (
        metrics.INGESTED,
        metrics.DUPLICATES,
        metrics.REJECTED,
        metrics.DELIVERED,
        metrics.DEAD_LETTERED,
        metrics.RETRIES,
        metrics.KLAVIYO_REQUESTS,
        metrics.KLAVIYO_THROTTLED,
        metrics.LATENCY,
        metrics.TAKEOVERS,
    ):
        for family in metric.collect():
            names.add(family.name)
            names.update(f"{family.name}{suffix}" for suffix in ("_total", "_bucket", "_count", "_sum"))
    names.update(
        {
            "passbridge_queue_depth",
            "passbridge_serials",
            "passbridge_oldest_event_age_seconds",
            "passbridge_dlq_size",
            "passbridge_account_paused",
            "passbridge_account_state",
            "passbridge_workers_alive",
            "passbridge_worker_heartbeat_age_seconds",
            "passbridge_worker_held_serials",
            "passbridge_redis_up",
        }
    )
    return names


# --- against Redis -----------------------------------------------------------------------------------------


def _event(n: int, serial: str = "S1") -> PassEvent:
    return PassEvent.model_validate(
        {
            "event_id": f"e{n}",
            "account_id": "acme",
            "kind": "created",
            "serial_number": serial,
            "pass_type": "loyalty",
            "platform": "apple",
            "occurred_at": NOW,
            "received_at": NOW,
            "source": "api",
            "pass_url": f"https://passninja.com/p/{serial}",
        }
    )


def test_events_ingested_tallies_the_report_like_tally_per_event() -> None:
    """The hook counts by hour in one go (tally_hours); the report gets what tally() per event gives."""
    kinds = [EventKind.created, EventKind.installed, EventKind.updated]
    evs = [
        _event(i).model_copy(
            update={
                "occurred_at": datetime(2026, 11, 24 + i % 3, i % 24, 59, tzinfo=UTC)
                if i % 4
                else datetime(2026, 11, 25, 23, 30, tzinfo=timezone(timedelta(hours=-5))),  # next UTC day
                "kind": kinds[i % 3],
                "platform": Platform.google if i % 5 == 0 else Platform.apple,
            }
        )
        for i in range(60)
    ]
    accepted = [i % 7 != 3 for i in range(60)]
    metrics.RECORDER.take()
    metrics.events_ingested("acme", evs, accepted)
    _, report = metrics.RECORDER.take()
    ref = Recorder()
    for ev, new in zip(evs, accepted, strict=True):
        if new:
            ref.tally("acme", ev.occurred_at, ev.kind.value, ev.platform.value, ev.pass_type)
    assert report == ref.take()[1]
    assert ("acme", "20261126", report_field(4, "created", "apple", "loyalty")) in report


async def test_recorder_flushes_into_buckets_and_report_counters(redis: Redis) -> None:
    await redis.sadd(ACCOUNTS_INDEX, "acme")  # a registered account (a purged one's counts are dropped)
    rec = Recorder()
    t0 = 1_800_000_000.0  # bucket 180,000,000: the first of its hour
    rec.count("acme", "in", 3, at_s=t0)
    rec.count("acme", "in", 2, at_s=t0 + 9.9)
    rec.count("acme", "out", 4, at_s=t0 + 10)
    rec.count("acme", "out", 0, at_s=t0)  # nothing to count
    rec.tally("acme", NOW, "created", "apple", "loyalty")
    rec.tally("acme", NOW, "created", "apple", "loyalty")
    assert await rec.flush(redis, now_s=t0) == 3
    bucket = int(t0) // BUCKET_S
    key = account_keys("acme").series(bucket // BUCKETS_PER_HOUR)
    assert await redis.hgetall(key) == {
        f"{bucket}:in".encode(): b"5",
        f"{bucket + 1}:out".encode(): b"4",
        # The registered account's depth and DLQ size, sampled by the same flush.
        f"{bucket}:depth".encode(): b"0",
        f"{bucket}:dlq".encode(): b"0",
    }
    assert 0 < await redis.ttl(key) <= metrics.SERIES_TTL_S
    report = account_keys("acme").report("20261125")
    assert await redis.hget(report, report_field(12, "created", "apple", "loyalty")) == b"2"
    day_end = datetime(2026, 11, 26, tzinfo=UTC).timestamp()
    assert abs(await redis.ttl(report) - (day_end + metrics.REPORT_TTL_S - time.time())) < 5
    assert await rec.flush(redis, now_s=t0) == 0  # nothing new

    act = await inspect.activity(redis, "acme", t0 + 15)
    assert act.last_1m == {**dict.fromkeys(metrics.SERIES, 0), "in": 5, "out": 4}
    assert act.span_1m_s == pytest.approx(55.0)
    assert act.per_s("in") == pytest.approx(5 / 55)
    later = await inspect.activity(redis, "acme", t0 + 600)
    assert later.last_5m["in"] == 0


async def test_depth_is_sampled_once_per_bucket(redis: Redis) -> None:
    await enqueue(redis, "acme", [_event(1), _event(2, "S2")], high_water=100, dedup_window_s=3600)
    now = 1_800_000_123.0
    assert await sample(redis, now) is True
    assert await sample(redis, now + 1) is False  # same bucket: another process already sampled it
    series = await inspect.activity_series(redis, "acme", now, minutes=1)
    assert series.values["depth"][-1] == 2
    assert series.values["dlq"][-1] == 0
    assert series.values["depth"][0] is None
    assert series.values["in"] == [0] * len(series.values["in"])


async def test_a_failed_flush_keeps_the_counts(redis: Redis) -> None:
    await redis.sadd(ACCOUNTS_INDEX, "acme")
    rec = Recorder()
    rec.count("acme", "in", 7, at_s=1_800_000_000.0)
    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}", socket_connect_timeout=0.5)
    with pytest.raises(RedisConnectionError):
        await rec.flush(dead, now_s=1_800_000_000.0)
    await dead.aclose()
    assert await rec.flush(redis, now_s=1_800_000_000.0) == 1
    assert await redis.hget(account_keys("acme").series(1_800_000_000 // 10 // 360), "180000000:in") == b"7"


async def test_counts_of_a_purged_account_are_dropped_and_every_other_kind_kept(redis: Redis) -> None:
    """A process may still hold an account's counts when ``accounts remove --purge`` deletes its keys: the flush
    must not recreate them. A registered, an active (events queued) and a removed-but-kept account count."""
    await redis.sadd(ACCOUNTS_INDEX, "reg")
    await redis.zadd(ACTIVE_ACCOUNTS, {"busy": 1})
    await redis.sadd(REMOVED_ACCOUNTS, "kept")
    rec = Recorder()
    t0 = 1_800_000_000.0
    for account_id in ("reg", "busy", "kept", "purged"):
        rec.count(account_id, "out", 2, at_s=t0)
        rec.tally(account_id, NOW, "created", "apple", "loyalty")
    assert await rec.flush(redis, now_s=t0) == 6
    hour = int(t0) // BUCKET_S // BUCKETS_PER_HOUR
    for account_id in ("reg", "busy", "kept"):
        assert await redis.hget(account_keys(account_id).series(hour), "180000000:out") == b"2", account_id
        assert await redis.hlen(account_keys(account_id).report("20261125")) == 1, account_id
    assert [k async for k in redis.scan_iter(match=account_keys("purged").base + ":*")] == []


async def test_exporter_says_when_redis_is_unreadable(redis: Redis) -> None:
    dead = Redis.from_url(f"redis://127.0.0.1:{free_port()}", socket_connect_timeout=0.5)
    text = (await exporter.render(dead)).decode()
    await dead.aclose()
    assert "passbridge_redis_up 0.0" in text
    assert "passbridge_queue_depth" not in text
    text = (await exporter.render(redis)).decode()
    assert "passbridge_redis_up 1.0" in text


async def test_worker_metrics_server(redis: Redis, secret_key: str, tmp_path: Path) -> None:
    from passbridge.crypto import load_cipher
    from tests.factories import make_account

    await make_account(redis, load_cipher(secret_key, tmp_path), "acme")
    await enqueue(redis, "acme", [_event(1)], high_water=100, dedup_window_s=3600)
    server = exporter.MetricsServer(redis, "127.0.0.1", 0)
    port = await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            r = await client.get("/metrics")
            assert r.status_code == 200
            assert 'passbridge_queue_depth{account="acme"} 1.0' in r.text
            assert (await client.head("/metrics")).content == b""
    finally:
        await server.stop()


async def _commands_processed(redis: Redis) -> int:
    return int((await redis.info("stats"))["total_commands_processed"])


async def test_worker_metrics_reads_the_queue_once_per_freshness_window(
    redis: Redis, secret_key: str, tmp_path: Path
) -> None:
    """A scrape loop cannot multiply the Redis work of /metrics: the gauges are read once per window, and
    concurrent scrapes of a stale cache share one read."""
    from passbridge.crypto import load_cipher
    from tests.factories import make_account

    await make_account(redis, load_cipher(secret_key, tmp_path), "acme")
    await enqueue(redis, "acme", [_event(1)], high_water=100, dedup_window_s=3600)
    server = exporter.MetricsServer(redis, "127.0.0.1", 0, cache=exporter.GaugeCache(fresh_s=1.0))
    port = await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

            async def depths(n: int) -> set[str]:
                texts = await asyncio.gather(*(client.get("/metrics") for _ in range(n)))
                return {
                    line
                    for r in texts
                    for line in r.text.splitlines()
                    if line.startswith("passbridge_queue_d")
                }

            idle = -(await _commands_processed(redis)) + await _commands_processed(redis)  # INFO itself
            before = await _commands_processed(redis)
            await exporter.queue_families(redis)
            one_read = await _commands_processed(redis) - before - idle
            assert one_read > 1
            before = await _commands_processed(redis)
            assert await depths(20) == {'passbridge_queue_depth{account="acme"} 1.0'}
            # 20 concurrent scrapes: one read of the queue, not 20.
            assert await _commands_processed(redis) - before - idle == one_read
            await enqueue(redis, "acme", [_event(2, "S2")], high_water=100, dedup_window_s=3600)
            before = await _commands_processed(redis)
            assert await depths(10) == {'passbridge_queue_depth{account="acme"} 1.0'}  # still fresh
            assert await _commands_processed(redis) - before == idle  # no Redis work at all
            await asyncio.sleep(1.1)
            assert await depths(3) == {'passbridge_queue_depth{account="acme"} 2.0'}  # read again
    finally:
        await server.stop()


async def test_worker_metrics_token(redis: Redis) -> None:
    token = "mt-" + "5" * 24
    server = exporter.MetricsServer(redis, "127.0.0.1", 0, token)
    port = await server.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {token}"}):
                r = await client.get("/metrics", headers=headers)
                assert r.status_code == 401, headers
                assert r.headers["content-type"] == "application/problem+json"
                assert r.headers["www-authenticate"].startswith("Bearer")
                problem = r.json()
                assert problem["status"] == 401
                assert problem["type"].endswith("/unauthorized")
                assert "PASSBRIDGE_METRICS_TOKEN" in problem["detail"]
                assert token not in r.text
            r = await client.get("/metrics", headers={"authorization": f"Bearer {token}"})
            assert r.status_code == 200
            assert "passbridge_redis_up 1.0" in r.text
            assert (await client.get("/healthz")).text == "ok\n"  # liveness needs no token
    finally:
        await server.stop()
