"""The serial and event pages of a hot serial over real HTTP (the producer app served from this process, the
serial's history and mailbox filled through the engine's own enqueue, claim and settle scripts): they read a
bounded part of it, show it in the right order and say what they leave out."""

from __future__ import annotations

import asyncio
import html
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import redis as redis_sync
from pydantic import SecretStr
from redis.asyncio import Redis
from typer.testing import CliRunner

from passbridge.cli import app
from passbridge.keys import account_keys
from passbridge.settings import Settings, get_settings
from producer.app import create_app
from tests.conftest import serve
from tests.worker.helpers import fill_dlq, pass_event, put
from worker import dlq, history, inspect

from .harness import ADMIN_TOKEN

DEAD = 1_200  # dead-lettered events (settle stores each one's `ingested` entry)
PENDING = 3_000


@pytest.fixture
def dashboard(settings: Settings, redis_url: str) -> Iterator[httpx.Client]:
    """The in-process dashboard, as the admin (bearer token), with the dedup window `put` enqueues with."""
    update = {"admin_token": SecretStr(ADMIN_TOKEN), "dedup_ttl_s": 3600}
    server = serve(create_app(settings.model_copy(update=update), redis_url))
    headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
            yield client
    finally:
        server.stop()


@pytest.fixture
def hot_serial(redis_url: str) -> None:
    """acme's S1: DEAD events dead-lettered, then PENDING queued whose send order (by occurrence) is the reverse
    of their arrival order."""

    async def go() -> None:
        redis = Redis.from_url(redis_url)
        try:
            await fill_dlq(redis, "acme", ["S1"], DEAD)
            late = [pass_event("acme", "S1", DEAD + n, offset_s=-n) for n in range(PENDING)]
            await put(redis, *late)
        finally:
            await redis.aclose()

    asyncio.run(go())


def rows(html: str) -> list[tuple[str, str]]:
    """(kind, event id) of a timeline table's rows, top to bottom."""
    table = html[html.index('<table class="timeline">') :]
    return re.findall(
        r'<tr class="kind-([a-z]+)"><td>[^<]*</td><td>[a-z]+</td>\n<td><a [^>]*>([^<]+)</a>', table
    )


def test_a_hot_serial_page_reads_the_newest_history_and_says_so(
    dashboard: httpx.Client, redis_url: str, hot_serial: None
) -> None:
    keys = account_keys("acme")
    sync = redis_sync.Redis.from_url(redis_url)
    try:
        stored = sync.lrange(keys.history("S1"), 0, -1)
        members = sync.zrange(keys.mailbox("S1"), 0, -1)
        assert len(stored) == DEAD > inspect.TIMELINE_LIMIT
        assert len(members) == PENDING > inspect.PENDING_LIMIT
        whole = sum(map(len, stored)) + sum(map(len, members))
        sent_before = int(sync.info("stats")["total_net_output_bytes"])
        r = dashboard.get("/dashboard/serial", params={"account": "acme", "serial": "S1", "fragment": "1"})
        sent = int(sync.info("stats")["total_net_output_bytes"]) - sent_before
    finally:
        sync.close()
    assert r.status_code == 200
    # One refresh reads a bounded part of the serial, not its whole history and mailbox.
    assert sent < whole / 3, (sent, whole)
    shown = rows(r.text)
    assert len(shown) == inspect.TIMELINE_LIMIT + inspect.PENDING_LIMIT
    text = " ".join(r.text.split())
    older = DEAD - inspect.TIMELINE_LIMIT
    assert (
        f"The newest {inspect.TIMELINE_LIMIT} of the serial's {DEAD} kept history entries "
        f"(the {older} older ones are not shown)."
    ) in text
    assert (
        f"The arrival of the {PENDING - inspect.PENDING_LIMIT} pending events behind the "
        f"{inspect.PENDING_LIMIT} listed above is not shown."
    ) in text
    assert "passbridge engine history acme --serial S1" in text

    # What it shows is the whole timeline's newest stored entries and the listed events' arrivals, in the
    # whole timeline's order: the listed events (first to be sent) arrived last, in reverse.
    full = asyncio.run(_timeline(redis_url))
    assert shown == [(e.kind, e.event_id) for e in full if (e.kind, e.event_id) in set(shown)]
    newest = [(h.kind, h.event_id) for h in map(history.parse, stored[-inspect.TIMELINE_LIMIT :])]
    assert shown[: inspect.TIMELINE_LIMIT] == newest
    listed = [f"acme-S1-{DEAD + PENDING - 1 - n}" for n in range(inspect.PENDING_LIMIT)]
    assert [i for k, i in shown[inspect.TIMELINE_LIMIT :]] == listed[::-1]
    assert {k for k, _ in shown[inspect.TIMELINE_LIMIT :]} == {"ingested"}


async def _timeline(redis_url: str) -> list[history.HistoryEntry]:
    redis = Redis.from_url(redis_url)
    try:
        return await history.timeline(redis, "acme", "S1")
    finally:
        await redis.aclose()


def test_event_pages_of_a_hot_serial_say_what_they_did_not_read(
    dashboard: httpx.Client, redis_url: str, hot_serial: None
) -> None:
    def page(event_id: str) -> str:
        r = dashboard.get("/dashboard/event", params={"account": "acme", "id": event_id, "fragment": "1"})
        assert r.status_code == 200
        return " ".join(html.unescape(r.text).split())

    # Queued behind the listed events: found, and its own arrival is shown although the timeline left it out.
    behind = f"acme-S1-{DEAD + PENDING - 1 - 249}"
    text = page(behind)
    assert f"queued, 250 of {PENDING} in its serial" in text
    assert '<tr class="kind-ingested">' in text
    assert 'id="history-partial"' not in text
    # Dead-lettered long ago: its history is older than what is read, and the page says so.
    text = page("acme-S1-0")
    assert 'id="event-where">dead_lettered<' in text
    assert "No history kept for this event." in text
    assert f"the {DEAD - inspect.TIMELINE_LIMIT} older ones are not read here" in text
    assert "passbridge engine history acme --event acme-S1-0 --serial S1" in text
    # Purged from the DLQ: "no delivery" is only claimed for the entries read.
    asyncio.run(_purge(redis_url, "acme-S1-1"))
    text = page("acme-S1-1")
    assert (
        f"not queued, not in the DLQ and no delivery in the newest {inspect.TIMELINE_LIMIT} of its serial's "
        f"{DEAD} kept history entries"
    ) in text
    # A recent one's history starts with its arrival, among the entries read: it is whole, so no note.
    recent = f"acme-S1-{DEAD - 1}"
    asyncio.run(_purge(redis_url, recent))
    text = page(recent)
    assert '<tr class="kind-ingested">' in text
    assert "not queued, not in the DLQ and no delivery in the kept history" in text
    assert 'id="history-partial"' not in text


async def _purge(redis_url: str, event_id: str) -> None:
    redis = Redis.from_url(redis_url)
    try:
        assert await dlq.purge(redis, "acme", [event_id]) == 1
    finally:
        await redis.aclose()


def test_the_cli_says_what_it_did_not_read_and_engine_history_reads_it_all(
    redis_url: str, hot_serial: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("PASSBRIDGE_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("PASSBRIDGE_DEDUP_TTL_S", "3600")
    monkeypatch.setenv("PASSBRIDGE_LOG_FORMAT", "console")
    monkeypatch.setattr("passbridge.cli.common.configure_logging", lambda *_, **__: None)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["serial", "acme", "S1", "--json"])
        assert result.exit_code == 0, result.output
        assert orjson.loads(result.stdout)["timeline_omitted"] == DEAD - inspect.TIMELINE_LIMIT
        result = CliRunner().invoke(app, ["serial", "acme", "S1"])
        assert (
            f"timeline: the newest {inspect.TIMELINE_LIMIT} of {DEAD} kept history entries, the arrival of the "
            f"{inspect.PENDING_LIMIT} pending events listed; `passbridge engine history acme --serial S1` lists "
            "everything"
        ) in " ".join(result.output.split())  # Rich wraps at its width
        result = CliRunner().invoke(app, ["event", "acme", "acme-S1-0"])
        assert (
            f"the serial's {DEAD - inspect.TIMELINE_LIMIT} oldest history entries were not read"
            in result.output
        )
        # The one-off command reads the whole list and mailbox.
        result = CliRunner().invoke(app, ["engine", "history", "acme", "--serial", "S1", "--json"])
        assert result.exit_code == 0, result.output
        assert len(orjson.loads(result.stdout)) == DEAD + PENDING
        result = CliRunner().invoke(app, ["engine", "history", "acme", "--event", "acme-S1-0", "--json"])
        assert [h["kind"] for h in orjson.loads(result.stdout)] == ["ingested"]
    finally:
        get_settings.cache_clear()
