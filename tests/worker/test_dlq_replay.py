"""A DLQ replay never takes an account's backlog over its replay limit, against a real Redis: the high-water mark
(the producer answers 503 beyond it) less the reserve kept for live ingest. It replays the oldest entries that
fit, atomically, and leaves the rest in the DLQ."""

from __future__ import annotations

from collections.abc import Awaitable

import orjson
import pytest
from redis.asyncio import Redis

from passbridge.keys import account_keys
from passbridge.queue import BacklogFull, enqueue
from passbridge.settings import Settings, replay_limit
from worker import dlq

from .helpers import fill_dlq, pass_event, put, settle_pending

DAY_MS = 86_400_000


async def where(redis: Redis, account_id: str, event_ids: list[str]) -> tuple[set[str], set[str]]:
    """(ids in the DLQ, ids pending in a mailbox) among ``event_ids``."""
    keys = account_keys(account_id)
    in_dlq = {
        i for i, raw in zip(event_ids, await redis.hmget(keys.dlq_entries, event_ids), strict=True) if raw
    }
    pending: set[str] = set()
    for serial in ("S1", "S2", "S3"):
        for member in await redis.zrange(keys.mailbox(serial), 0, -1):
            pending.add(orjson.loads(member[12:])["id"])
    return in_dlq, pending & set(event_ids)


async def test_a_replay_beyond_the_room_replays_the_oldest_that_fit_and_leaves_the_rest(redis: Redis) -> None:
    keys = account_keys("a")
    await fill_dlq(redis, "a", ["S1", "S2", "S3"], 250)
    oldest_first = [m.decode() for m in await redis.zrange(keys.dlq, 0, -1)]
    assert len(oldest_first) == 750
    await put(redis, *(pass_event("a", "LIVE", n) for n in range(100)))
    # A replay limit of 450 (500 less the tenth kept for live ingest): room for 350, one whole chunk of 200 and
    # part of the second.
    high_water, reserve, limit = 500, 0.1, 450

    def replay(ids: list[str]) -> Awaitable[dlq.ReplayOutcome]:
        return dlq.replay(
            redis, "a", ids, high_water=high_water, reserve=reserve, history_retention_ms=DAY_MS
        )

    done = await replay(oldest_first)
    assert (done.replayed, done.missing, done.full, done.depth, done.limit) == (350, 0, True, limit, limit)
    assert done.left == oldest_first[350:]
    assert int(await redis.get(keys.depth)) == limit
    # Each entry is in exactly one place: the DLQ (the newest 400) or its mailbox (the oldest 350).
    in_dlq, pending = await where(redis, "a", oldest_first)
    assert in_dlq == set(oldest_first[350:])
    assert pending == set(oldest_first[:350])
    assert await dlq.count(redis, "a") == 400

    # No room: nothing moves, and the answer says so.
    again = await replay(done.left)
    assert (again.replayed, again.full, again.left, again.depth) == (0, True, oldest_first[350:], limit)
    assert await dlq.count(redis, "a") == 400

    # The workers drain 60: the next wave fills exactly those 60, oldest first.
    assert await settle_pending(redis, "a", 60) == 60
    wave = await replay(again.left)
    assert (wave.replayed, wave.depth, wave.left) == (60, limit, oldest_first[410:])
    in_dlq, _ = await where(redis, "a", oldest_first)
    assert in_dlq == set(oldest_first[410:])

    # The producer still has the reserve for live ingest, up to the mark; a replay gets none of it.
    live = [pass_event("a", "LIVE", 100 + n) for n in range(high_water - limit)]
    assert (await enqueue(redis, "a", live, high_water=high_water, dedup_window_s=3600)).depth == high_water
    with pytest.raises(BacklogFull):
        await enqueue(redis, "a", [pass_event("a", "LIVE", 200)], high_water=high_water, dedup_window_s=3600)
    assert await settle_pending(redis, "a", 40) == 40  # 460 pending: under the mark, still over the limit
    assert (await replay(wave.left)).replayed == 0
    assert await dlq.count(redis, "a") == 340


async def test_a_reserve_of_0_replays_up_to_the_mark(redis: Redis) -> None:
    """PASSBRIDGE_REPLAY_RESERVE=0: what a replay did before there was a reserve; live ingest gets no room."""
    await fill_dlq(redis, "a", ["S1"], 30)
    ids = [m.decode() for m in await redis.zrange(account_keys("a").dlq, 0, -1)]
    done = await dlq.replay(redis, "a", ids, high_water=20, reserve=0, history_retention_ms=DAY_MS)
    assert (done.replayed, done.depth, done.limit, done.left) == (20, 20, 20, ids[20:])
    with pytest.raises(BacklogFull):
        await enqueue(redis, "a", [pass_event("a", "LIVE", 0)], high_water=20, dedup_window_s=3600)


@pytest.mark.parametrize(
    ("high_water", "reserve", "limit"),
    [
        (150, 0.1, 135),
        (1000, 0.9, 100),
        (100, 0.7, 30),
        (10, 0.05, 9),
        (7, 0.5, 3),
        (1_000_000, 0.1, 900_000),
    ],
)
def test_the_replay_limit_is_the_mark_less_the_reserve_as_written_rounded_down(
    high_water: int, reserve: float, limit: int
) -> None:
    # 1000 x (1 - 0.9) is 99.99999999999997 in binary floats: the limit is taken from the reserve as written.
    assert replay_limit(high_water, reserve) == limit
    assert Settings(backlog_high_water=high_water, replay_reserve=reserve).replay_limit == limit


async def test_a_lowered_high_water_mark_replays_nothing_and_missing_ids_are_not_left(redis: Redis) -> None:
    await fill_dlq(redis, "a", ["S1"], 3)
    await put(redis, *(pass_event("a", "LIVE", n) for n in range(5)))
    done = await dlq.replay(
        redis, "a", ["gone", "a-S1-0", "a-S1-1"], high_water=4, reserve=0.1, history_retention_ms=DAY_MS
    )
    # Already over the limit (3: the mark was lowered): nothing replayed; an id not in the DLQ is not "left".
    assert (done.replayed, done.missing, done.left, done.depth, done.full) == (
        0,
        1,
        ["a-S1-0", "a-S1-1"],
        5,
        True,
    )
    assert await dlq.count(redis, "a") == 3


async def test_stop_leaves_the_rest_between_atomic_steps(redis: Redis) -> None:
    await fill_dlq(redis, "a", ["S1"], 450)
    ids = [m.decode() for m in await redis.zrange(account_keys("a").dlq, 0, -1)]
    chunks: list[int] = []
    done = await dlq.replay(
        redis,
        "a",
        ids,
        high_water=10_000,
        reserve=0.1,
        history_retention_ms=DAY_MS,
        progress=chunks.append,
        stop=lambda: len(chunks) >= 2,
    )
    assert (done.replayed, done.full, done.left, chunks) == (
        2 * dlq.CHUNK,
        False,
        ids[2 * dlq.CHUNK :],
        [200, 200],
    )
    assert await dlq.count(redis, "a") == 450 - 2 * dlq.CHUNK
