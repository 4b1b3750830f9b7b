"""The claim/lease/settle/release protocol against a real Redis: fencing, takeover, parking, fairness."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from datetime import datetime

import orjson
import pytest
from redis.asyncio import Redis

from passbridge.keys import ACTIVE_ACCOUNTS, NOTIFY, account_keys
from worker.history import timeline
from worker.queue import RENEW_PER_TRIP, Lease, SettleRequest, WorkQueue, split_member
from worker.scripts import Scripts

from .helpers import pass_event, put


def event_id(member: bytes) -> str:
    return str(orjson.loads(split_member(member)[1])["id"])


def wq(redis: Redis, worker: str = "w1", lease_ms: int = 10_000) -> WorkQueue:
    return WorkQueue(redis, worker_id=worker, lease_ms=lease_ms)


class TestClaim:
    """Claims lease due serials once, under unique tokens."""

    async def test_claim_moves_ready_to_leased(self, redis: Redis) -> None:
        await put(redis, pass_event("a", "S1", 1), pass_event("a", "S2", 1))
        q = wq(redis)
        got = await q.claim(10)
        assert sorted(lease.serial for lease in got.leases) == ["S1", "S2"]
        keys = account_keys("a")
        assert await redis.zcard(keys.ready) == 0
        assert await redis.zcard(keys.leased) == 2
        tokens = await redis.hgetall(keys.lease_tokens)
        assert {k.decode(): v.decode() for k, v in tokens.items()} == {
            lease.serial: lease.token for lease in got.leases
        }
        assert all(lease.worker_id == "w1" for lease in got.leases)
        assert len({lease.token for lease in got.leases}) == 2
        # Nothing left to claim, for this or any other worker.
        assert (await wq(redis, "w2").claim(10)).leases == []

    async def test_enqueue_while_leased_does_not_offer_the_serial(self, redis: Redis) -> None:
        await put(redis, pass_event("a", "S1", 1))
        q = wq(redis)
        (lease,) = (await q.claim(10)).leases
        await put(redis, pass_event("a", "S1", 2))
        assert await redis.zcard(account_keys("a").ready) == 0
        assert (await wq(redis, "w2").claim(10)).leases == []
        # The holder sees the new entry at the head; release re-offers the serial.
        assert await q.release(lease)
        assert (await redis.zrange(account_keys("a").ready, 0, -1)) == [b"S1"]

    async def test_snapshot_returns_heads_in_order_and_state(self, redis: Redis) -> None:
        # Arrival order 3, 1, 2 — the mailbox orders by occurred_at.
        await put(redis, pass_event("a", "S1", 3))
        await put(redis, pass_event("a", "S1", 1), pass_event("a", "S1", 2))
        await redis.hset(account_keys("a").state, "S1", b'{"x":1}')
        q = wq(redis)
        (lease,) = (await q.claim(1)).leases
        (snap,) = await q.snapshot([lease])
        assert [event_id(m) for m in snap.heads] == ["a-S1-1", "a-S1-2", "a-S1-3"]
        # Arrival sequence numbers record the real arrival order: event 3 came first.
        assert [split_member(m)[0] for m in snap.heads] == [2, 3, 1]
        assert snap.state == b'{"x":1}'

    async def test_ties_in_occurred_at_keep_arrival_order(self, redis: Redis) -> None:
        evs = [pass_event("a", "S1", n, offset_s=5) for n in (7, 3, 9)]
        for ev in evs:
            await put(redis, ev)
        q = wq(redis)
        (lease,) = (await q.claim(1)).leases
        (snap,) = await q.snapshot([lease])
        assert [event_id(m) for m in snap.heads] == ["a-S1-7", "a-S1-3", "a-S1-9"]


async def test_snapshot_says_which_serials_a_profile_import_job_may_still_carry(redis: Redis) -> None:
    await put(redis, *(pass_event(a, s, 1) for a in ("a", "b") for s in ("S1", "S2", "S3")))
    await redis.hset(account_keys("a").profile_jobs, "S2", b'{"job":"j1","at":1}')
    await redis.hset(account_keys("b").profile_jobs, mapping={"S1": b'{"job":"","at":1}', "S3": b"{}"})
    q = wq(redis)
    leases = (await q.claim(6)).leases
    # Interleaved accounts: each answer must land on its own lease.
    leases = sorted(leases, key=lambda lease: (lease.serial, lease.account_id))
    snaps = await q.snapshot(leases)
    marked = {
        f"{lease.account_id}/{lease.serial}"
        for lease, snap in zip(leases, snaps, strict=True)
        if snap.profile_job
    }
    assert marked == {"a/S2", "b/S1", "b/S3"}
    assert all(len(snap.heads) == 1 for snap in snaps)
    assert [orjson.loads(split_member(snap.heads[0])[1])["s"] for snap in snaps] == [
        lease.serial for lease in leases
    ]


class TestSettle:
    """Settling removes entries, stores state and is fenced by the token."""

    async def test_settle_removes_and_returns_next_head(self, redis: Redis) -> None:
        await put(redis, *(pass_event("a", "S1", n) for n in range(3)))
        q = wq(redis)
        (lease,) = (await q.claim(1)).leases
        (snap,) = await q.snapshot([lease])
        keys = account_keys("a")
        assert int(await redis.get(keys.depth)) == 3
        entry = b'[%d,"written","a-S1-0"]' % int(time.time() * 1000)
        done = await q.settle(lease, [snap.heads[0]], state=b'{"s":0}', history=[entry])
        assert done.ok
        assert done.removed == 1
        assert done.heads == snap.heads[1:]
        assert int(await redis.get(keys.depth)) == 2
        assert await redis.hget(keys.state, "S1") == b'{"s":0}'
        # The producer writes no history: the settled event's "ingested" entry is stored with its "written"
        # one (at its received_at); the pending events' steps are read from the mailbox.
        history = await redis.lrange(keys.history("S1"), 0, -1)
        assert [orjson.loads(h)[1:3] for h in history] == [["ingested", "a-S1-0"], ["written", "a-S1-0"]]
        # Stamps: the ingested entry carries the event's arrival sequence, the written one the account's
        # last sequence when it was stored (all three events had arrived).
        assert [orjson.loads(h)[4] for h in history] == [split_member(snap.heads[0])[0], 3]
        received = orjson.loads(split_member(snap.heads[0])[1])["r"]
        assert orjson.loads(history[0])[0] == int(datetime.fromisoformat(received).timestamp() * 1000)
        assert 0 < await redis.pttl(keys.history("S1")) <= 7 * 86_400_000
        assert [(e.kind, e.event_id) for e in await timeline(redis, "a", "S1")] == [
            ("ingested", "a-S1-0"),
            ("ingested", "a-S1-1"),
            ("ingested", "a-S1-2"),
            ("written", "a-S1-0"),
        ]

    async def test_history_older_than_the_retention_is_dropped(self, redis: Redis) -> None:
        await put(redis, pass_event("a", "S1", 1), pass_event("a", "S1", 2))
        keys = account_keys("a")
        await redis.lpush(keys.history("S1"), b'[1000,"ingested","ancient"]')
        q = WorkQueue(redis, worker_id="w", history_retention_ms=60_000)
        (lease,) = (await q.claim(1)).leases
        (snap,) = await q.snapshot([lease])
        entry = b'[%d,"written","a-S1-1"]' % int(time.time() * 1000)
        assert (await q.settle(lease, snap.heads[:1], history=[entry])).ok
        history = [orjson.loads(h)[1:3] for h in await redis.lrange(keys.history("S1"), 0, -1)]
        assert history == [["ingested", "a-S1-1"], ["written", "a-S1-1"]]
        assert 0 < await redis.pttl(keys.history("S1")) <= 60_000

    async def test_a_large_settle_drops_as_many_expired_entries_as_it_appends(self, redis: Redis) -> None:
        # A busy serial's list never expires (each append pushes its TTL back): if a settle appending 21
        # entries dropped only 16 expired ones, entries past the retention would pile up settle after settle.
        await put(redis, pass_event("a", "S1", 1))
        keys = account_keys("a")
        await redis.rpush(keys.history("S1"), *(b'[1000,"attempt","ancient-%d"]' % i for i in range(30)))
        q = WorkQueue(redis, worker_id="w", history_retention_ms=60_000)
        (lease,) = (await q.claim(1)).leases
        (snap,) = await q.snapshot([lease])
        now = int(time.time() * 1000)
        entries = [b'[%d,"attempt","a-S1-1",{"n":%d}]' % (now, i) for i in range(19)]
        entries.append(b'[%d,"written","a-S1-1"]' % now)
        assert (await q.settle(lease, snap.heads[:1], history=entries)).ok
        history = [orjson.loads(h)[2] for h in await redis.lrange(keys.history("S1"), 0, -1)]
        assert history == ["a-S1-1"] * 21

    async def test_settle_with_a_foreign_token_writes_nothing(self, redis: Redis) -> None:
        await put(redis, pass_event("a", "S1", 1))
        q = wq(redis)
        (lease,) = (await q.claim(1)).leases
        (snap,) = await q.snapshot([lease])
        forged = Lease(lease.account_id, lease.serial, lease.token + "0")
        done = await q.settle(forged, snap.heads, state=b"{}", dead=[("e", b"{}")])
        assert not done.ok
        keys = account_keys("a")
        assert await redis.zcard(keys.mailbox("S1")) == 1
        assert int(await redis.get(keys.depth)) == 1
        assert await redis.hget(keys.state, "S1") is None
        assert await redis.zcard(keys.dlq) == 0
        assert not await q.release(forged)
        assert await redis.zcard(keys.leased) == 1

    async def test_settle_dead_letters_and_drops_retry_records(self, redis: Redis) -> None:
        await put(redis, pass_event("a", "S1", 1), pass_event("a", "S1", 2))
        keys = account_keys("a")
        await redis.hset(keys.retries, "a-S1-1", b'{"attempts":3}')
        q = wq(redis)
        (lease,) = (await q.claim(1)).leases
        (snap,) = await q.snapshot([lease])
        done = await q.settle(lease, [snap.heads[0]], retry_fields=["a-S1-1"], dead=[("a-S1-1", b'{"r":1}')])
        assert done.ok
        assert done.removed == 1
        assert len(done.heads) == 1
        assert await redis.hget(keys.retries, "a-S1-1") is None
        assert await redis.zrange(keys.dlq, 0, -1) == [b"a-S1-1"]
        assert await redis.hget(keys.dlq_entries, "a-S1-1") == b'{"r":1}'
        assert await redis.hget(keys.state, "S1") is None  # '' keeps the state untouched


class TestRelease:
    """Releasing ends the lease and re-offers serials that still have events."""

    async def test_release_of_an_empty_serial_forgets_it(self, redis: Redis) -> None:
        await put(redis, pass_event("a", "S1", 1))
        q = wq(redis)
        (lease,) = (await q.claim(1)).leases
        (snap,) = await q.snapshot([lease])
        assert (await q.settle(lease, snap.heads)).heads == []
        assert await q.release(lease)
        keys = account_keys("a")
        for key in (keys.ready, keys.leased):
            assert await redis.zcard(key) == 0
        assert await redis.hlen(keys.lease_tokens) == 0
        assert not await redis.exists(keys.mailbox("S1"))
        assert int(await redis.get(keys.depth)) == 0
        # Nothing left: the account leaves the scheduling index.
        assert await redis.zscore(ACTIVE_ACCOUNTS, "a") is None

    async def test_parked_serial_waits_until_its_not_before(self, redis: Redis) -> None:
        await put(redis, pass_event("a", "S1", 1), pass_event("a", "S2", 1))
        q = wq(redis)
        leases = {lease.serial: lease for lease in (await q.claim(2)).leases}
        assert await q.release(leases["S1"], delay_ms=400, retry=("a-S1-1", b'{"attempts":1}'))
        assert await q.release(leases["S2"])
        keys = account_keys("a")
        assert await redis.hget(keys.retries, "a-S1-1") == b'{"attempts":1}'
        # The parked serial blocks only itself: S2 is claimable at once, S1 only after its delay.
        assert [lease.serial for lease in (await q.claim(10)).leases] == ["S2"]
        assert (await q.claim(10)).leases == []
        await asyncio.sleep(0.45)
        assert [lease.serial for lease in (await q.claim(10)).leases] == ["S1"]

    async def test_new_event_for_a_parked_serial_keeps_it_parked(self, redis: Redis) -> None:
        await put(redis, pass_event("a", "S1", 1))
        q = wq(redis)
        (lease,) = (await q.claim(1)).leases
        await q.release(lease, delay_ms=60_000)
        await put(redis, pass_event("a", "S1", 2))
        assert (await q.claim(10)).leases == []
        score = await redis.zscore(account_keys("a").ready, "S1")
        assert score is not None

    async def test_fresh_serial_of_an_account_with_only_parked_serials_is_due_at_once(
        self, redis: Redis
    ) -> None:
        await put(redis, pass_event("a", "S1", 1))
        q = wq(redis)
        (lease,) = (await q.claim(1)).leases
        await q.release(lease, delay_ms=60_000)
        assert (await q.claim(1)).leases == []
        # Nothing due: the account is scheduled seconds ahead (its lease expiry at the claim).
        assert await redis.zscore(ACTIVE_ACCOUNTS, "a") > time.time() * 1000 + 5_000
        await put(redis, pass_event("a", "S2", 1))
        assert [lease.serial for lease in (await q.claim(10)).leases] == ["S2"]

    async def test_release_wakes_idle_workers_only_when_due(self, redis: Redis) -> None:
        await put(redis, pass_event("a", "S1", 1), pass_event("a", "S2", 1))
        await redis.delete(NOTIFY)
        q = wq(redis)
        leases = {lease.serial: lease for lease in (await q.claim(2)).leases}
        await q.release(leases["S1"], delay_ms=60_000)
        assert await redis.llen(NOTIFY) == 0
        await q.release(leases["S2"])
        assert await redis.lrange(NOTIFY, 0, -1) == [b"a"]


class TestLeaseExpiry:
    """Leases end by themselves: renewals keep them, expiry hands the serial to another worker."""

    async def test_expired_lease_is_taken_over_and_the_old_holder_is_fenced(self, redis: Redis) -> None:
        await put(redis, pass_event("a", "S1", 1))
        dead = wq(redis, "dead", lease_ms=200)
        (old,) = (await dead.claim(1)).leases
        (snap,) = await dead.snapshot([old])
        alive = wq(redis, "alive")
        assert (await alive.claim(1)).leases == []
        await asyncio.sleep(0.25)
        got = await alive.claim(1)
        assert got.taken_over == 1
        (new,) = got.leases
        assert new.serial == "S1"
        assert new.token != old.token
        assert new.worker_id == "alive"
        # The old holder can neither settle, renew nor release.
        assert not (await dead.settle(old, snap.heads)).ok
        assert await dead.renew("a", [old]) == [False]
        assert not await dead.release(old)
        assert await redis.zcard(account_keys("a").mailbox("S1")) == 1
        assert (await alive.settle(new, snap.heads)).ok

    async def test_renewal_keeps_the_lease(self, redis: Redis) -> None:
        await put(redis, pass_event("a", "S1", 1))
        holder = wq(redis, "holder", lease_ms=300)
        (lease,) = (await holder.claim(1)).leases
        other = wq(redis, "other")
        for _ in range(4):
            await asyncio.sleep(0.15)
            assert await holder.renew("a", [lease]) == [True]
            got = await other.claim(1)
            assert got.leases == []
            assert got.taken_over == 0

    async def test_renew_many_in_small_trips_keeps_every_flag_in_order(self, redis: Redis) -> None:
        # More leases than one round trip carries, over two accounts: every lease renewed, in order, and a
        # lease taken away meanwhile reported lost at its place.
        n = RENEW_PER_TRIP + 37
        holder = wq(redis, "holder", lease_ms=5_000)
        await put(redis, *[pass_event("a", f"A{i:04d}", 1) for i in range(n)])
        leases = (await holder.claim(n)).leases
        await put(redis, *[pass_event("b", f"B{i:04d}", 1) for i in range(3)])
        leases += (await holder.claim(3)).leases
        by_account: dict[str, list[Lease]] = {}
        for lease in leases:
            by_account.setdefault(lease.account_id, []).append(lease)
        assert len(by_account["a"]) == n
        lost = by_account["a"][RENEW_PER_TRIP + 1]
        await redis.hdel(account_keys("a").lease_tokens, lost.serial)
        flags = await holder.renew_many(by_account)
        assert flags["b"] == [True, True, True]
        assert flags["a"] == [lease is not lost for lease in by_account["a"]]
        expiry = await redis.zscore(account_keys("a").leased, by_account["a"][-1].serial)
        assert expiry is not None
        assert expiry > time.time() * 1000 + 4_000

    async def test_expired_lease_of_an_empty_serial_is_just_dropped(self, redis: Redis) -> None:
        await put(redis, pass_event("a", "S1", 1))
        q = wq(redis, lease_ms=100)
        (lease,) = (await q.claim(1)).leases
        (snap,) = await q.snapshot([lease])
        await q.settle(lease, snap.heads)
        await asyncio.sleep(0.15)
        got = await wq(redis, "w2").claim(5)
        assert got.taken_over == 1
        assert got.leases == []
        keys = account_keys("a")
        assert await redis.zcard(keys.leased) == 0
        assert await redis.zcard(keys.ready) == 0

    async def test_sweep_takes_over_expired_leases(self, redis: Redis) -> None:
        await put(redis, pass_event("a", "S1", 1))
        q = wq(redis, lease_ms=100)
        await q.claim(1)
        # Simulate an account that fell out of the scheduling index; the sweep puts it back.
        await redis.zrem(ACTIVE_ACCOUNTS, "a")
        assert await q.sweep("a") == 0
        await asyncio.sleep(0.15)
        assert await q.sweep("a") == 1
        assert await redis.zrange(account_keys("a").ready, 0, -1) == [b"S1"]
        assert await redis.zscore(ACTIVE_ACCOUNTS, "a") is not None
        assert [lease.serial for lease in (await q.claim(1)).leases] == ["S1"]


class TestFairness:
    """Claims share a batch across due accounts round-robin."""

    async def test_a_big_backlog_does_not_starve_a_small_account(self, redis: Redis) -> None:
        await put(redis, *(pass_event("big", f"B{i}", 1) for i in range(200)))
        await put(redis, *(pass_event("small", f"S{i}", 1) for i in range(4)))
        q = wq(redis)
        got = await q.claim(8)
        assert Counter(lease.account_id for lease in got.leases) == {"big": 4, "small": 4}

    async def test_accounts_take_turns_across_claims(self, redis: Redis) -> None:
        for name in ("a", "b", "c"):
            await put(redis, *(pass_event(name, f"{name}{i}", 1) for i in range(10)))
        q = wq(redis)
        order = [lease.account_id for _ in range(9) for lease in (await q.claim(1)).leases]
        # Every window of three consecutive claims serves each account once.
        for i in range(0, 9, 3):
            assert sorted(order[i : i + 3]) == ["a", "b", "c"]

    async def test_per_account_cap(self, redis: Redis) -> None:
        await put(redis, *(pass_event("a", f"S{i}", 1) for i in range(20)))
        got = await wq(redis).claim(20, per_account=5)
        assert len(got.leases) == 5

    async def test_reserve_keeps_slots_for_an_account_holding_few(self, redis: Redis) -> None:
        await put(redis, *(pass_event("big", f"B{i}", 1) for i in range(100)))
        q = wq(redis)
        # A worker with 16 free slots and a reserve of 4: the backlog alone fills 12 of them.
        first = await q.claim(16, reserve=4, free=16)
        assert len(first.leases) == 12
        assert first.capped
        # Holding 12, with 4 free: nothing more for "big" ...
        again = await q.claim(4, reserve=4, free=4, held={"big": 12})
        assert again.leases == []
        assert again.capped
        # ... while a newcomer may use the reserve at once.
        await put(redis, *(pass_event("small", f"S{i}", 1) for i in range(2)))
        got = await q.claim(4, reserve=4, free=4, held={"big": 12})
        assert Counter(lease.account_id for lease in got.leases) == {"small": 2}

    async def test_an_account_holding_few_may_grow_to_the_reserve(self, redis: Redis) -> None:
        await put(redis, *(pass_event("a", f"S{i}", 1) for i in range(10)))
        got = await wq(redis).claim(8, reserve=4, free=5, held={"a": 1, "b": 50})
        # max(4 - 1, 5 - 4) = 3.
        assert len(got.leases) == 3

    async def test_no_reserve_is_the_plain_claim(self, redis: Redis) -> None:
        await put(redis, *(pass_event("a", f"S{i}", 1) for i in range(10)))
        got = await wq(redis).claim(10, reserve=0, free=10, held={"a": 50})
        assert len(got.leases) == 10
        assert not got.capped


class TestDefer:
    """An account out of Klaviyo budget is not claimed until the budget returns."""

    async def test_deferred_account_is_rescheduled_and_claimed_after(self, redis: Redis) -> None:
        await put(redis, pass_event("a", "S1", 1), pass_event("b", "S1", 1))
        keys = account_keys("a")
        await redis.set(keys.deferred, b"1", px=300)
        q = wq(redis)
        assert [lease.account_id for lease in (await q.claim(10)).leases] == ["b"]
        # Not due before the deferral ends, even after a fresh enqueue made it due.
        score = await redis.zscore(ACTIVE_ACCOUNTS, "a")
        assert score is not None
        assert score > time.time() * 1000 + 100
        await put(redis, pass_event("a", "S2", 1))
        assert (await q.claim(10)).leases == []
        await asyncio.sleep(0.35)
        assert sorted(lease.serial for lease in (await q.claim(10)).leases) == ["S1", "S2"]


class TestPause:
    """A paused account is not claimed until it is resumed."""

    async def test_paused_account_is_skipped_and_resume_brings_it_back(self, redis: Redis) -> None:
        await put(redis, pass_event("a", "S1", 1), pass_event("b", "S1", 1))
        keys = account_keys("a")
        await redis.hset(keys.paused, mapping={"since_ms": 1, "reason": "auth"})
        q = wq(redis)
        assert [lease.account_id for lease in (await q.claim(10)).leases] == ["b"]
        assert await redis.zscore(ACTIVE_ACCOUNTS, "a") is None
        scripts = Scripts(redis)
        paused_ms = await scripts.resume(args=[keys.base, "a", ACTIVE_ACCOUNTS, NOTIFY, 50])
        assert int(paused_ms) > 0
        assert await redis.lrange(keys.pause_log, 0, -1) != []
        assert [lease.account_id for lease in (await q.claim(10)).leases] == ["a"]


class TestConcurrentClaims:
    """Many claimers at once never hold one serial twice."""

    async def test_no_serial_is_leased_twice(self, redis_url: str, redis: Redis) -> None:
        await put(redis, *(pass_event(f"acct{a}", f"S{i}", 1) for a in range(3) for i in range(50)))
        clients = [Redis.from_url(redis_url) for _ in range(6)]
        try:
            queues = [wq(c, f"w{i}") for i, c in enumerate(clients)]
            results = await asyncio.gather(*(q.claim(7) for q in queues for _ in range(5)))
        finally:
            for c in clients:
                await c.aclose()
        held = [(lease.account_id, lease.serial) for r in results for lease in r.leases]
        assert len(held) == 150
        assert len(set(held)) == 150


@pytest.mark.parametrize("n", [1, 3])
async def test_heads_batch_size(redis: Redis, n: int) -> None:
    """The snapshot reads ``head_batch`` entries."""
    await put(redis, *(pass_event("a", "S1", i) for i in range(5)))
    q = WorkQueue(redis, worker_id="w", head_batch=n)
    (lease,) = (await q.claim(1)).leases
    (snap,) = await q.snapshot([lease])
    assert len(snap.heads) == n


class TestBatchedScripts:
    """Settle, release and renewal batches are one round trip each, also after Redis lost its scripts."""

    @staticmethod
    async def calls(redis: Redis, command: str) -> int:
        stats = await redis.info("commandstats")
        return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))

    async def test_batches_send_their_scripts_without_asking_whether_redis_has_them(
        self, redis: Redis
    ) -> None:
        await put(redis, *(pass_event("a", f"S{i}", 1) for i in range(3)))
        q = wq(redis)
        leases = (await q.claim(3)).leases
        snaps = await q.snapshot(leases)
        for script in (q.scripts.renew, q.scripts.settle, q.scripts.release):
            await redis.script_load(script.script)  # as any earlier batch would have
        script_calls, evalsha_calls = await self.calls(redis, "script"), await self.calls(redis, "evalsha")

        assert await q.renew_many({"a": leases}) == {"a": [True, True, True]}
        settled = await q.settle_many(
            [
                SettleRequest(lease, snap.heads, b'{"s":1}', (), ())
                for lease, snap in zip(leases, snaps, strict=True)
            ]
        )
        assert [s.ok for s in settled] == [True, True, True]
        assert await q.release_many(leases) == [True, True, True]

        # Three batches: seven EVALSHAs in all (1 renewal + 3 settles + 3 releases) and no SCRIPT EXISTS before
        # any of them (redis-py's pipelines ask before every execute).
        assert await self.calls(redis, "script") == script_calls
        assert await self.calls(redis, "evalsha") == evalsha_calls + 7
        keys = account_keys("a")
        assert int(await redis.get(keys.depth)) == 0
        assert await redis.zcard(keys.leased) == 0

    async def test_after_a_script_flush_each_refused_call_runs_once(self, redis: Redis) -> None:
        await put(redis, *(pass_event("a", f"S{i}", n) for i in range(2) for n in range(2)))
        q = wq(redis)
        leases = (await q.claim(2)).leases
        snaps = await q.snapshot(leases)
        await redis.script_flush()  # as after a Redis restart: every EVALSHA answers NOSCRIPT

        settled = await q.settle_many(
            [
                SettleRequest(lease, snap.heads[:1], None, (), ())
                for lease, snap in zip(leases, snaps, strict=True)
            ]
        )

        # Each settle ran exactly once: one entry of each serial gone, the other one left at the head.
        assert [(s.ok, s.removed) for s in settled] == [(True, 1), (True, 1)]
        assert [s.heads for s in settled] == [snap.heads[1:] for snap in snaps]
        assert int(await redis.get(account_keys("a").depth)) == 2
        assert await q.release_many(leases) == [True, True]
