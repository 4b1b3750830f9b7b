"""The engine in-process against a real Redis, with a scripted Klaviyo at the Syncer boundary."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from cryptography.fernet import Fernet, MultiFernet
from redis.asyncio import Redis

from passbridge.accounts import AccountState, AccountStore
from passbridge.keys import ACTIVE_ACCOUNTS, account_keys
from tests.conftest import async_wait_for
from tests.factories import make_account
from worker import dlq, history, inspect, pause
from worker.engine import Engine, EngineConfig, PerEventSync
from worker.klaviyo.errors import AuthError, PermanentError, ThrottledError, TransientError
from worker.retry import RetryPolicy
from worker.state import PassState

from .helpers import HIGH_WATER, REPLAY_RESERVE, pass_event, put
from .scripted import ScriptedSyncer

FAST = RetryPolicy(base_delay_s=0.02, max_delay_s=0.05, max_attempts=4, max_age_s=3600)

EngineFactory = Callable[..., Awaitable[Engine]]


@pytest.fixture
def store(redis: Redis) -> AccountStore:
    return AccountStore(redis, MultiFernet([Fernet(Fernet.generate_key())]))


@pytest.fixture
async def engines(redis_url: str, store: AccountStore) -> AsyncIterator[EngineFactory]:
    """Start engines (each with its own Redis clients, as separate processes would have)."""
    started: list[tuple[Engine, list[Redis]]] = []

    async def start(syncer: ScriptedSyncer, **config: Any) -> Engine:
        redis = Redis.from_url(redis_url)
        blocking = Redis.from_url(redis_url)
        cfg = EngineConfig(**{"retry": FAST, "max_serials": 16, "claim_batch": 8, **config})
        engine = Engine(redis, AccountStore(redis, store.cipher), syncer, config=cfg, blocking_redis=blocking)
        await engine.start()
        started.append((engine, [redis, blocking]))
        return engine

    yield start
    for engine, clients in started:
        await engine.stop(grace_s=1)
        for c in clients:
            await c.aclose()


async def drained(redis: Redis, *accounts: str) -> bool:
    for a in accounts:
        keys = account_keys(a)
        if int(await redis.get(keys.depth) or 0) or await redis.zcard(keys.leased):
            return False
    return True


async def assert_clean(redis: Redis, *accounts: str) -> None:
    """Nothing pending, leased, parked, tokened or scheduled is left."""
    for a in accounts:
        keys = account_keys(a)
        assert int(await redis.get(keys.depth) or 0) == 0
        assert await redis.zcard(keys.ready) == 0
        assert await redis.zcard(keys.leased) == 0
        assert await redis.hlen(keys.lease_tokens) == 0
        assert await redis.hlen(keys.retries) == 0
        assert [k async for k in redis.scan_iter(match=keys.mailbox_prefix + "*")] == []
    assert await redis.zcard(ACTIVE_ACCOUNTS) == 0


class TestOrderAndParallelism:
    """Every event is written once, in occurred_at order per serial; serials run in parallel."""

    async def test_two_engines_deliver_everything_in_order(
        self, redis: Redis, store: AccountStore, engines: EngineFactory
    ) -> None:
        rng = random.Random(7)
        events = []
        for a in ("acme", "globex"):
            await make_account(redis, store.cipher, a)
            for s in range(12):
                offsets = rng.sample(range(100), 6)
                events += [pass_event(a, f"S{s}", n, offset_s=offsets[n]) for n in range(6)]
        rng.shuffle(events)
        syncer = ScriptedSyncer(delay_s=0.002)
        await engines(syncer)
        await engines(syncer)
        for i in range(0, len(events), 10):
            await put(redis, *events[i : i + 10])
        await async_wait_for(lambda: drained(redis, "acme", "globex"), timeout=20)
        expected: dict[tuple[str, str], list[str]] = {}
        for ev in sorted(events, key=lambda e: e.occurred_at):
            expected.setdefault((ev.account_id, ev.serial_number), []).append(ev.event_id)
        # Events may be applied out of order only when a late one arrived after newer ones were written —
        # then the state machine treats it as stale. So check: written once each, and the stored state is
        # the newest event's.
        assert sorted(e for w in syncer.written.values() for e in w) == sorted(e.event_id for e in events)
        for (a, s), ids in expected.items():
            raw = await redis.hget(account_keys(a).state, s)
            assert PassState.from_json(raw).event_id == ids[-1]
        assert syncer.max_in_flight > 1
        await assert_clean(redis, "acme", "globex")

    async def test_mailbox_order_is_kept_when_all_events_are_queued_first(
        self, redis: Redis, store: AccountStore, engines: EngineFactory
    ) -> None:
        await make_account(redis, store.cipher, "acme")
        rng = random.Random(3)
        events = [
            pass_event("acme", f"S{s}", n, offset_s=rng.random() * 100) for s in range(5) for n in range(8)
        ]
        rng.shuffle(events)
        await put(redis, *events)
        syncer = ScriptedSyncer()
        await engines(syncer)
        await async_wait_for(lambda: drained(redis, "acme"), timeout=10)
        for s in range(5):
            mine = sorted((e for e in events if e.serial_number == f"S{s}"), key=lambda e: e.occurred_at)
            assert syncer.written[("acme", f"S{s}")] == [e.event_id for e in mine]
        timeline = await history.timeline(redis, "acme", "S0")
        assert [e.kind for e in timeline].count("written") == 8
        await assert_clean(redis, "acme")


class TestFairness:
    """One account's backlog does not hold another account's events back."""

    async def test_small_account_is_served_while_a_big_backlog_drains(
        self, redis: Redis, store: AccountStore, engines: EngineFactory
    ) -> None:
        for a in ("big", "small"):
            await make_account(redis, store.cipher, a)
        await put(redis, *(pass_event("big", f"B{i}", n) for i in range(200) for n in range(2)))
        syncer = ScriptedSyncer(delay_s=0.01)
        await engines(syncer, max_serials=8, claim_batch=8)
        await async_wait_for(lambda: _written_total(syncer, "big", 16), timeout=10)
        await put(redis, *(pass_event("small", f"S{i}", 0) for i in range(3)))
        await async_wait_for(lambda: drained(redis, "small"), timeout=10)
        # The small account's 3 events went through while most of the big backlog was still queued.
        assert int(await redis.get(account_keys("big").depth)) > 200


class TestFailures:
    """Retries, 429s, the DLQ and auth pauses."""

    async def test_transient_errors_are_retried_then_written(
        self, redis: Redis, store: AccountStore, engines: EngineFactory
    ) -> None:
        await make_account(redis, store.cipher, "acme")
        syncer = ScriptedSyncer(
            failures={"acme-S1-1": [TransientError("create_event", "HTTP 503", status=503)] * 2}
        )
        await put(redis, *(pass_event("acme", "S1", n) for n in range(3)), pass_event("acme", "S2", 0))
        await engines(syncer)
        await async_wait_for(lambda: drained(redis, "acme"), timeout=10)
        assert syncer.written[("acme", "S1")] == ["acme-S1-0", "acme-S1-1", "acme-S1-2"]
        assert syncer.attempts["acme-S1-1"] == 3
        kinds = [e.kind for e in await history.event_history(redis, "acme", "acme-S1-1", "S1")]
        assert kinds == ["ingested", "attempt", "attempt", "written"]
        attempt = (await history.event_history(redis, "acme", "acme-S1-1", "S1"))[1]
        assert attempt.detail["status"] == 503
        assert attempt.detail["attempt"] == 1
        await assert_clean(redis, "acme")

    async def test_poison_event_is_dead_lettered_and_the_serial_goes_on(
        self, redis: Redis, store: AccountStore, engines: EngineFactory
    ) -> None:
        await make_account(redis, store.cipher, "acme")
        bad = PermanentError(
            400, "invalid", "bad phone", "/data/attributes/phone_number", endpoint="create_event"
        )
        syncer = ScriptedSyncer(failures={"acme-S1-1": [bad]})
        await put(redis, *(pass_event("acme", "S1", n) for n in range(3)))
        engine = await engines(syncer)
        await async_wait_for(lambda: drained(redis, "acme"), timeout=10)
        assert syncer.written[("acme", "S1")] == ["acme-S1-0", "acme-S1-2"]
        (entry,) = await dlq.list_entries(redis, "acme")
        assert entry.event_id == "acme-S1-1"
        assert entry.reason.startswith("permanent error: HTTP 400 invalid")
        assert entry.worker == engine.worker_id
        (err,) = entry.errors
        assert (err["status"], err["code"], err["detail"], err["worker"]) == (
            400,
            "invalid",
            "bad phone",
            engine.worker_id,
        )
        assert entry.event["k"] == "updated"
        # Replay (the cause is fixed): delivered, and — being older than the applied state — stale, so the
        # serial's state stays at its newest event.
        assert (
            await dlq.replay(
                redis,
                "acme",
                [entry.event_id],
                high_water=HIGH_WATER,
                reserve=REPLAY_RESERVE,
                history_retention_ms=86_400_000,
            )
        ).replayed == 1
        await async_wait_for(lambda: drained(redis, "acme"), timeout=10)
        assert syncer.written[("acme", "S1")] == ["acme-S1-0", "acme-S1-2", "acme-S1-1"]
        state = PassState.from_json(await redis.hget(account_keys("acme").state, "S1"))
        assert state.event_id == "acme-S1-2"
        kinds = [e.kind for e in await history.event_history(redis, "acme", "acme-S1-1", "S1")]
        assert kinds == ["ingested", "dead", "replayed", "written"]
        await assert_clean(redis, "acme")
        assert await dlq.count(redis, "acme") == 0

    async def test_exhausted_attempts_dead_letter_with_every_error(
        self, redis: Redis, store: AccountStore, engines: EngineFactory
    ) -> None:
        await make_account(redis, store.cipher, "acme")
        errors = [TransientError("create_event", f"HTTP 50{i}", status=500 + i) for i in range(4)]
        syncer = ScriptedSyncer(failures={"acme-S1-0": errors})
        await put(redis, pass_event("acme", "S1", 0), pass_event("acme", "S1", 1))
        await engines(syncer)
        await async_wait_for(lambda: drained(redis, "acme"), timeout=10)
        (entry,) = await dlq.list_entries(redis, "acme")
        assert [e["status"] for e in entry.errors] == [500, 501, 502, 503]
        assert "gave up after 4 attempts" in entry.reason
        assert syncer.written[("acme", "S1")] == ["acme-S1-1"]
        await assert_clean(redis, "acme")

    async def test_a_dead_letter_counts_the_attempts_of_its_last_run_and_of_all(
        self, redis: Redis, store: AccountStore, engines: EngineFactory
    ) -> None:
        """Replayed and dead-lettered again, an entry keeps every error, but its attempts are those since the
        replay (what the policy allowed this time); the total counts both runs."""
        await make_account(redis, store.cipher, "acme")
        errors = [TransientError("create_event", f"HTTP 50{i}", status=500 + i) for i in range(8)]
        syncer = ScriptedSyncer(failures={"acme-S1-0": errors})
        await put(redis, pass_event("acme", "S1", 0))
        await engines(syncer)
        await async_wait_for(lambda: drained(redis, "acme"), timeout=10)
        (entry,) = await dlq.list_entries(redis, "acme")
        assert (entry.attempts, entry.attempts_total, entry.replays) == (4, 4, 0)
        assert (
            await dlq.replay(
                redis,
                "acme",
                [entry.dlq_id],
                high_water=HIGH_WATER,
                reserve=REPLAY_RESERVE,
                history_retention_ms=86_400_000,
            )
        ).replayed == 1
        await async_wait_for(lambda: drained(redis, "acme"), timeout=10)
        (entry,) = await dlq.list_entries(redis, "acme")
        assert len(entry.errors) == 8
        assert (entry.attempts, entry.attempts_total, entry.replays) == (4, 8, 1)
        row = inspect.dlq_summary("acme", entry)
        assert (row["attempts"], row["attempts_total"]) == (4, 8)
        await assert_clean(redis, "acme")

    async def test_429_parks_without_counting_an_attempt(
        self, redis: Redis, store: AccountStore, engines: EngineFactory
    ) -> None:
        await make_account(redis, store.cipher, "acme", retry_policy={"max_attempts": 1})
        throttles = [ThrottledError(0.05, "create_event") for _ in range(3)]
        syncer = ScriptedSyncer(failures={"acme-S1-0": throttles})
        await put(redis, pass_event("acme", "S1", 0))
        await engines(syncer)
        await async_wait_for(lambda: drained(redis, "acme"), timeout=10)
        # max_attempts=1 would dead-letter on the first counted failure: 429s are not counted.
        assert syncer.written[("acme", "S1")] == ["acme-S1-0"]
        assert await dlq.count(redis, "acme") == 0
        kinds = [e.kind for e in await history.event_history(redis, "acme", "acme-S1-0", "S1")]
        assert kinds == ["ingested", "throttled", "throttled", "throttled", "written"]
        await assert_clean(redis, "acme")

    async def test_a_long_429_defers_the_account_instead_of_parking_every_serial(
        self, redis: Redis, store: AccountStore, engines: EngineFactory
    ) -> None:
        await make_account(redis, store.cipher, "acme")
        await make_account(redis, store.cipher, "globex")
        throttle = {f"acme-S{i}-0": [ThrottledError(0.6, "create_event")] for i in range(40)}
        syncer = ScriptedSyncer(failures=throttle)
        await put(redis, *(pass_event("acme", f"S{i}", 0) for i in range(40)))
        await engines(syncer, max_serials=8, claim_batch=4)
        await asyncio.sleep(0.3)
        # Only the serials claimed before the first 429 came back were tried and parked; the rest wait in
        # `ready` untouched (no claim, no "throttled" history) while the account's budget is spent ...
        tried = [e for e, n in syncer.attempts.items() if n]
        assert 1 <= len(tried) <= 8
        assert await redis.pttl(account_keys("acme").deferred) > 0
        # ... and another account is not held up by it.
        await put(redis, pass_event("globex", "G1", 0))
        await async_wait_for(lambda: _written(syncer, "globex", "G1", 1), timeout=2)
        await async_wait_for(lambda: drained(redis, "acme", "globex"), timeout=10)
        assert sum(len(v) for v in syncer.written.values()) == 41

    async def test_failing_serial_blocks_only_itself(
        self, redis: Redis, store: AccountStore, engines: EngineFactory
    ) -> None:
        await make_account(redis, store.cipher, "acme")
        slow = [TransientError("create_event", "HTTP 503", status=503)] * 3
        syncer = ScriptedSyncer(failures={"acme-S1-0": slow})
        await put(redis, pass_event("acme", "S1", 0), pass_event("acme", "S1", 1))
        await put(redis, *(pass_event("acme", "S2", n) for n in range(5)))
        await engines(syncer, retry=RetryPolicy(base_delay_s=0.3, max_delay_s=0.3, max_attempts=10))
        await async_wait_for(lambda: _written(syncer, "acme", "S2", 5), timeout=5)
        # S2 finished while S1 is still parked on its head event (not skipped: order holds).
        assert syncer.written[("acme", "S1")] == []
        parked = await redis.zscore(account_keys("acme").ready, "S1")
        leased = await redis.zscore(account_keys("acme").leased, "S1")
        assert parked is not None or leased is not None
        await async_wait_for(lambda: drained(redis, "acme"), timeout=10)
        assert syncer.written[("acme", "S1")] == ["acme-S1-0", "acme-S1-1"]

    async def test_auth_error_pauses_only_that_account_until_resumed(
        self, redis: Redis, store: AccountStore, engines: EngineFactory
    ) -> None:
        await make_account(redis, store.cipher, "acme", retry_policy={"max_age_s": 0.5})
        await make_account(redis, store.cipher, "globex")
        syncer = ScriptedSyncer(
            account_errors={"acme": AuthError(401, "create_event", code="not_authenticated")}
        )
        await put(redis, *(pass_event("acme", f"S{i}", 0) for i in range(3)))
        await put(redis, *(pass_event("globex", f"S{i}", 0) for i in range(3)))
        await engines(syncer)
        await async_wait_for(lambda: drained(redis, "globex"), timeout=10)
        await async_wait_for(lambda: _paused(redis, "acme"), timeout=5)

        # The pause key is written first, the registry's state right after it (pause.pause_account).
        async def registry_paused() -> bool:
            return (await store.get("acme")).state is AccountState.paused

        await async_wait_for(registry_paused, timeout=5)
        account = await store.get("acme")
        assert account.state is AccountState.paused
        assert "not_authenticated" in account.state_reason
        assert int(await redis.get(account_keys("acme").depth)) == 3
        assert await dlq.count(redis, "acme") == 0
        # Paused for longer than the account's max age: the wait must not age its events.
        await asyncio.sleep(0.8)
        del syncer.account_errors["acme"]
        syncer.failures["acme-S0-0"] = [TransientError("create_event", "HTTP 502", status=502)]
        assert await pause.resume_account(redis, store, "acme") is not None
        await async_wait_for(lambda: drained(redis, "acme"), timeout=10)
        assert await dlq.count(redis, "acme") == 0
        assert sorted(k[1] for k, v in syncer.written.items() if k[0] == "acme" and v) == ["S0", "S1", "S2"]
        assert (await store.get("acme")).state is AccountState.connected
        await assert_clean(redis, "acme", "globex")

    async def test_unreadable_mailbox_entry_is_dead_lettered(
        self, redis: Redis, store: AccountStore, engines: EngineFactory
    ) -> None:
        await make_account(redis, store.cipher, "acme")
        await put(redis, pass_event("acme", "S1", 1))
        keys = account_keys("acme")
        await redis.zadd(keys.mailbox("S1"), {b"000000000099" + b'{"id":"junk","v":1}': 0})
        await redis.incr(keys.depth)
        syncer = ScriptedSyncer()
        await engines(syncer)
        await async_wait_for(lambda: drained(redis, "acme"), timeout=10)
        (entry,) = await dlq.list_entries(redis, "acme")
        assert entry.event_id == "junk"
        assert entry.errors[0]["code"] == "unreadable_event"
        assert syncer.written[("acme", "S1")] == ["acme-S1-1"]


class TestLeases:
    """Leases: a hung holder is fenced out; shutdown finishes or releases."""

    async def test_a_holder_that_stopped_renewing_is_fenced_out(
        self, redis: Redis, store: AccountStore, engines: EngineFactory
    ) -> None:
        await make_account(redis, store.cipher, "acme")
        hung = ScriptedSyncer(block={"S1"})
        a = await engines(hung, lease_ms=300)
        await put(redis, pass_event("acme", "S1", 0))
        await async_wait_for(lambda: _attempted(hung, "acme-S1-0"), timeout=5)
        a._loops[1].cancel()  # the renewer: as if this process froze mid-request
        healthy = ScriptedSyncer()
        await engines(healthy)
        await async_wait_for(lambda: drained(redis, "acme"), timeout=5)
        assert healthy.written[("acme", "S1")] == ["acme-S1-0"]
        # The frozen worker wakes up: its lease deadline passed long ago, so it writes nothing to "Klaviyo" (no
        # older state after the new holder's), and its hand-back is refused.
        hung.unblock.set()
        await async_wait_for(lambda: _count(a, "leases_lost", 1), timeout=5)
        assert ("acme", "S1") not in hung.written
        assert PassState.from_json(await redis.hget(account_keys("acme").state, "S1")).event_id == "acme-S1-0"
        await assert_clean(redis, "acme")

    async def test_renewals_of_many_leases_spread_over_the_interval(
        self, redis: Redis, store: AccountStore, engines: EngineFactory
    ) -> None:
        # 400 serials claimed within a few ms must not be renewed together every interval: that queued all
        # their renewal scripts in Redis at once, and every other client waited behind them.
        await make_account(redis, store.cipher, "acme")
        serials = [f"S{i}" for i in range(400)]
        syncer = ScriptedSyncer(block=set(serials))
        await put(redis, *(pass_event("acme", s, 0) for s in serials))
        engine = await engines(syncer, lease_ms=2000, max_serials=400, claim_batch=200, fair_reserve=0)
        keys = account_keys("acme")
        await async_wait_for(lambda: _leased(redis, "acme", 400), timeout=5)
        await asyncio.sleep(3.0)  # six renewal intervals of 0.5 s
        expiries = sorted(score for _, score in await redis.zrange(keys.leased, 0, -1, withscores=True))
        seconds, micros = await redis.time()
        now_ms = seconds * 1000 + micros // 1000
        assert len(expiries) == 400
        assert engine.stats["leases_lost"] == 0
        # Every lease was renewed within the last interval (plus slack for a loaded machine).
        assert expiries[0] > now_ms + 2000 - 500 - 500
        # Spread over the interval: no 50 ms (one tick) holds more than a quarter of the renewals.
        busiest = max(sum(1 for e in expiries if start <= e < start + 50) for start in expiries)
        assert busiest <= 100, busiest
        syncer.unblock.set()
        await async_wait_for(lambda: drained(redis, "acme"), timeout=10)

    async def test_stop_finishes_the_current_event_and_releases_the_rest(
        self, redis: Redis, store: AccountStore, engines: EngineFactory
    ) -> None:
        await make_account(redis, store.cipher, "acme")
        syncer = ScriptedSyncer(delay_s=0.2)
        await put(redis, *(pass_event("acme", f"S{s}", n) for s in range(4) for n in range(10)))
        engine = await engines(syncer)
        await async_wait_for(lambda: _any_written(syncer), timeout=5)
        await engine.stop(grace_s=5)
        keys = account_keys("acme")
        assert await redis.zcard(keys.leased) == 0
        assert await redis.hlen(keys.lease_tokens) == 0
        # What was written is settled (nothing written twice later); the rest is claimable at once.
        written = sum(len(v) for v in syncer.written.values())
        assert int(await redis.get(keys.depth)) == 40 - written
        assert await redis.zcard(keys.ready) == 4
        other = ScriptedSyncer()
        await engines(other)
        await async_wait_for(lambda: drained(redis, "acme"), timeout=10)
        assert written + sum(len(v) for v in other.written.values()) == 40

    async def test_stop_after_the_grace_period_cancels_and_releases(
        self, redis: Redis, store: AccountStore, engines: EngineFactory
    ) -> None:
        await make_account(redis, store.cipher, "acme")
        syncer = ScriptedSyncer(block={"S1"})
        await put(redis, pass_event("acme", "S1", 0))
        engine = await engines(syncer)
        await async_wait_for(lambda: _attempted(syncer, "acme-S1-0"), timeout=5)
        await engine.stop(grace_s=0.2)
        keys = account_keys("acme")
        assert await redis.zcard(keys.leased) == 0
        assert await redis.zrange(keys.ready, 0, -1) == [b"S1"]
        info = await redis.hgetall("pb:workers:info")
        assert engine.worker_id.encode() not in info

    async def test_a_send_that_misses_its_first_cancellation_does_not_hold_the_stop(
        self, redis_url: str, store: AccountStore
    ) -> None:
        """A strategy's send still running at the stop ignores its first cancellation, as a loop waiting in
        Python 3.11's ``asyncio.wait_for`` can (CPython gh-86296; a bulk lane waits in one): the stop cancels it
        again and ends. A single cancellation and a gather waited for it for ever (the worker never exited)."""
        redis, blocking = Redis.from_url(redis_url), Redis.from_url(redis_url)
        strategy = _StubbornSends()
        engine = Engine(
            redis,
            AccountStore(redis, store.cipher),
            ScriptedSyncer(),
            config=EngineConfig(retry=FAST),
            blocking_redis=blocking,
            batch_sync=strategy,
        )
        await engine.start()
        send = strategy.start()
        try:
            async with asyncio.timeout(5):
                await engine.stop(grace_s=0.1)
            assert send.cancelled()
            assert strategy.cancellations == 2
        finally:
            send.cancel()
            await redis.aclose()
            await blocking.aclose()


class _StubbornSends(PerEventSync):
    """The per-event strategy with one send of its own in flight that misses its first cancellation."""

    def __init__(self) -> None:
        self.cancellations = 0
        self._sends: list[asyncio.Task[None]] = []

    def start(self) -> asyncio.Task[None]:
        task = asyncio.create_task(self._send())
        self._sends.append(task)
        return task

    async def _send(self) -> None:
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                self.cancellations += 1
                if self.cancellations == 1:
                    continue  # lost, as wait_for loses it
                raise

    def cancel_sends(self) -> list[asyncio.Task[None]]:
        """As the bulk strategy's: cancel the sends in flight, and return them to be awaited."""
        for task in self._sends:
            task.cancel()
        return list(self._sends)


async def _written_total(syncer: ScriptedSyncer, account: str, n: int) -> bool:
    return sum(len(v) for k, v in syncer.written.items() if k[0] == account) >= n


async def _paused(redis: Redis, account: str) -> bool:
    return await pause.get_pause(redis, account) is not None


async def _written(syncer: ScriptedSyncer, account: str, serial: str, n: int) -> bool:
    return len(syncer.written[(account, serial)]) >= n


async def _attempted(syncer: ScriptedSyncer, event_id: str) -> bool:
    return syncer.attempts[event_id] > 0


async def _any_written(syncer: ScriptedSyncer) -> bool:
    return any(syncer.written.values())


async def _leased(redis: Redis, account_id: str, n: int) -> bool:
    return int(await redis.zcard(account_keys(account_id).leased)) >= n


async def _count(engine: Engine, stat: str, n: int) -> bool:
    return engine.stats[stat] >= n


def test_history_entries_are_json() -> None:
    raw = history.entry(history.HistoryKind.written, "e", 1, notes=["applied: active"])
    assert orjson.loads(raw) == [1, "written", "e", {"notes": ["applied: active"]}]
