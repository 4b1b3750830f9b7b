"""A DLQ replay never takes an account's backlog over its high-water mark (the producer answers 503 beyond it),
against a real Redis: it replays the oldest entries that fit, atomically, and leaves the rest in the DLQ."""

from __future__ import annotations

import orjson
import pytest
from redis.asyncio import Redis

from passbridge.keys import account_keys
from passbridge.queue import BacklogFull, enqueue
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
    high_water = 450  # room for 350: one whole chunk of 200, and part of the second

    done = await dlq.replay(redis, "a", oldest_first, high_water=high_water, history_retention_ms=DAY_MS)
    assert (done.replayed, done.missing, done.full, done.depth) == (350, 0, True, high_water)
    assert done.left == oldest_first[350:]
    assert int(await redis.get(keys.depth)) == high_water
    # Each entry is in exactly one place: the DLQ (the newest 400) or its mailbox (the oldest 350).
    in_dlq, pending = await where(redis, "a", oldest_first)
    assert in_dlq == set(oldest_first[350:])
    assert pending == set(oldest_first[:350])
    assert await dlq.count(redis, "a") == 400
    # The producer sees the same limit: the account is full, not over.
    with pytest.raises(BacklogFull):
        await enqueue(redis, "a", [pass_event("a", "LIVE", 100)], high_water=high_water, dedup_window_s=3600)

    # No room: nothing moves, and the answer says so.
    again = await dlq.replay(redis, "a", done.left, high_water=high_water, history_retention_ms=DAY_MS)
    assert (again.replayed, again.full, again.left, again.depth) == (0, True, oldest_first[350:], high_water)
    assert await dlq.count(redis, "a") == 400

    # The workers drain 60: the next wave fills exactly those 60, oldest first.
    assert await settle_pending(redis, "a", 60) == 60
    wave = await dlq.replay(redis, "a", again.left, high_water=high_water, history_retention_ms=DAY_MS)
    assert (wave.replayed, wave.depth, wave.left) == (60, high_water, oldest_first[410:])
    in_dlq, _ = await where(redis, "a", oldest_first)
    assert in_dlq == set(oldest_first[410:])


async def test_a_lowered_high_water_mark_replays_nothing_and_missing_ids_are_not_left(redis: Redis) -> None:
    await fill_dlq(redis, "a", ["S1"], 3)
    await put(redis, *(pass_event("a", "LIVE", n) for n in range(5)))
    done = await dlq.replay(
        redis, "a", ["gone", "a-S1-0", "a-S1-1"], high_water=4, history_retention_ms=DAY_MS
    )
    # Already over the mark (it was lowered): nothing replayed; an id not in the DLQ is not "left" in it.
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
