"""Lease fencing of the bulk lanes' single sends (worker.bulk): once a serial's lease is lost or released, the
calls still to come for its item — the next metric event, a resend after a 429 — are not sent, and the item
is dropped (as at the lane's pop), never reported as written.

The lane and the client are driven directly, against the real sandbox over HTTP and a real Redis; the sandbox's
latency holds the item's first call in flight while the lease goes.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import orjson
from redis.asyncio import Redis

from passbridge.accounts import Account
from passbridge.event import EventKind
from worker.bulk import BulkSync, Item, Outcome, Verdict
from worker.klaviyo.client import KlaviyoClient
from worker.plan import bulk_events_entry, coalesce, profile_body
from worker.sync import Syncer

from .conftest import RequestRecorder
from .test_sync_sandbox import pass_event

#: How long the sandbox holds each request: the lease is lost while the item's first call waits.
LATENCY_MS = 400


class Lease:
    """What the engine's ``alive()`` reads: flags, flipped here the way a takeover or a release would."""

    def __init__(self) -> None:
        self.lost = False

    def alive(self) -> bool:
        return not self.lost


def item(payload: Any, blob: bytes, units: int, serial: str, lease: Lease) -> Item:
    fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
    # Urgent: a fresh serial goes by single calls at once.
    return Item(payload, blob, units, True, serial, lease.alive, fut)


async def lose_during_first_call(recorder: RequestRecorder, path: str, lease: Lease) -> None:
    """Flip the lease once the item's first request has left (the sandbox answers it after LATENCY_MS)."""
    for _ in range(1000):
        if any(urlsplit(r.url).path == path for r in recorder.api_requests()):
            break
        await asyncio.sleep(0.005)
    else:
        raise AssertionError(f"no request to {path} left within 5 s")
    lease.lost = True


async def test_events_of_a_lost_serial_after_the_one_in_flight_are_not_sent(
    client: KlaviyoClient, redis: Redis, account: Account, sandbox: Any, recorder: RequestRecorder
) -> None:
    sandbox.set_faults(latency_ms=LATENCY_MS)
    events = [pass_event("F1", n, EventKind.updated, n) for n in range(1, 4)]
    lanes = BulkSync(Syncer(client, redis)).lanes(account)
    lease = Lease()
    it = item(events, orjson.dumps(bulk_events_entry("F1", events)), len(events), "F1", lease)
    out = lanes.events.submit(account, it)
    await lose_during_first_call(recorder, "/api/events", lease)
    outcome = await asyncio.wait_for(out, timeout=10)
    sandbox.clear_faults()
    # The first event was on the wire before the lease went; the other two are left to the new holder.
    assert sandbox.count("create_event") == 1
    assert outcome.verdict is Verdict.dropped


async def test_a_profile_write_is_not_resent_after_a_429_once_the_lease_is_lost(
    client: KlaviyoClient, redis: Redis, account: Account, sandbox: Any, recorder: RequestRecorder
) -> None:
    # Every attempt is a 429 with a Retry-After the client waits out: unfenced, it would send it twice more.
    assert client.options.max_throttle_retries == 2
    sandbox.set_faults(latency_ms=LATENCY_MS, error_rates={429: 1.0}, operations=["create_or_update_profile"])
    events = [pass_event("F2", 1, EventKind.created, 0)]
    state = coalesce(None, events).new_state
    assert state is not None
    lanes = BulkSync(Syncer(client, redis)).lanes(account)
    lease = Lease()
    it = item(state, orjson.dumps(profile_body(state)["data"]), 1, "F2", lease)
    out = lanes.profiles.submit(account, it)
    await lose_during_first_call(recorder, "/api/profile-import", lease)
    outcome = await asyncio.wait_for(out, timeout=10)
    sandbox.clear_faults()
    assert sandbox.count("create_or_update_profile") == 1
    assert sandbox.count("create_or_update_profile", 429) == 1
    assert outcome.verdict is Verdict.dropped
