"""Backlog pacing in the bulk lanes (worker.bulk.Lane with RateLimiter.pace): a backlog's bulk requests and its
overflow single calls spend the steady budget evenly over the window, while a fresh event's single call is
never held by the pace.

The lane runs against a real Redis (the limiter) on a clock 60 times faster than Klaviyo's (a minute window of
1.04 s). Its senders, which would call Klaviyo, are the edge here: they record when the lane let each request
go and answer OK, so the timing is the lane's and the limiter's alone.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from passbridge.accounts import Account, AccountStore
from passbridge.keys import PACE_BACKLOGS, account_keys
from worker.bulk import OK, AccountLanes, BulkSync, Item, Lane, Outcome
from worker.klaviyo.client import KlaviyoClient
from worker.klaviyo.endpoints import BULK_CREATE_DATA_SOURCE_RECORDS, CREATE_DATA_SOURCE_RECORD
from worker.sync import Syncer

from .conftest import API_KEY, RATE_SCALE, make_client, put_account

#: The steady windows at this scale (60 s / 60, the 2 % safety and 20 ms of pad), over the tiers' per-minute
#: budgets: the record bulk endpoint (15 a minute) and the single record endpoint (750 a minute).
WINDOW_S = 60 / RATE_SCALE * 1.02 + 0.02
BULK_PACE_S = WINDOW_S / BULK_CREATE_DATA_SOURCE_RECORDS.tier.steady
SINGLE_PACE_S = WINDOW_S / CREATE_DATA_SOURCE_RECORD.tier.steady
BACKLOG_ITEMS = 3000


class Sent:
    """When the lane let each request go (``time.monotonic()``), by kind."""

    def __init__(self) -> None:
        self.bulk: list[tuple[float, int]] = []
        self.single: list[tuple[float, bool]] = []

    async def send_bulk(self, account: Account, items: list[Item], slot: str | None) -> list[Outcome]:
        self.bulk.append((time.monotonic(), len(items)))
        return [OK] * len(items)

    async def send_single(self, account: Account, item: Item, slot: str) -> Outcome:
        self.single.append((time.monotonic(), item.urgent))
        return OK


@pytest.fixture(params=[True, False], ids=["paced", "unpaced"])
async def paced_client(
    request: pytest.FixtureRequest, redis: Redis, store: AccountStore
) -> AsyncIterator[KlaviyoClient]:
    # Nothing is sent over HTTP (the senders are the test's): the URL is never called.
    async with make_client(
        redis, store, "http://127.0.0.1:9", rate_pace_burst=0.0 if request.param else None
    ) as c:
        yield c


def records_lane(client: KlaviyoClient, redis: Redis, account: Account, sent: Sent) -> Lane:
    """The record lane as ``AccountLanes`` makes it, for an account with a backlog of 100,000 events while a
    small account is about (``pb:pace``); its senders are the test's."""
    sync = BulkSync(Syncer(client, redis))
    sync.pacing = True
    lanes = sync.lanes(account)
    lanes.backlog_events = 100_000
    lane = lanes.records
    lane.send_single, lane.send_bulk = sent.send_single, sent.send_bulk
    return lane


def item(n: int, *, urgent: bool = False) -> Item:
    future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
    return Item({"n": n}, b'{"n":%d}' % n, 1, urgent, f"S{n:05d}", lambda: True, future)


async def test_a_backlog_is_paced_over_the_window_and_a_fresh_event_is_not(
    paced_client: KlaviyoClient, redis: Redis, account: Account
) -> None:
    paced = paced_client.limiter.pace_burst is not None
    sent = Sent()
    lane = records_lane(paced_client, redis, account, sent)
    futures = [lane.submit(account, item(n)) for n in range(BACKLOG_ITEMS)]
    # A fresh event arrives while the backlog is being sent.
    await asyncio.sleep(0.2)
    fresh_at = time.monotonic()
    fresh = lane.submit(account, item(99_999, urgent=True))
    assert (await asyncio.wait_for(fresh, 2)).verdict.value == "ok"
    fresh_sent = next(t for t, urgent in sent.single if urgent)
    # It goes ahead of the backlog's items (urgent first) and outside the pace: at once.
    assert fresh_sent - fresh_at < 0.05
    outcomes = await asyncio.wait_for(asyncio.gather(*futures), 20)
    assert {o.verdict.value for o in outcomes} == {"ok"}
    assert sum(n for _, n in sent.bulk) + sum(1 for _, urgent in sent.single if not urgent) == BACKLOG_ITEMS

    bulk_gaps = [b[0] - a[0] for a, b in itertools.pairwise(sent.bulk)]
    overflow = [t for t, urgent in sent.single if not urgent]
    assert len(sent.bulk) >= 2
    assert len(overflow) >= 20
    # Singles let through in the first 50 ms after the first one (the single endpoint's burst window is 45 ms).
    first_burst = sum(1 for t in overflow if t - overflow[0] < 0.05)
    if paced:
        # One bulk request per 1/15 of the window, and the overflow at 1/750 of it: never in a burst.
        assert min(bulk_gaps) > BULK_PACE_S - 0.01
        assert first_burst <= 0.05 / SINGLE_PACE_S + 2
    else:
        # Held to the windows only, the backlog spends the burst budgets at once: three bulk requests back to
        # back (3 a second), dozens of singles (75 a second) in the first burst window.
        assert min(bulk_gaps) < BULK_PACE_S / 2
        assert first_burst > 0.05 / SINGLE_PACE_S + 10


async def refreshed(redis: Redis, lanes: AccountLanes, *, fresh: bool = False) -> None:
    """Let ``lanes`` read their account's depth and ``pb:pace`` (and, with ``fresh``, say a small account's
    fresh events were worked on, if theirs is small)."""
    if fresh:
        lanes.take_urgent()  # what a serial received moments ago asks before its first write
    # The refresher runs while the account has work in this process: pretend a serial is in flight.
    lanes.in_flight = 1
    lanes.watch_backlog(redis, 0.01)
    await asyncio.sleep(0.05)
    lanes.in_flight = 0


async def test_backlogs_are_paced_only_while_a_small_account_has_fresh_events(
    redis: Redis, store: AccountStore, account: Account
) -> None:
    """``keys.PACE_BACKLOGS``: set by the lanes of an account with a small backlog working fresh events, read by
    every account's lanes; a big backlog with no such account about is not held back."""
    other = await put_account(store, "globex", klaviyo_api_key=API_KEY)
    async with make_client(redis, store, "http://127.0.0.1:9") as client:
        sync = BulkSync(Syncer(client, redis))
        big, small = sync.lanes(account), sync.lanes(other)
        await redis.set(account_keys(account.account_id).depth, 100_000)
        await redis.set(account_keys(other.account_id).depth, 3)

        await refreshed(redis, big, fresh=True)
        assert big.backlog_events == 100_000
        assert not big.paced()
        # The last, old events of a backlog (a small depth, nothing fresh) hold nobody back.
        await refreshed(redis, small)
        assert not await redis.exists(PACE_BACKLOGS)
        await refreshed(redis, big)
        assert not big.paced()
        # Fresh events of a small account: it says so for a minute, and the big backlog is paced from its next
        # refresh on. The small account's own requests are never paced.
        await refreshed(redis, small, fresh=True)
        assert 55_000 < await redis.pttl(PACE_BACKLOGS) <= 60_000
        assert not small.paced()
        await refreshed(redis, big)
        assert big.paced()
        # Once the minute is over with no such account about, backlogs go unpaced again.
        await redis.delete(PACE_BACKLOGS)
        await refreshed(redis, big)
        assert not big.paced()


async def test_a_worker_with_pacing_off_does_not_say_backlogs_are_paced(
    redis: Redis, store: AccountStore, account: Account
) -> None:
    async with make_client(redis, store, "http://127.0.0.1:9", rate_pace_burst=None) as client:
        lanes = BulkSync(Syncer(client, redis)).lanes(account)
        await redis.set(account_keys(account.account_id).depth, 3)
        await refreshed(redis, lanes, fresh=True)
        assert lanes.backlog_events == 3
        assert not await redis.exists(PACE_BACKLOGS)
