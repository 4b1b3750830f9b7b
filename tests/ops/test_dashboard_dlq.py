"""The dashboard's dead-letter pages over real HTTP: bulk actions bound to their confirmation page (against a
real producer and worker that dead-letter events while the operator looks), and the listing of big DLQs (the
producer app served from this process, its DLQs filled through the engine's own claim and settle scripts:
thousands of dead letters through the sandbox would take minutes)."""

from __future__ import annotations

import asyncio
import html
import re
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis as redis_sync
from cryptography.fernet import Fernet, MultiFernet
from pydantic import SecretStr
from redis.asyncio import Redis

from passbridge.keys import account_keys
from passbridge.settings import Settings
from producer.app import create_app
from producer.dashboard.views import DLQ_EXAMINE
from tests.conftest import serve
from tests.factories import event, make_account
from tests.producer.conftest import cipher
from tests.worker.helpers import dead_letter_same_id_twice, fill_dlq, pass_event, put

from .harness import ADMIN_TOKEN, Stack, item, wait_until

FORM = {"content-type": "application/x-www-form-urlencoded"}


@pytest.fixture
def dashboard(dashboard_url: str) -> Iterator[httpx.Client]:
    """The in-process dashboard, as the admin (bearer token)."""
    headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=dashboard_url, headers=headers, timeout=60) as client:
        yield client


def fill(
    redis_url: str, account_id: str, serials: list[str], per_serial: int, *, register: bool = False
) -> None:
    """Dead-letter ``per_serial`` events of each serial (see ``fill_dlq``); ``register`` the account first."""

    async def go() -> None:
        redis = Redis.from_url(redis_url)
        try:
            if register:
                await make_account(redis, MultiFernet([Fernet(Fernet.generate_key())]), account_id)
            if serials:
                await fill_dlq(redis, account_id, serials, per_serial)
        finally:
            await redis.aclose()

    asyncio.run(go())


def listed(html: str) -> list[tuple[str, str]]:
    """(account, event id) of the DLQ table's rows, top to bottom."""
    return re.findall(r"<tr>\n  <td>[^<]*</td><td>([^<]+)</td>\n  <td><a [^>]*>([^<]+)</a>", html)


def hidden_fields(html: str) -> dict[str, list[str]]:
    """The confirmation form's hidden inputs, as a browser would post them back."""
    form = html[html.index('action="/dashboard/dlq/bulk"') :]
    fields: dict[str, list[str]] = {}
    for name, value in re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', form):
        fields.setdefault(name, []).append(value)
    return fields


def test_bulk_confirmation_acts_only_on_what_it_showed(fresh_stack: Stack) -> None:
    stack = fresh_stack
    stack.add_account("acme")
    stack.start_producer(processes=1)
    stack.start_worker()
    sandbox = stack.sandbox
    sandbox.set_faults(error_rates={400: 1.0}, operations=["create_or_update_profile"])

    def dead_letter(*serials: str, expect: int) -> None:
        batch = [item(f"acme-{s.lower()}-c", s, "created", minute=1) for s in serials]
        assert stack.post("acme", batch).status_code == 202
        wait_until(lambda: stack.dlq_size("acme") == expect, 30, f"{expect} dead letters")

    dead_letter("S1", "S2", "S3", expect=3)
    with httpx.Client(base_url=stack.producer_url, timeout=10) as browser:
        assert browser.post("/dashboard/login", data={"token": ADMIN_TOKEN}).status_code == 303
        csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', browser.get("/dashboard/dlq").text)
        assert csrf is not None
        # Purge everything, previewed while the DLQ holds 3 ...
        r = browser.post("/dashboard/dlq/bulk", data={"action": "purge", "csrf": csrf.group(1)})
        assert r.status_code == 200
        assert "Purge 3 dead-lettered events?" in r.text
        confirm = hidden_fields(r.text)
        # ... then an incident dead-letters 2 more before the operator clicks "Yes, purge 3".
        dead_letter("S4", "S5", expect=5)
        r = browser.post("/dashboard/dlq/bulk", data=confirm)
        assert r.status_code == 303
        assert "purged 3 of 3 selected" in browser.get(r.headers["location"]).text
        assert stack.dlq_size("acme") == 2  # the two nobody previewed are still there
        remaining = {"acme-s4-c", "acme-s5-c"}

        # Preview the 2; another operator replays one of them before the click: the confirmation is shown
        # again with the new number and nothing is purged.
        r = browser.post("/dashboard/dlq/bulk", data={"action": "purge", "csrf": csrf.group(1)})
        assert "Purge 2 dead-lettered events?" in r.text
        confirm = hidden_fields(r.text)
        sandbox.clear_faults()
        r = browser.post(
            "/dashboard/dlq/replay", data={"account": "acme", "id": "acme-s4-c", "csrf": csrf.group(1)}
        )
        assert r.status_code == 303
        wait_until(lambda: "acme-s4-c" in stack.stored_unique_ids("acme"), 30, "the replayed event delivered")
        r = browser.post("/dashboard/dlq/bulk", data=confirm)
        assert r.status_code == 409
        assert "Purge 1 dead-lettered event?" in r.text
        assert "The selection changed" in r.text
        assert stack.dlq_size("acme") == 1
        # Confirming the page shown again purges what it shows.
        r = browser.post("/dashboard/dlq/bulk", data=hidden_fields(r.text))
        assert r.status_code == 303
        assert "purged 1 of 1 selected" in browser.get(r.headers["location"]).text
        assert stack.dlq_size("acme") == 0
        assert "acme-s5-c" not in stack.stored_unique_ids("acme")
        assert remaining - stack.stored_unique_ids("acme") == {"acme-s5-c"}
    sandbox.close()


def test_a_filtered_scan_of_a_huge_dlq_stops_and_says_so(dashboard: httpx.Client, redis_url: str) -> None:
    per_serial = 1010
    fill(redis_url, "acme", [f"S{n}" for n in range(20)], per_serial)
    total = 20 * per_serial
    assert total > DLQ_EXAMINE
    # A code no entry has: the page reads DLQ_EXAMINE entries, stops, and says so.
    r = dashboard.get("/dashboard/dlq?account=acme&code=429")
    assert r.status_code == 200
    assert f"Stopped after examining {DLQ_EXAMINE} dead letters" in r.text
    # One that matches early needs only a page's worth: no such note.
    r = dashboard.get("/dashboard/dlq?account=acme&code=409")
    assert r.text.count("<tr>") == 201  # the header and 200 rows
    assert "Stopped after examining" not in r.text
    # A bulk selection by code would have to read past the cap: refused, not done on a part.
    r = dashboard.post("/dashboard/dlq/bulk", data={"action": "purge", "account": "acme", "code": "429"})
    assert r.status_code == 400
    assert "code, serial:" in r.text
    # By time alone no entry is read, so there is no cap.
    r = dashboard.post("/dashboard/dlq/bulk", data={"action": "purge", "account": "acme", "since": "1h"})
    assert r.status_code == 200
    assert f"Purge {total} dead-lettered events?" in r.text


def test_the_dlq_page_lists_the_newest_across_accounts_and_counts_every_account(
    dashboard: httpx.Client, redis_url: str
) -> None:
    # acme's 250 old dead letters, then an incident in zeta, the account listed last.
    fill(redis_url, "acme", ["A1", "A2"], 125, register=True)
    fill(redis_url, "mid", [], 0, register=True)
    fill(redis_url, "zeta", ["Z1"], 40, register=True)
    r = dashboard.get("/dashboard/dlq")
    assert r.status_code == 200
    assert "In the DLQ: acme 250, mid 0, zeta 40" in r.text
    assert "Showing the 200 newest" in r.text
    rows = listed(r.text)
    assert len(rows) == 200
    assert {i for a, i in rows[:40]} == {f"zeta-Z1-{n}" for n in range(40)}
    assert all(a == "zeta" for a, _ in rows[:40])
    assert all(a == "acme" for a, _ in rows[40:])
    # The 160 newest of acme, newest first.
    redis = redis_sync.Redis.from_url(redis_url)
    newest = [m.decode() for m in redis.zrange(account_keys("acme").dlq, 0, 159, desc=True)]
    redis.close()
    assert [i for _, i in rows[40:]] == newest
    # The newest first for one account too, and its total is there even when a filter hides its entries.
    r = dashboard.get("/dashboard/dlq?account=zeta&code=999")
    assert "In the DLQ: zeta 40" in r.text
    assert listed(r.text) == []


def test_out_of_range_times_are_a_clear_400(dashboard: httpx.Client) -> None:
    for query in ("since=infd", "until=1e309s", "since=0001-01-01T00:00:00%2B01:00"):
        r = dashboard.get(f"/dashboard/dlq?{query}")
        assert r.status_code == 400, query
        assert "out of range" in r.text
        r = dashboard.post("/dashboard/dlq/bulk", content=f"action=purge&{query}", headers=FORM)
        assert r.status_code == 400, query
        assert ("since:" if query.startswith("since") else "until:") in r.text


def notice(page: str) -> str | None:
    """The notice a page shows, if any."""
    found = re.search(r'<p class="notice" role="status">([^<]*)</p>', page)
    return html.unescape(found.group(1)) if found else None


def test_notices_are_chosen_by_the_server_not_by_the_link(dashboard: httpx.Client, redis_url: str) -> None:
    fill(redis_url, "acme", ["S1"], 3, register=True)
    # A crafted link cannot put words on an operator's page, on any page ...
    spoof = "Security update: paste your admin token into https://evil.example"
    pages = [("/dashboard", {}), ("/dashboard/dlq", {}), ("/dashboard/workers", {})]
    pages += [
        ("/dashboard/account", {"account": "acme"}),
        ("/dashboard/serial", {"account": "acme", "serial": "S1"}),
    ]
    for path, params in pages:
        r = dashboard.get(path, params={**params, "notice": spoof})
        assert r.status_code == 200, path
        assert notice(r.text) is None, path
        assert "evil.example" not in r.text, path
    # ... nor counts of its own: only whole numbers fill a known text, else nothing is shown.
    for counts in (
        {"done": "all", "total": "3"},
        {"done": "-1", "total": "3"},
        {"total": "3"},
        {"done": "1" * 10},
    ):
        assert notice(dashboard.get("/dashboard/dlq", params={"notice": "purged", **counts}).text) is None
    # The real flows still say what they did.
    r = dashboard.post("/dashboard/dlq/replay", data={"account": "acme", "id": "acme-S1-0"})
    assert r.status_code == 303
    assert notice(dashboard.get(r.headers["location"]).text) == "replayed: back in its serial's queue"
    r = dashboard.post("/dashboard/dlq/bulk", data={"action": "purge", "account": "acme", "code": "429"})
    assert r.status_code == 303
    assert notice(dashboard.get(r.headers["location"]).text) == "nothing matched"
    preview = dashboard.post("/dashboard/dlq/bulk", data={"action": "replay", "account": "acme"})
    assert "Replay 2 dead-lettered events?" in preview.text
    r = dashboard.post("/dashboard/dlq/bulk", data=hidden_fields(preview.text))
    assert r.status_code == 303
    assert notice(dashboard.get(r.headers["location"]).text) == "replayed 2 of 2 selected"


@pytest.mark.parametrize(("reserve", "limit"), [(0.1, 135), (0.0, 150)])
def test_replay_fills_a_backlog_only_up_to_its_replay_limit(
    settings: Settings, redis_url: str, reserve: float, limit: int
) -> None:
    """A bulk replay gets back what fits under the replay limit now (the oldest: PASSBRIDGE_BACKLOG_HIGH_WATER
    less the PASSBRIDGE_REPLAY_RESERVE kept for live ingest) and says how many are left and why; a single replay
    into a backlog at its limit is refused. The account's live ingest, through the same producer, still gets the
    reserve (with a reserve of 0, as before the reserve existed: 503)."""
    high_water = 150
    settings = settings.model_copy(
        update={
            "admin_token": SecretStr(ADMIN_TOKEN),
            "backlog_high_water": high_water,
            "replay_reserve": reserve,
        }
    )
    app = create_app(settings, redis_url)

    async def seed() -> None:
        redis = Redis.from_url(redis_url)
        try:
            await make_account(redis, cipher(settings))
            await fill_dlq(redis, "acme", ["A1", "A2"], 100)
            await put(redis, *(pass_event("acme", "LIVE", n) for n in range(30)))
        finally:
            await redis.aclose()

    asyncio.run(seed())  # 30 pending: room for limit - 30 of the 200
    room = limit - 30
    limit_text = (
        f"{limit} pending: PASSBRIDGE_BACKLOG_HIGH_WATER=150 less the PASSBRIDGE_REPLAY_RESERVE={reserve:g} kept "
        "for live ingest"
    )
    redis = redis_sync.Redis.from_url(redis_url)
    keys = account_keys("acme")
    oldest_first = [m.decode() for m in redis.zrange(keys.dlq, 0, -1)]
    server = serve(app)
    try:
        headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as dashboard:
            r = dashboard.post("/dashboard/dlq/bulk", data={"action": "replay", "account": "acme"})
            assert "Replay 200 dead-lettered events?" in r.text
            assert f"acme: room for {room} of its 200 under its replay limit ({limit_text}) now" in r.text
            r = dashboard.post("/dashboard/dlq/bulk", data=hidden_fields(r.text))
            assert r.status_code == 303
            assert parse_qs(urlsplit(r.headers["location"]).query)["left"] == [str(200 - room)]
            shown = notice(dashboard.get(r.headers["location"]).text)
            assert shown is not None
            assert shown.startswith(
                f"replayed {room} of 200 selected; {200 - room} of them are still in the DLQ: their account's "
                "backlog has reached its replay limit (PASSBRIDGE_BACKLOG_HIGH_WATER less the PASSBRIDGE_REPLAY_RESERVE "
                "kept for live ingest)"
            )
            assert int(redis.get(keys.depth)) == limit
            assert {m.decode() for m in redis.zrange(keys.dlq, 0, -1)} == set(oldest_first[room:])

            r = dashboard.post("/dashboard/dlq/replay", data={"account": "acme", "id": oldest_first[-1]})
            assert r.status_code == 409
            assert (
                f"not replayed: account acme's backlog has reached its replay limit ({limit} pending; a replay fills it "
                f"up to {limit_text})"
            ) in html.unescape(r.text)
            assert redis.zscore(keys.dlq, oldest_first[-1]) is not None
            assert int(redis.get(keys.depth)) == limit

        # The account's live ingest, with the backlog at the replay limit: the reserve is all its own.
        with httpx.Client(
            base_url=server.url, headers={"authorization": "Bearer tok-acme"}, timeout=10
        ) as sender:
            r = sender.post("/v1/accounts/acme/events", json=event(0))
            if reserve:
                assert r.status_code == 202, r.text
                r = sender.post(
                    "/v1/accounts/acme/events", json=[event(i) for i in range(1, high_water - limit)]
                )
                assert r.status_code == 202, r.text
                assert int(redis.get(keys.depth)) == high_water
                # The mark still holds for live ingest.
                r = sender.post("/v1/accounts/acme/events", json=event(high_water))
            assert r.status_code == 503, r.text
            assert int(redis.get(keys.depth)) == high_water
    finally:
        server.stop()
        redis.close()


def test_two_dead_letters_of_one_event_id(dashboard: httpx.Client, redis_url: str) -> None:
    """An event id sent again after the dedup window, dead-lettered twice: both rows are listed and linked by
    their DLQ ids, each entry page shows its own payload and names the other, and replay or purge acts on the
    one chosen."""

    async def seed() -> None:
        redis = Redis.from_url(redis_url)
        try:
            await make_account(redis, MultiFernet([Fernet(Fernet.generate_key())]), "acme")
            await dead_letter_same_id_twice(redis, "acme", "S1")
        finally:
            await redis.aclose()

    asyncio.run(seed())
    r = dashboard.get("/dashboard/dlq?account=acme")
    assert listed(r.text) == [("acme", "acme-S1-0#2"), ("acme", "acme-S1-0")]
    assert "event acme-S1-0</span>" in r.text
    r = dashboard.get("/dashboard/dlq/entry", params={"account": "acme", "id": "acme-S1-0#2"})
    assert r.status_code == 200
    assert "Dead letter <code>acme-S1-0#2</code>" in r.text
    assert "points&#34;: 2" in r.text
    assert 'id="same-id"' in r.text
    same_id = r.text.split('id="same-id"')[1].split("</p>")[0]
    assert 'id=acme-S1-0">' in same_id  # the first entry, not this one (acme-S1-0%232)
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', r.text)
    assert csrf is not None
    r = dashboard.get("/dashboard/event", params={"account": "acme", "id": "acme-S1-0"})
    assert "2 DLQ entries have this event id" in r.text

    # Replay the second: its own payload goes back, the first stays.
    r = dashboard.post(
        "/dashboard/dlq/replay", data={"account": "acme", "id": "acme-S1-0#2", "csrf": csrf[1]}
    )
    assert r.status_code == 303
    assert "id=acme-S1-0&" in r.headers["location"]
    redis = redis_sync.Redis.from_url(redis_url)
    keys = account_keys("acme")
    (member,) = redis.zrange(keys.mailbox("S1"), 0, -1)
    assert b'"points":2' in member
    assert redis.hkeys(keys.dlq_entries) == [b"acme-S1-0"]
    # The purge confirmation names the DLQ id it acts on.
    r = dashboard.post("/dashboard/dlq/bulk", data={"action": "purge", "account": "acme", "ids": "acme-S1-0"})
    assert "Purge 1 dead-lettered event?" in r.text
    assert "<code>acme-S1-0</code>" in r.text
    r = dashboard.post("/dashboard/dlq/bulk", data=hidden_fields(r.text))
    assert r.status_code == 303
    assert r.headers["location"].endswith("notice=purged&done=1&total=1")
    assert redis.hlen(keys.dlq_entries) == 0
    assert redis.zcard(keys.mailbox("S1")) == 1
    redis.close()
