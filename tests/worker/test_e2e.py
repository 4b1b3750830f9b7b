"""End to end: real worker processes against the Klaviyo sandbox."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from passbridge.keys import account_keys
from tests.conftest import async_wait_for
from worker import dlq
from worker.state import PassState

from .e2e import Pipeline, Workers
from .helpers import HIGH_WATER, REPLAY_RESERVE, forget_dedup, pass_event

pytestmark = pytest.mark.slow


async def test_two_workers_deliver_everything_in_order(pipeline: Pipeline, workers: Workers) -> None:
    await pipeline.add_account("acme")
    workers.start(2)
    events = [
        pass_event("acme", f"S{s}", n, offset_s=(n * 7) % 5 + n / 10) for s in range(10) for n in range(4)
    ]
    await pipeline.put(events)
    await async_wait_for(pipeline.drained, timeout=60)
    pipeline.sandbox.wait_idle()
    assert sorted(pipeline.stored_unique_ids("acme")) == sorted(e.event_id for e in events)
    pipeline.sandbox.wait_idle()
    records = pipeline.records("acme")
    for s in range(10):
        newest = max((e for e in events if e.serial_number == f"S{s}"), key=lambda e: e.occurred_at)
        assert records[f"S{s}"]["updated_at"] == newest.occurred_at.isoformat().replace("+00:00", "Z")


async def test_poison_event_is_dead_lettered_the_serial_goes_on_and_replay_delivers_it(
    pipeline: Pipeline, workers: Workers
) -> None:
    await pipeline.add_account("acme")
    workers.start(1)
    same = {"email": "holder@example.com", "properties": {"points": 1, "tier": "gold"}}
    first = pass_event("acme", "S1", 0, kind="created", **same)
    await pipeline.put([first])
    await async_wait_for(pipeline.drained, timeout=30)
    # Klaviyo now rejects every profile write of this account with a permanent 400. The poison event changes
    # the pass's email (a profile write); the next event changes only its record and metric.
    pipeline.sandbox.set_faults(error_rates={400: 1.0}, operations=["create_or_update_profile"])
    poison = pass_event(
        "acme", "S1", 1, kind="updated", email="new@example.com", properties=same["properties"]
    )
    after = pass_event("acme", "S1", 2, kind="updated", **same)
    # One at a time: queued together, the two would coalesce into one round whose net profile (the email
    # back to what Klaviyo has) needs no profile write at all.
    await pipeline.put([poison])
    await async_wait_for(pipeline.drained, timeout=30)
    await pipeline.put([after])
    await async_wait_for(pipeline.drained, timeout=30)
    (entry,) = await dlq.list_entries(pipeline.redis, "acme")
    assert entry.event_id == poison.event_id
    assert entry.reason.startswith("permanent error: HTTP 400")
    (err,) = entry.errors
    assert err["status"] == 400
    assert err["endpoint"] == "create_or_update_profile"
    assert int(err["worker"].split(":")[1]) in workers.family(workers.procs[0])
    assert sorted(pipeline.stored_unique_ids("acme")) == sorted([first.event_id, after.event_id])
    pipeline.sandbox.wait_idle()
    assert pipeline.records("acme")["S1"]["updated_at"] == "2026-11-25T10:00:02Z"
    # The cause is fixed; replay delivers the event. It is older than what was applied since, so it lands
    # as a metric event only and the pass's state does not go back.
    pipeline.sandbox.clear_faults()
    assert (
        await dlq.replay(
            pipeline.redis,
            "acme",
            [entry.event_id],
            high_water=HIGH_WATER,
            reserve=REPLAY_RESERVE,
            history_retention_ms=86_400_000,
        )
    ).replayed == 1
    await async_wait_for(pipeline.drained, timeout=30)
    assert sorted(pipeline.stored_unique_ids("acme")) == sorted(e.event_id for e in (first, poison, after))
    assert await dlq.count(pipeline.redis, "acme") == 0
    pipeline.sandbox.wait_idle()
    assert pipeline.records("acme")["S1"]["updated_at"] == "2026-11-25T10:00:02Z"
    profile = pipeline.sandbox.profile("S1", pipeline.accounts["acme"])
    assert profile is not None
    assert profile["attributes"]["email"] == "holder@example.com"


async def test_an_event_id_sent_again_and_dead_lettered_twice_keeps_both(
    pipeline: Pipeline, workers: Workers
) -> None:
    """Once the dedup window has passed a client sends an event id again, with other data; Klaviyo refuses
    both. Neither dead letter replaces the other: the second lives beside the first, each replays its own
    payload (the replay is not taken for a duplicate) or is purged on its own."""
    await pipeline.add_account("acme")
    workers.start(1)
    pipeline.sandbox.set_faults(error_rates={400: 1.0}, operations=["create_or_update_profile"])
    first = pass_event("acme", "S1", 0, kind="created", email="first@example.com")
    await pipeline.put([first])
    await async_wait_for(pipeline.drained, timeout=30)
    await forget_dedup(pipeline.redis, "acme")
    again = pass_event("acme", "S1", 0, kind="created", email="again@example.com")
    await pipeline.put([again])
    await async_wait_for(pipeline.drained, timeout=30)
    entries = await dlq.list_entries(pipeline.redis, "acme")
    assert [(e.dlq_id, e.event_id, e.event["e"]) for e in entries] == [
        ("acme-S1-0", first.event_id, "first@example.com"),
        ("acme-S1-0#2", first.event_id, "again@example.com"),
    ]
    assert entries[0].dead_at_ms <= entries[1].dead_at_ms
    assert all(int(e.worker.split(":")[1]) in workers.family(workers.procs[0]) for e in entries)

    # The cause is fixed; the operator replays the second one only: its own payload reaches Klaviyo.
    pipeline.sandbox.clear_faults()
    assert (
        await dlq.replay(
            pipeline.redis,
            "acme",
            ["acme-S1-0#2"],
            high_water=HIGH_WATER,
            reserve=REPLAY_RESERVE,
            history_retention_ms=86_400_000,
        )
    ).replayed == 1
    await async_wait_for(pipeline.drained, timeout=30)
    assert pipeline.stored_unique_ids("acme") == [first.event_id]
    pipeline.sandbox.wait_idle()
    profile = pipeline.sandbox.profile("S1", pipeline.accounts["acme"])
    assert profile is not None
    assert profile["attributes"]["email"] == "again@example.com"
    (left,) = await dlq.list_entries(pipeline.redis, "acme")
    assert (left.dlq_id, left.event["e"]) == ("acme-S1-0", "first@example.com")
    assert await dlq.purge(pipeline.redis, "acme", ["acme-S1-0"]) == 1
    assert await dlq.count(pipeline.redis, "acme") == 0


async def test_replayed_event_older_than_max_age_gets_a_fresh_retry_window(
    pipeline: Pipeline, workers: Workers
) -> None:
    """After an outage longer than max age, a replayed event's next transient error is retried (its age counts
    from the replay), not dead-lettered again at once."""
    await pipeline.add_account("acme")
    workers.start(1)
    old = pass_event("acme", "S1", 0, kind="created", received_at=datetime.now(UTC) - timedelta(hours=25))
    # The outage: Klaviyo answers 503 to everything; the event is past the 24 h max age, so its first
    # transient error dead-letters it.
    pipeline.sandbox.set_faults(error_rates={503: 1.0})
    await pipeline.put([old])
    await async_wait_for(pipeline.drained, timeout=30)
    (entry,) = await dlq.list_entries(pipeline.redis, "acme")
    assert "older than max age" in entry.reason
    # Klaviyo still fails when the operator replays: that error must be retried with backoff.
    assert (
        await dlq.replay(
            pipeline.redis,
            "acme",
            [old.event_id],
            high_water=HIGH_WATER,
            reserve=REPLAY_RESERVE,
            history_retention_ms=86_400_000,
        )
    ).replayed == 1
    keys = account_keys("acme")

    async def retried_or_dead() -> bool:
        raw = await pipeline.redis.hget(keys.retries, old.event_id)
        attempts = orjson.loads(raw)["attempts"] if raw else 0
        return attempts >= 1 or await dlq.count(pipeline.redis, "acme") > 0

    await async_wait_for(retried_or_dead, timeout=30)
    assert await dlq.count(pipeline.redis, "acme") == 0, workers.logs()
    pipeline.sandbox.clear_faults()
    await async_wait_for(pipeline.drained, timeout=30)
    assert await dlq.count(pipeline.redis, "acme") == 0
    assert pipeline.stored_unique_ids("acme") == [old.event_id]


async def test_replayed_event_loses_a_tie_in_time_to_a_later_arrival(
    pipeline: Pipeline, workers: Workers
) -> None:
    """``installed`` and ``uninstalled`` happened in the same second and arrived in that order; ``installed`` was
    dead-lettered, ``uninstalled`` applied. Replayed, ``installed`` is older by arrival: the pass stays
    uninstalled."""
    await pipeline.add_account("acme")
    workers.start(1)
    installed = pass_event("acme", "S1", 0, kind="installed", offset_s=0)
    uninstalled = pass_event("acme", "S1", 1, kind="uninstalled", offset_s=0)
    pipeline.sandbox.set_faults(error_rates={400: 1.0}, operations=["create_or_update_profile"])
    await pipeline.put([installed])
    await async_wait_for(pipeline.drained, timeout=30)
    assert [e.event_id for e in await dlq.list_entries(pipeline.redis, "acme")] == [installed.event_id]
    pipeline.sandbox.clear_faults()
    await pipeline.put([uninstalled])
    await async_wait_for(pipeline.drained, timeout=30)
    assert (
        await dlq.replay(
            pipeline.redis,
            "acme",
            [installed.event_id],
            high_water=HIGH_WATER,
            reserve=REPLAY_RESERVE,
            history_retention_ms=86_400_000,
        )
    ).replayed == 1
    await async_wait_for(pipeline.drained, timeout=30)
    assert await dlq.count(pipeline.redis, "acme") == 0
    assert sorted(pipeline.stored_unique_ids("acme")) == [installed.event_id, uninstalled.event_id]
    stored = PassState.from_json(await pipeline.redis.hget(account_keys("acme").state, "S1"))
    assert (stored.status, stored.event_id) == ("uninstalled", uninstalled.event_id)
    pipeline.sandbox.wait_idle()
    assert pipeline.records("acme")["S1"]["status"] == "uninstalled"
    profile = pipeline.sandbox.profile("S1", pipeline.accounts["acme"])
    assert profile is not None
    assert profile["attributes"]["properties"]["wallet_pass_status"] == "uninstalled"


async def test_sigkilled_worker_is_taken_over_within_the_lease_ttl(
    pipeline: Pipeline, workers: Workers
) -> None:
    await pipeline.add_account("acme")
    # Slow Klaviyo: each call takes ~1 s, so the victim is mid-serial when it dies (a serial's queued
    # events coalesce into one round of three writes).
    pipeline.sandbox.set_faults(latency_ms=1000)
    # Lease takeover of a killed process: without express lanes, whose child would hand its serials back
    # gracefully when its worker dies (tests/worker/test_express_lane.py covers that).
    workers.env["PASSBRIDGE_WORKER_EXPRESS_LANE"] = "false"
    (victim,) = workers.start(1)
    events = [pass_event("acme", f"S{s}", n) for s in range(6) for n in range(5)]
    await pipeline.put(events)
    keys = account_keys("acme")
    prefix = f":{victim.pid}:"

    async def victim_holds() -> bool:
        tokens = await pipeline.redis.hgetall(keys.lease_tokens)
        return sum(prefix in t.decode() for t in tokens.values()) >= 3

    await async_wait_for(victim_holds, timeout=30)
    (rescuer,) = workers.start(1)
    await asyncio.sleep(2.0)  # the rescuer is up and idle (the victim holds everything)
    held = {
        s.decode()
        for s, t in (await pipeline.redis.hgetall(keys.lease_tokens)).items()
        if prefix in t.decode()
    }
    workers.kill(victim)
    killed_at = time.monotonic()

    async def taken_over() -> bool:
        tokens = {
            s.decode(): t.decode() for s, t in (await pipeline.redis.hgetall(keys.lease_tokens)).items()
        }
        return all(s not in tokens or prefix not in tokens[s] for s in held) and any(
            f":{rescuer.pid}:" in t for t in tokens.values()
        )

    await async_wait_for(taken_over, timeout=10, interval=0.02)
    took = time.monotonic() - killed_at
    assert took <= 2.0 + 1.0, f"takeover took {took:.2f} s with a 2 s lease"
    await async_wait_for(pipeline.drained, timeout=60)
    stored = pipeline.stored_unique_ids("acme")
    assert sorted(set(stored)) == sorted(e.event_id for e in events)
    assert len(stored) == len(set(stored))


async def test_sigterm_finishes_or_releases_within_the_grace_period(
    pipeline: Pipeline, workers: Workers
) -> None:
    await pipeline.add_account("acme")
    # The worker holds 4 of the 8 serials at a time, and each request takes ~300 ms: at the SIGTERM it is
    # in the middle of their rounds (a few requests each), with the other serials not started.
    pipeline.sandbox.set_faults(latency_ms=300)
    workers.env.update(PASSBRIDGE_WORKER_BULK_MAX_SERIALS="4", PASSBRIDGE_WORKER_MAX_JOBS="4")
    (first,) = workers.start(1)
    events = [pass_event("acme", f"S{s}", n) for s in range(8) for n in range(6)]
    await pipeline.put(events)
    keys = account_keys("acme")
    # (3, not 4: one slot is the fair-share reserve kept for other accounts)
    await async_wait_for(lambda: _leased(pipeline, 3), timeout=30)
    await asyncio.sleep(0.5)  # their first writes are on their way
    started = time.monotonic()
    assert workers.terminate(first, timeout=15) == 0, workers.logs()
    took = time.monotonic() - started
    assert took < 5 + 2, f"shutdown took {took:.1f} s\n{workers.logs()}"
    # Everything it held was handed back at once: no lease waits to expire.
    assert await pipeline.redis.zcard(keys.leased) == 0, workers.logs()
    assert await pipeline.redis.hlen(keys.lease_tokens) == 0, workers.logs()
    left = int(await pipeline.redis.get(keys.depth))
    assert 0 < left < len(events), f"{left} events left\n{workers.logs()}"
    workers.start(1)
    await async_wait_for(pipeline.drained, timeout=60)
    assert sorted(pipeline.stored_unique_ids("acme")) == sorted(e.event_id for e in events)


async def _leased(pipeline: Pipeline, n: int) -> bool:
    return int(await pipeline.redis.zcard(account_keys("acme").leased)) >= n
