"""Lease fencing of the engine's Klaviyo writes: in-process engines with the real ``Syncer`` against the
sandbox over HTTP and a real Redis.

A serial whose lease is lost, or whose lease deadline passed (its renewals stalled), gets no further write
from this worker, and its event costs no attempt (the serial is its new holder's); shutdown stops the bulk
lanes' sends before it releases their serials. The sandbox's latency holds a write in flight while the lease
goes; a request hook on the engine's Klaviyo client says when a write left.
"""

from __future__ import annotations

import asyncio
import time

import httpx
from redis.asyncio import Redis

from passbridge.keys import account_keys
from tests.conftest import async_wait_for
from worker import dlq
from worker.batching import SyncMode

from .conftest import StartEngine
from .e2e import Pipeline
from .helpers import pass_event

#: How long the sandbox holds each request.
LATENCY_MS = 600

Counts = dict[str, dict[str, int]]


def counts(pipeline: Pipeline) -> Counts:
    """The sandbox's answers so far: operation → status → n (the sandbox lives for the whole module)."""
    raw: dict[str, dict[str, int]] = pipeline.sandbox.requests(limit=0)["counts"]
    return {op: {s: int(n) for s, n in by.items()} for op, by in raw.items()}


def delta(before: Counts, after: Counts, op: str) -> int:
    return sum(after.get(op, {}).values()) - sum(before.get(op, {}).values())


async def test_a_taken_over_serial_gets_no_further_write_of_its_event(
    pipeline: Pipeline, redis: Redis, start_engine: StartEngine
) -> None:
    await pipeline.add_account("acme")
    keys = account_keys("acme")

    async def take_over(request: httpx.Request) -> None:
        if request.url.path == "/api/profile-import":
            # Another worker takes the serial over while its profile write is on its way (and holds it).
            await redis.hset(keys.lease_tokens, "S1", "other:1:ab.1")
            await redis.zadd(keys.leased, {"S1": int(time.time() * 1000) + 60_000})

    pipeline.sandbox.set_faults(latency_ms=LATENCY_MS)
    before = counts(pipeline)
    # Renewed every 0.25 s: the renewal finds the lease gone long before the profile write is answered.
    engine = await start_engine(on_request=take_over, lease_ms=1000)
    await pipeline.put([pass_event("acme", "S1", 0, kind="created")])

    async def done() -> bool:
        return engine.stats["leases_lost"] == 1 and engine.held == 0

    await async_wait_for(done, timeout=10)
    await asyncio.sleep(LATENCY_MS / 1000)  # a write sent at the very end would be answered by now
    after = counts(pipeline)
    assert delta(before, after, "create_or_update_profile") == 1
    assert delta(before, after, "create_data_source_record") == 0
    assert delta(before, after, "create_event") == 0
    # No attempt counted, nothing dead-lettered: the event is the new holder's to write.
    assert engine.stats["retried"] == 0
    assert engine.stats["dead_lettered"] == 0
    assert await redis.hlen(keys.retries) == 0
    assert await dlq.list_entries(redis, "acme") == []


async def test_a_holder_whose_renewals_stall_stops_writing_before_its_lease_can_be_taken_over(
    pipeline: Pipeline, redis: Redis, start_engine: StartEngine
) -> None:
    await pipeline.add_account("acme")
    sent = asyncio.Event()

    async def note(request: httpx.Request) -> None:
        if request.url.path == "/api/profile-import":
            sent.set()

    pipeline.sandbox.set_faults(latency_ms=LATENCY_MS)
    # A 1 s lease: its writes stop 0.8 s after the claim. The profile and record take 0.6 s each, so the metric
    # event would leave at 1.2 s, after the lease expired in Redis (1 s) and the other worker took it over.
    stalled = await start_engine(on_request=note, lease_ms=1000)
    stalled._loops[1].cancel()  # its renewer: as if every renewal failed, or its loop stalled
    await pipeline.put([pass_event("acme", "S1", 0, kind="created")])
    await asyncio.wait_for(sent.wait(), timeout=10)
    healthy = await start_engine(lease_ms=1000)
    await async_wait_for(pipeline.drained, timeout=20)
    pipeline.sandbox.clear_faults()
    assert pipeline.stored_unique_ids("acme") == ["acme-S1-0"]
    # The metric event went once, from the new holder: the stalled one sent none after its deadline.
    assert pipeline.duplicate_events("acme") == 0
    assert healthy.stats["written"] == 1
    assert stalled.stats["written"] == 0
    assert stalled.stats["retried"] == 0


async def test_stop_cancels_a_bulk_send_before_it_releases_the_serials_it_carries(
    pipeline: Pipeline, redis: Redis, start_engine: StartEngine
) -> None:
    await pipeline.add_account("acme")
    left: list[str] = []

    async def note(request: httpx.Request) -> None:
        if request.url.path == "/api/event-bulk-create-jobs":
            left.append(request.url.path)

    # Every metric-event bulk request is a 429 with a short Retry-After, which the client waits out and sends
    # the request again (twice); the latency holds each attempt in flight.
    pipeline.sandbox.set_faults(
        latency_ms=LATENCY_MS, error_rates={429: 1.0}, operations=["bulk_create_events"]
    )
    engine = await start_engine(on_request=note, mode=SyncMode.bulk)
    await pipeline.put([pass_event("acme", "S1", 0, kind="created")])

    async def bulk_sent() -> bool:
        return len(left) > 0

    await async_wait_for(bulk_sent, timeout=20)
    await engine.stop(grace_s=0.1)
    keys = account_keys("acme")
    assert await redis.zcard(keys.leased) == 0
    # Released, so no resend may leave after the stop: the serial's next holder writes its event.
    await asyncio.sleep(3 * LATENCY_MS / 1000)
    pipeline.sandbox.clear_faults()
    assert left == ["/api/event-bulk-create-jobs"]
    assert int(await redis.get(keys.depth) or 0) == 1
    assert await redis.zrange(keys.ready, 0, -1) == [b"S1"]
