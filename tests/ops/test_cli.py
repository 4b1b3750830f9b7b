"""``passbridge status|serial|event|report|dlq`` against the scenario's Redis (built by the real producer and
worker; see ``scenario.py``)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import structlog
from typer.testing import CliRunner

from passbridge.cli import app
from passbridge.redis_server import free_port
from passbridge.settings import get_settings

from .scenario import ACME_API, ACME_NDJSON, GLOBEX_DEAD, GLOBEX_OK, HOOLI, INITECH, UMBRELLA, Known


@pytest.fixture
def cli(known: Known, monkeypatch: pytest.MonkeyPatch) -> Iterator[Known]:
    for key, value in known.stack.env.items():
        if key.startswith("PASSBRIDGE_") or key == "REDIS_URL":
            monkeypatch.setenv(key, value)
    monkeypatch.setenv("PASSBRIDGE_LOG_FORMAT", "console")
    # The commands would configure structlog to cache loggers bound to CliRunner's stream, which is closed
    # after each invocation; later tests in this process would then log into a closed file.
    monkeypatch.setattr("passbridge.cli.common.configure_logging", _log_to_real_stderr)
    get_settings.cache_clear()
    structlog.reset_defaults()
    # Before any command runs, too: structlog's default prints to sys.stdout, which CliRunner swaps for its
    # capture while a command runs, so a line logged then by another thread of this process (the in-process
    # Klaviyo sandbox serving the scenario's workers) landed in a command's --json output (one CI failure:
    # "2026-11-27 …" before the document).
    _log_to_real_stderr()
    yield known
    get_settings.cache_clear()
    structlog.reset_defaults()


def _log_to_real_stderr(*_: object, **__: object) -> None:
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(file=sys.__stderr__), cache_logger_on_first_use=False
    )


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout if "--json" in args else result.output


def as_json(*args: str) -> Any:
    code, out = invoke(*args, "--json")
    assert code == 0, out
    return orjson.loads(out)


def test_status_shows_every_account_as_the_run_left_it(cli: Known) -> None:
    doc = as_json("status")
    rows = {a["account"]: a for a in doc["accounts"]}
    assert sorted(rows) == ["acme", "globex", "hooli", "initech", "umbrella"]

    acme = rows["acme"]
    delivered = len(ACME_API) + len(ACME_NDJSON)
    assert (acme["state"], acme["pending_events"], acme["dlq"], acme["parked_serials"]) == (
        "connected",
        0,
        0,
        0,
    )
    assert acme["last_5m"]["in"] == delivered
    assert acme["last_5m"]["dup"] == 1
    assert acme["last_5m"]["out"] == delivered
    assert acme["klaviyo_requests_5m"] >= delivered  # at least each event's metric event
    assert acme["klaviyo_429s_5m"] == 0
    assert acme["delivered_per_s"]["5m"] > 0
    assert acme["oldest_event_age_s"] == 0

    globex = rows["globex"]
    assert (globex["dlq"], globex["pending_events"], globex["last_5m"]["dead"]) == (1, 0, 1)
    assert globex["last_5m"]["out"] == 1

    initech = rows["initech"]
    assert initech["state"] == "paused"
    assert initech["state_reason"] == "billing hold"
    assert initech["paused"]["kind"] == "operator"
    assert (initech["pending_events"], initech["ready_serials"], initech["leased_serials"]) == (
        len(INITECH),
        1,
        0,
    )
    assert initech["oldest_event_age_s"] > 0

    hooli = rows["hooli"]
    assert (hooli["pending_events"], hooli["parked_serials"], hooli["ready_serials"]) == (1, 1, 0)
    assert hooli["next_attempt"] is not None
    assert hooli["last_5m"]["retry"] >= 1
    assert hooli["oldest_event_age_s"] > 0

    umbrella = rows["umbrella"]
    assert umbrella["klaviyo_429s_5m"] == cli.create_event["429"] >= 1
    assert umbrella["pending_events"] == 0

    # Every Klaviyo answer the worker got, as the sandbox counted them. The set-up calls came from the test;
    # the worker's are the sync operations, bulk ones included: a run slowed down by a busy machine lets
    # events pile up, and the adaptive mode then sends them by the bulk endpoints (and polls their jobs).
    sync_ops = (
        "create_or_update_profile",
        "create_event",
        "create_data_source_record",
        "bulk_create_events",
        "bulk_import_profiles",
        "get_bulk_import_profiles_job",
        "get_bulk_import_profiles_jobs",
        "get_errors_for_bulk_import_profiles_job",
        "bulk_create_data_source_records",
    )
    sent = sum(n for op in sync_ops for n in cli.answered.get(op, {}).values())
    assert sum(a["klaviyo_requests_5m"] for a in doc["accounts"]) == sent

    # One `passbridge worker` and its express lane (small accounts' events), each with its own counts.
    lanes = {w["lane"]: w for w in doc["workers"]}
    assert sorted(lanes) == ["express", "main"]
    assert all(w["alive"] is True and w["heartbeat_age_s"] < 10 for w in lanes.values())
    assert lanes["main"]["pid"] == cli.stack.workers.procs[0].pid  # type: ignore[union-attr]
    assert sum(w["written"] for w in lanes.values()) == delivered + 2  # acme, globex G2, umbrella U1
    assert sum(w["dead_lettered"] for w in lanes.values()) == 1

    code, out = invoke("status")
    assert code == 0
    assert "billing hold" in out
    assert "workers" in out


def test_status_of_chosen_accounts(cli: Known) -> None:
    doc = as_json("status", "--account", "hooli")
    assert [a["account"] for a in doc["accounts"]] == ["hooli"]


def test_serial_of_a_delivered_pass(cli: Known) -> None:
    doc = as_json("serial", "acme", "A1")
    assert doc["status"] == "idle"
    assert doc["pending"] == []
    assert doc["lease"] is None
    assert doc["applied_state"]["status"] == "active"
    assert doc["applied_state"]["event_id"] == "acme-a1-u"
    a1 = [i["event_id"] for i in ACME_API if i["serial_number"] == "A1"]
    steps = [(h["kind"], h["event_id"]) for h in doc["timeline"]]
    assert [e for k, e in steps if k == "ingested"] == a1
    assert [e for k, e in steps if k == "written"] == a1  # in order
    assert all(steps.index(("ingested", e)) < steps.index(("written", e)) for e in a1)
    assert len(steps) == 2 * len(a1)


def test_serial_parked_with_its_attempts(cli: Known) -> None:
    doc = as_json("serial", "hooli", "H1")
    assert doc["status"] == "parked"
    assert doc["next_attempt"] is not None
    (pending,) = doc["pending"]
    assert pending["event_id"] == HOOLI["event_id"]
    assert pending["attempts"] >= 1
    errors = doc["retries"][HOOLI["event_id"]]["errors"]
    assert {(e["status"], e["endpoint"]) for e in errors} == {(503, "create_event")}
    assert [h["kind"] for h in doc["timeline"]][:2] == ["ingested", "attempt"]
    code, out = invoke("serial", "hooli", "H1")
    assert code == 0
    assert "parked" in out
    assert "next attempt" in out


def test_serial_with_a_dead_letter_and_an_unknown_serial(cli: Known) -> None:
    doc = as_json("serial", "globex", "G1")
    assert doc["dead_lettered"] == [GLOBEX_DEAD["event_id"]]
    assert [h["kind"] for h in doc["timeline"]] == ["ingested", "dead"]
    code, out = invoke("serial", "globex", "NOPE")
    assert code == 1
    assert "nothing known" in out
    code, out = invoke("serial", "globex", "NOPE", "--json")
    assert code == 1
    assert orjson.loads(out)["pending_total"] == 0


def test_unreachable_redis_is_a_clear_error(cli: Known, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    get_settings.cache_clear()
    code, out = invoke("status")
    assert code == 1
    assert "Redis at 127.0.0.1:" in out
    assert "unreachable" in out
    assert "hunter2" not in out


def test_event_everywhere_it_can_be(cli: Known) -> None:
    delivered = as_json("event", "acme", "acme-a2-x")
    assert (delivered["where"], delivered["serial"]) == ("delivered", "A2")
    assert [h["kind"] for h in delivered["history"]] == ["ingested", "written"]

    dead = as_json("event", "globex", GLOBEX_DEAD["event_id"])
    assert dead["where"] == "dead_lettered"
    assert "HTTP 400" in dead["detail"]
    assert dead["dlq"]["errors"][0]["endpoint"] == "create_or_update_profile"
    assert dead["event"]["id"] == GLOBEX_DEAD["event_id"]

    queued = as_json("event", "initech", INITECH[1]["event_id"])
    assert (queued["where"], queued["position"], queued["serial_status"]) == ("pending", 2, "ready")

    parked = as_json("event", "hooli", HOOLI["event_id"])
    assert (parked["where"], parked["position"]) == ("pending", 1)
    assert "next attempt" in parked["detail"]
    assert parked["retry"]["attempts"] >= 1

    throttled = as_json("event", "umbrella", UMBRELLA["event_id"])
    assert throttled["where"] == "delivered"
    assert "throttled" in [h["kind"] for h in throttled["history"]]

    code, out = invoke("event", "acme", "no-such-event")
    assert code == 1
    assert "no such event id" in out
    code, out = invoke("event", "globex", GLOBEX_OK["event_id"])
    assert code == 0
    assert "delivered to Klaviyo" in out


def _expected(items: list[dict[str, Any]], **where: str) -> dict[str, int]:
    chosen = [i for i in items if all(i[k] == v for k, v in where.items())]
    return {k: sum(1 for i in chosen if i["kind"] == k) for k in ("created", "installed", "uninstalled")}


def test_report_by_platform_and_pass_type(cli: Known) -> None:
    items = ACME_API + ACME_NDJSON
    doc = as_json("report", "acme", "--since", "2026-11-25T00:00Z", "--until", "2026-11-26T00:00Z")
    total = _expected(items)
    assert {k: doc["total"][k] for k in total} == total
    assert doc["total"]["updated"] == 1
    assert doc["total"]["save_rate"] == round(total["installed"] / total["created"], 4)
    assert doc["total"]["install_uninstall_ratio"] == round(total["installed"] / total["uninstalled"], 4)
    for platform in ("apple", "google"):
        exp = _expected(items, platform=platform)
        got = doc["by_platform"][platform]
        assert {k: got[k] for k in exp} == exp
        assert got["save_rate"] == round(exp["installed"] / exp["created"], 4)
    coupon = doc["by_pass_type"]["coupon"]
    assert coupon["install_uninstall_ratio"] is None  # no uninstall: undefined, not infinite
    rows = {(r["platform"], r["pass_type"]): r for r in doc["by_platform_and_pass_type"]}
    assert rows[("google", "loyalty")]["uninstalled"] == 1
    assert sum(r["created"] for r in rows.values()) == total["created"]

    # Events occurred on the 25th: a later window is empty, its rates undefined.
    empty = as_json("report", "acme", "--since", "2026-11-26T00:00Z", "--until", "2026-11-27T00:00Z")
    assert empty["total"]["created"] == 0
    assert empty["total"]["save_rate"] is None
    code, out = invoke("report", "acme", "--since", "2026-11-25T00:00Z", "--until", "2026-11-26T00:00Z")
    assert code == 0
    assert f"{total['installed'] / total['created']:.1%}" in out
    code, out = invoke("report", "acme", "--since", "yesterday")
    assert code == 1
    assert "neither ISO 8601" in out
    code, out = invoke("report", "acme", "--since", "1h", "--until", "2h")
    assert code == 1
    assert "must be before" in out


def test_dlq_commands_see_the_dead_letter(cli: Known) -> None:
    doc = as_json("dlq", "list")
    assert [e["event_id"] for e in doc["entries"]] == [GLOBEX_DEAD["event_id"]]
    assert doc["entries"][0]["status"] == 400
    shown = as_json("dlq", "show", GLOBEX_DEAD["event_id"])
    assert shown["account"] == "globex"
    assert [h["kind"] for h in shown["history"]] == ["ingested", "dead"]
