"""The express lane's part of the queue protocol against a real Redis: which lane may claim what, and the
producer's announcements (claim.lua, _enqueue_core.lua; worker/express.py)."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from passbridge.keys import ACTIVE_ACCOUNTS, EXPRESS_BUSY, EXPRESS_NOTIFY, EXPRESS_ON, NOTIFY, account_keys
from worker.queue import WorkQueue

from .helpers import pass_event, put

SMALL = 5
GRACE_MS = 300


def wq(redis: Redis, worker: str) -> WorkQueue:
    return WorkQueue(redis, worker_id=worker, lease_ms=10_000)


async def express_alive(redis: Redis, *, busy: bool = True) -> None:
    """Express lanes alive and (``busy``) some worker draining a backlog."""
    await redis.set(EXPRESS_ON, SMALL, px=60_000)
    if busy:
        await redis.set(EXPRESS_BUSY, 1, px=60_000)


async def main_claim(redis: Redis) -> list[str]:
    got = await wq(redis, "main").claim(50, grace_ms=GRACE_MS)
    return sorted(f"{lease.account_id}/{lease.serial}" for lease in got.leases)


async def express_claim(redis: Redis, accounts: tuple[str, ...] = ()) -> list[str]:
    got = await wq(redis, "express").claim(50, express=True, grace_ms=GRACE_MS, accounts=accounts)
    return sorted(f"{lease.account_id}/{lease.serial}" for lease in got.leases)


def test_key_names_match_lua() -> None:
    # _enqueue_core.lua derives the express keys from NOTIFY; keys.py must name the same keys.
    assert f"{NOTIFY}:x" == EXPRESS_NOTIFY
    assert f"{NOTIFY}:x:on" == EXPRESS_ON
    assert f"{NOTIFY}:x:busy" == EXPRESS_BUSY


class TestAnnouncements:
    async def test_no_express_lane_no_announcement(self, redis: Redis) -> None:
        await put(redis, pass_event("b", "S1", 1))
        assert await redis.llen(EXPRESS_NOTIFY) == 0

    async def test_small_account_is_announced(self, redis: Redis) -> None:
        await express_alive(redis)
        await put(redis, pass_event("b", "S1", 1))
        await put(redis, pass_event("b", "S2", 1))
        assert await redis.lrange(EXPRESS_NOTIFY, 0, -1) == [b"b", b"b"]

    async def test_no_busy_worker_no_announcement_and_no_express_claim(self, redis: Redis) -> None:
        # While no worker drains a backlog, the workers take every event themselves.
        await express_alive(redis, busy=False)
        await put(redis, pass_event("b", "S1", 1))
        assert await redis.llen(EXPRESS_NOTIFY) == 0
        assert await express_claim(redis, ("b",)) == []
        assert await main_claim(redis) == ["b/S1"]

    async def test_big_account_is_not_announced(self, redis: Redis) -> None:
        await express_alive(redis)
        await put(redis, *[pass_event("a", f"S{i}", 1) for i in range(SMALL + 1)])
        assert await redis.llen(EXPRESS_NOTIFY) == 0
        # Every further event of the big account is not announced either.
        await put(redis, pass_event("a", "S-late", 1))
        assert await redis.llen(EXPRESS_NOTIFY) == 0


class TestLanes:
    async def test_without_express_lane_main_takes_everything_at_once(self, redis: Redis) -> None:
        await put(redis, pass_event("b", "S1", 1))
        assert await main_claim(redis) == ["b/S1"]

    async def test_small_account_goes_to_the_express_lane(self, redis: Redis) -> None:
        await express_alive(redis)
        await put(redis, pass_event("b", "S1", 1))
        assert await main_claim(redis) == []
        # The main lane rescheduled the account for when the grace runs out, not sooner (no spinning).
        score = await redis.zscore(ACTIVE_ACCOUNTS, "b")
        assert score is not None
        assert await express_claim(redis, ("b",)) == ["b/S1"]

    async def test_main_takes_a_small_account_after_the_grace(self, redis: Redis) -> None:
        await express_alive(redis)
        await put(redis, pass_event("b", "S1", 1))
        assert await main_claim(redis) == []
        due = await redis.zscore(ACTIVE_ACCOUNTS, "b")
        ready_at = await redis.zscore(account_keys("b").ready, "S1")
        assert due is not None
        assert ready_at is not None
        assert due == ready_at + GRACE_MS
        await asyncio.sleep(GRACE_MS / 1000 + 0.05)
        assert await main_claim(redis) == ["b/S1"]

    async def test_an_idle_worker_takes_a_small_account_at_once(self, redis: Redis) -> None:
        # Only a busy worker (draining a backlog) leaves small accounts to the express lanes.
        await express_alive(redis)
        await put(redis, pass_event("b", "S1", 1))
        got = await wq(redis, "idle").claim(50, grace_ms=GRACE_MS, defer_small=False)
        assert [lease.serial for lease in got.leases] == ["S1"]

    async def test_big_account_is_never_the_express_lanes(self, redis: Redis) -> None:
        await express_alive(redis)
        await put(redis, *[pass_event("a", f"S{i}", 1) for i in range(SMALL + 1)])
        await put(redis, pass_event("b", "S1", 1))
        assert await express_claim(redis, ("a", "b")) == ["b/S1"]
        assert await express_claim(redis) == []
        assert len(await main_claim(redis)) == SMALL + 1

    async def test_express_lane_finds_due_small_accounts_without_announcement(self, redis: Redis) -> None:
        # Retries and released serials are not announced: the express lane's periodic claim walks `active`.
        await express_alive(redis)
        await put(redis, pass_event("b", "S1", 1))
        await redis.delete(EXPRESS_NOTIFY)
        assert await main_claim(redis) == []  # pushes b's schedule to the end of the grace
        assert await express_claim(redis) == ["b/S1"]

    async def test_dead_express_lane_stops_the_diversion(self, redis: Redis) -> None:
        await redis.set(EXPRESS_ON, SMALL, px=100)
        await asyncio.sleep(0.15)
        await put(redis, pass_event("b", "S1", 1))
        assert await redis.llen(EXPRESS_NOTIFY) == 0
        assert await main_claim(redis) == ["b/S1"]


async def test_an_express_claim_takes_the_announcements_queued_behind_the_one_it_woke_on(
    redis: Redis,
) -> None:
    await express_alive(redis)
    for account, serial in (("b", "B1"), ("c", "C1"), ("d", "D1"), ("b", "B2")):
        await put(redis, pass_event(account, serial, 1))
    assert await redis.lrange(EXPRESS_NOTIFY, 0, -1) == [b"b", b"c", b"d", b"b"]
    assert await redis.lpop(EXPRESS_NOTIFY) == b"b"  # what the lane's BLPOP returns
    # One claim, naming only the account it woke on, takes every announced account's serials and the queue.
    assert await express_claim(redis, ("b",)) == ["b/B1", "b/B2", "c/C1", "d/D1"]
    assert await redis.llen(EXPRESS_NOTIFY) == 0


async def test_a_main_claim_leaves_the_express_announcements_alone(redis: Redis) -> None:
    await express_alive(redis)
    await put(redis, pass_event("b", "B1", 1))
    await wq(redis, "main").claim(50, grace_ms=GRACE_MS, accounts=("b",))
    assert await redis.lrange(EXPRESS_NOTIFY, 0, -1) == [b"b"]


async def test_an_express_claim_reads_each_serials_snapshot_in_the_same_step(redis: Redis) -> None:
    # The express lane's claim also returns what the engine reads right after a claim (the mailbox's first
    # entries, the stored state, the profile-job mark): one round trip less for a small account's event.
    await express_alive(redis)
    await put(redis, *(pass_event("b", "S1", n) for n in (1, 2, 3)), pass_event("b", "S2", 1))
    keys = account_keys("b")
    await redis.hset(keys.state, "S1", b'{"stored": "state"}')
    await redis.hset(keys.profile_jobs, "S2", b'{"job": "j1"}')
    q = WorkQueue(redis, worker_id="express", lease_ms=10_000, head_batch=2)
    claimed = await q.claim(50, express=True, grace_ms=GRACE_MS, accounts=("b",), snapshot=True)
    assert sorted(lease.serial for lease in claimed.leases) == ["S1", "S2"]
    assert claimed.snapshots is not None
    # Exactly what the separate read returns for the same leases.
    assert claimed.snapshots == await q.snapshot(claimed.leases)
    by_serial = dict(zip((lease.serial for lease in claimed.leases), claimed.snapshots, strict=True))
    assert len(by_serial["S1"].heads) == 2
    assert by_serial["S1"].state == b'{"stored": "state"}'
    assert not by_serial["S1"].profile_job
    assert by_serial["S2"].state is None
    assert by_serial["S2"].profile_job
    assert len(by_serial["S2"].heads) == 1


async def test_a_claim_without_snapshot_leaves_it_to_the_engine(redis: Redis) -> None:
    await put(redis, pass_event("b", "S1", 1))
    claimed = await wq(redis, "main").claim(50)
    assert [lease.serial for lease in claimed.leases] == ["S1"]
    assert claimed.snapshots is None
