"""Lease fencing of the per-event path (``Syncer.sync_event``): once the serial's lease is lost, the event's
writes still to come — the record and metric event after the profile, a resend after a 429 — are not sent,
and :class:`Abandoned` is raised as it is (never as a ``PartialSync``: the new holder replans the event).

Driven directly against the real sandbox over HTTP and a real Redis; the sandbox's latency holds the first
call in flight while the lease goes (as in ``test_lane_fencing``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis

from passbridge.accounts import Account
from passbridge.event import EventKind
from worker.klaviyo.client import KlaviyoClient
from worker.klaviyo.errors import Abandoned
from worker.setup import provision
from worker.sync import Syncer

from .conftest import RequestRecorder
from .test_lane_fencing import LATENCY_MS, Lease, lose_during_first_call
from .test_sync_sandbox import pass_event


async def test_the_record_and_metric_event_are_not_sent_once_the_lease_is_lost(
    client: KlaviyoClient, redis: Redis, account: Account, sandbox: Any, recorder: RequestRecorder
) -> None:
    await provision(client, redis, account)
    sandbox.set_faults(latency_ms=LATENCY_MS)
    lease = Lease()
    event = pass_event("E1", 1, EventKind.created, 0)
    sync = asyncio.ensure_future(Syncer(client, redis).sync_event(account, None, event, alive=lease.alive))
    await lose_during_first_call(recorder, "/api/profile-import", lease)
    with pytest.raises(Abandoned):
        await asyncio.wait_for(sync, timeout=10)
    sandbox.clear_faults()
    # The profile was on the wire before the lease went; the rest is the new holder's to write.
    assert sandbox.count("create_or_update_profile") == 1
    assert sandbox.count("create_data_source_record") == 0
    assert sandbox.count("create_event") == 0


async def test_a_metric_event_is_not_resent_after_a_429_once_the_lease_is_lost(
    client: KlaviyoClient, redis: Redis, account: Account, sandbox: Any, recorder: RequestRecorder
) -> None:
    await provision(client, redis, account)
    # Every metric event is a 429 with a Retry-After the client waits out: unfenced, it is sent twice more.
    assert client.options.max_throttle_retries == 2
    sandbox.set_faults(latency_ms=LATENCY_MS, error_rates={429: 1.0}, operations=["create_event"])
    lease = Lease()
    event = pass_event("E2", 1, EventKind.created, 0)
    sync = asyncio.ensure_future(Syncer(client, redis).sync_event(account, None, event, alive=lease.alive))
    await lose_during_first_call(recorder, "/api/events", lease)
    # Abandoned itself, although the profile and record were accepted: a PartialSync would make the engine
    # count an attempt (and maybe dead-letter the event) for a serial it no longer holds.
    with pytest.raises(Abandoned):
        await asyncio.wait_for(sync, timeout=10)
    sandbox.clear_faults()
    assert sandbox.count("create_or_update_profile") == 1
    assert sandbox.count("create_data_source_record") == 1
    assert sandbox.count("create_event") == 1
    assert sandbox.count("create_event", 429) == 1
