"""``passbridge dlq ...`` and ``passbridge engine ...`` against a real Redis (typer's CliRunner, in-process)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
import redis as redis_sync
import structlog
from cryptography.fernet import Fernet, MultiFernet
from redis.asyncio import Redis
from typer.testing import CliRunner

from passbridge.accounts import AccountStore
from passbridge.cli import app
from passbridge.cli.dlq_cmd import parse_when
from passbridge.keys import PACE_BACKLOGS, account_keys
from passbridge.settings import get_settings
from tests.factories import make_account
from worker import dlq, pause
from worker.dlq import DLQEntry
from worker.queue import WorkQueue

from .helpers import dead_letter_same_id_twice, pass_event, put


@pytest.fixture
def cli_env(
    redis_url: str, tmp_path: Path, secret_key: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("PASSBRIDGE_SECRET_KEY", secret_key)
    monkeypatch.setenv("PASSBRIDGE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("PASSBRIDGE_LOG_FORMAT", "console")
    # The commands would configure structlog to cache loggers bound to CliRunner's stream, which is closed
    # after each invocation; later tests in this process would then log into a closed file.
    monkeypatch.setattr("passbridge.cli.common.configure_logging", _log_to_real_stderr)
    get_settings.cache_clear()
    yield redis_url
    get_settings.cache_clear()
    structlog.reset_defaults()


def _log_to_real_stderr(*_: object, **__: object) -> None:
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(file=sys.__stderr__), cache_logger_on_first_use=False
    )


def seed(redis_url: str, secret_key: str) -> None:
    """Two accounts; four dead-lettered events (codes invalid/404, two serials), one ordinary event queued."""

    async def go() -> None:
        redis = Redis.from_url(redis_url)
        cipher = MultiFernet([Fernet(secret_key.encode())])
        for a in ("acme", "globex"):
            await make_account(redis, cipher, a)
        await put(redis, *(pass_event("acme", s, n) for s in ("S1", "S2") for n in range(2)))
        await put(redis, pass_event("globex", "G1", 0), pass_event("globex", "G1", 1))
        q = WorkQueue(redis, worker_id="w1")
        codes = {"S1": ("invalid", 400), "S2": ("not_found", 404), "G1": ("invalid", 400)}
        for _ in range(3):
            for lease in (await q.claim(10)).leases:
                keys = account_keys(lease.account_id)
                (member, score) = (await redis.zrange(keys.mailbox(lease.serial), 0, 0, withscores=True))[0]
                code, status = codes[lease.serial]
                now = int(time.time() * 1000)
                entry = DLQEntry(
                    event_id=orjson.loads(member[12:])["id"],
                    serial=lease.serial,
                    member=member.decode(),
                    score=int(score),
                    reason=f"permanent error: HTTP {status} {code}",
                    dead_at_ms=now,
                    worker="w1",
                    errors=[
                        {"at_ms": now, "worker": "w1", "kind": "permanent", "status": status, "code": code}
                    ],
                )
                if lease.serial != "G1" or entry.event_id.endswith("-0"):
                    await q.settle(lease, [member], dead=[(entry.event_id, entry.to_json())])
                await q.release(lease)
        await redis.aclose()

    asyncio.run(go())


def invoke(*args: str, input: str | None = None) -> tuple[int, str]:
    """Exit code and output: stdout alone for --json (log lines go to stderr), else everything."""
    result = CliRunner().invoke(app, list(args), input=input)
    return result.exit_code, result.stdout if "--json" in args else result.output


def test_list_filters_and_show(cli_env: str, secret_key: str) -> None:
    seed(cli_env, secret_key)
    code, out = invoke("dlq", "list", "--json")
    assert code == 0, out
    doc = orjson.loads(out)
    assert sorted(e["event_id"] for e in doc["entries"]) == [
        "acme-S1-0",
        "acme-S1-1",
        "acme-S2-0",
        "acme-S2-1",
        "globex-G1-0",
    ]
    assert doc["totals"] == {"acme": 4, "globex": 1}
    _, out = invoke("dlq", "list", "--json", "--code", "invalid", "--account", "acme")
    assert sorted(e["event_id"] for e in orjson.loads(out)["entries"]) == ["acme-S1-0", "acme-S1-1"]
    _, out = invoke("dlq", "list", "--json", "--code", "404", "--serial", "S2")
    assert sorted(e["event_id"] for e in orjson.loads(out)["entries"]) == ["acme-S2-0", "acme-S2-1"]
    _, out = invoke("dlq", "list", "--json", "--until", "1h")
    assert orjson.loads(out)["entries"] == []
    code, out = invoke("dlq", "list")
    assert code == 0
    assert "5 shown; in the DLQ: acme 4, globex 1" in out

    code, out = invoke("dlq", "show", "globex-G1-0", "--json")
    assert code == 0, out
    doc = orjson.loads(out)
    assert doc["account"] == "globex"
    assert doc["event"]["id"] == "globex-G1-0"
    assert doc["errors"][0]["code"] == "invalid"
    assert [h["kind"] for h in doc["history"]] == ["ingested"]
    assert "member" not in doc
    code, out = invoke("dlq", "show", "nope")
    assert code == 1
    assert "no dead-lettered event" in out


def test_replay_needs_a_selection_and_confirms_bulk(cli_env: str, secret_key: str) -> None:
    seed(cli_env, secret_key)
    code, out = invoke("dlq", "replay")
    assert code == 1
    assert "name the events to replay, narrow with filters" in out
    assert "--all" in out
    code, out = invoke("dlq", "replay", "--account", "acme", "--code", "invalid", input="n\n")
    assert code == 1
    assert "replay 2 dead-lettered events (acme: 2)? [y/N]" in out  # asked in the present, not "replayed"
    assert "aborted" in out
    code, out = invoke("dlq", "purge", "--account", "acme", "--code", "invalid", input="n\n")
    assert (code, "purge 2 dead-lettered events (acme: 2)? [y/N]" in out) == (1, True), out
    code, out = invoke("dlq", "purge")
    assert (code, "name the events to purge, narrow" in out) == (1, True), out
    code, out = invoke("dlq", "replay", "--account", "acme", "--code", "invalid", "--yes", "--json")
    assert code == 0, out
    assert orjson.loads(out) == {
        "replayed": 2,
        "selected": 2,
        "accounts": {"acme": 2},
        "left": {},
        "interrupted": False,
    }

    async def check() -> None:
        redis = Redis.from_url(cli_env)
        assert await dlq.count(redis, "acme") == 2
        members = await redis.zrange(account_keys("acme").mailbox("S1"), 0, -1)
        assert [orjson.loads(m[12:])["id"] for m in members] == ["acme-S1-0", "acme-S1-1"]
        await redis.aclose()

    asyncio.run(check())
    # A single named entry needs no confirmation.
    code, out = invoke("dlq", "replay", "acme-S2-0")
    assert code == 0, out
    assert "replayed: 1 of 1" in out


def test_two_dead_letters_of_one_event_id(cli_env: str, secret_key: str) -> None:
    """An event id sent again after the dedup window and dead-lettered twice: both are listed, told apart by
    their DLQ ids and dead-at times, and each is shown, replayed or purged on its own."""

    async def seed_twice() -> None:
        redis = Redis.from_url(cli_env)
        await make_account(redis, MultiFernet([Fernet(secret_key.encode())]), "acme")
        await dead_letter_same_id_twice(redis, "acme", "S1")
        await redis.aclose()

    asyncio.run(seed_twice())
    code, out = invoke("dlq", "list", "--json")
    assert code == 0, out
    rows = orjson.loads(out)["entries"]
    assert [(r["dlq_id"], r["event_id"], r["code"]) for r in rows] == [
        ("acme-S1-0", "acme-S1-0", "invalid"),
        ("acme-S1-0#2", "acme-S1-0", "not_found"),
    ]
    assert rows[0]["dead_at"] <= rows[1]["dead_at"]
    code, out = invoke("dlq", "list")
    assert "acme-S1-0#2" in out
    assert "(event acme-S1-0)" in out

    code, out = invoke("dlq", "show", "acme-S1-0#2", "--json")
    assert code == 0, out
    doc = orjson.loads(out)
    assert (doc["dlq_id"], doc["event_id"], doc["event"]["x"]["points"]) == ("acme-S1-0#2", "acme-S1-0", 2)
    assert [o["dlq_id"] for o in doc["same_event_id"]] == ["acme-S1-0"]
    code, out = invoke("dlq", "show", "acme-S1-0")
    assert code == 0, out
    assert "also in the DLQ with this event id: acme-S1-0#2" in out

    code, out = invoke("dlq", "replay", "acme-S1-0#2")
    assert code == 0, out
    assert "replayed: 1 of 1" in out

    async def queued() -> list[int]:
        redis = Redis.from_url(cli_env)
        members = await redis.zrange(account_keys("acme").mailbox("S1"), 0, -1)
        await redis.aclose()
        return [orjson.loads(m[12:])["x"]["points"] for m in members]

    assert asyncio.run(queued()) == [2]
    code, out = invoke("dlq", "purge", "acme-S1-0", "--json")
    assert code == 0, out
    assert orjson.loads(out)["purged"] == 1
    _, out = invoke("dlq", "list", "--json")
    assert orjson.loads(out)["entries"] == []
    assert asyncio.run(queued()) == [2]


def test_purge_all_of_one_account(cli_env: str, secret_key: str) -> None:
    seed(cli_env, secret_key)
    code, out = invoke("dlq", "purge", "--account", "acme", "--all", "--yes", "--json")
    assert code == 0, out
    assert orjson.loads(out)["purged"] == 4
    _, out = invoke("dlq", "list", "--json")
    assert orjson.loads(out)["totals"] == {"acme": 0, "globex": 1}


def test_replay_or_purge_of_nothing_fails_with_json_too(cli_env: str, secret_key: str) -> None:
    """A selection that matches nothing exits 1 whether a person or a script (``--json``) runs it: the script
    gets the empty result on stdout and the same ``error:`` line on stderr."""
    seed(cli_env, secret_key)
    for verb, past in (("replay", "replayed"), ("purge", "purged")):
        selection = ["--account", "acme", "--code", "no_such_code", "--yes"]
        text = CliRunner().invoke(app, ["dlq", verb, *selection])
        assert text.exit_code == 1, text.output
        assert text.stdout == ""
        assert text.stderr == "error: no dead-lettered events match\n"
        as_json = CliRunner().invoke(app, ["dlq", verb, *selection, "--json"])
        assert as_json.exit_code == text.exit_code, as_json.output
        assert orjson.loads(as_json.stdout) == {past: 0, "selected": 0, "accounts": {}}
        assert as_json.stderr == "error: no dead-lettered events match\n"
        named = CliRunner().invoke(app, ["dlq", verb, "no-such-id", "--json"])
        assert (named.exit_code, orjson.loads(named.stdout)["selected"]) == (1, 0), named.output
    _, out = invoke("dlq", "list", "--json")
    assert orjson.loads(out)["totals"] == {"acme": 4, "globex": 1}  # nothing was replayed or purged


def test_engine_status_history_and_resume(cli_env: str, secret_key: str) -> None:
    seed(cli_env, secret_key)

    async def pause_acme() -> None:
        redis = Redis.from_url(cli_env)
        store = AccountStore(redis, MultiFernet([Fernet(secret_key.encode())]))
        await pause.pause_account(redis, store, "acme", "HTTP 401 not_authenticated")
        await redis.aclose()

    asyncio.run(pause_acme())
    code, out = invoke("engine", "status", "--json")
    assert code == 0, out
    rows = {r["account"]: r for r in orjson.loads(out)["accounts"]}
    assert rows["acme"]["dlq"] == 4
    assert rows["acme"]["paused"]["reason"] == "HTTP 401 not_authenticated"
    assert rows["globex"]["pending_events"] == 1
    assert rows["globex"]["paused"] is None
    assert orjson.loads(out)["backlog_pacing"] == {"active": False, "for_s": 0.0}
    code, out = invoke("engine", "status")
    assert "backlogs paced over Klaviyo's minute: no" in out

    async def small_account_seen() -> None:
        redis = Redis.from_url(cli_env)
        await redis.set(PACE_BACKLOGS, "1", px=30_000)  # what a worker says (worker.bulk.BulkSync)
        await redis.aclose()

    asyncio.run(small_account_seen())
    code, out = invoke("engine", "status", "--json")
    pacing = orjson.loads(out)["backlog_pacing"]
    assert pacing["active"] is True
    assert 25 < pacing["for_s"] <= 30
    code, out = invoke("engine", "status")
    assert "backlogs paced over Klaviyo's minute: yes" in out
    code, out = invoke("engine", "history", "globex", "--serial", "G1", "--json")
    assert code == 0, out
    assert [(h["kind"], h["event_id"]) for h in orjson.loads(out)] == [
        ("ingested", "globex-G1-0"),
        ("ingested", "globex-G1-1"),
    ]
    code, out = invoke("engine", "resume", "acme", "--json")
    assert code == 0, out
    assert orjson.loads(out)["resumed"] is True
    code, out = invoke("engine", "resume", "acme")
    assert code == 0
    assert "not paused" in out
    code, out = invoke("engine", "resume", "nobody")
    assert code == 1


def test_engine_history_of_an_event_finds_its_serial_without_a_scan(
    cli_env: str, secret_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PASSBRIDGE_DEDUP_TTL_S", "3600")  # the window `put` enqueues with
    get_settings.cache_clear()
    seed(cli_env, secret_key)
    redis = redis_sync.Redis.from_url(cli_env)
    try:
        # Many keys, as a real Redis has: a SCAN of the keyspace would have to walk them all.
        redis.mset({f"other:{n}": 1 for n in range(20_000)})
        redis.config_resetstat()
        code, out = invoke("engine", "history", "globex", "--event", "globex-G1-1", "--json")
        assert code == 0, out
        assert [(h["kind"], h["event_id"]) for h in orjson.loads(out)] == [("ingested", "globex-G1-1")]
        code, out = invoke("engine", "history", "globex", "--event", "nope-1")
        assert code == 1
        assert " ".join(out.split()) == (  # Rich wraps it at the terminal's width
            "error: no event 'nope-1' in account 'globex' within the dedup window (3600 s): "
            "give --serial for an older event"
        )
        assert "Traceback" not in out
        stats = redis.info("commandstats")
        assert "cmdstat_scan" not in stats
        assert "cmdstat_hget" in stats  # the dedup index was read
    finally:
        redis.close()
    # With the serial given, an event with no kept history is no error.
    code, out = invoke("engine", "history", "globex", "--event", "nope-1", "--serial", "G1")
    assert code == 0, out
    assert "no history" in out


def test_parse_when() -> None:
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    assert parse_when("2h", now=now) == int(datetime(2026, 11, 25, 10, 0, tzinfo=UTC).timestamp() * 1000)
    assert parse_when("2026-11-25T10:00:00Z") == parse_when("2026-11-25T10:00:00")
    with pytest.raises(Exception, match="neither ISO 8601"):
        parse_when("yesterday")
