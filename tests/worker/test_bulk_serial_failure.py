"""A bug met by one serial's data in the bulk strategy fails that serial's head like any other error of it (an
attempt counted, retried, dead-lettered in the end), not the whole claimed batch again and again without an
attempt. An in-process bulk-mode engine, the sandbox over HTTP, a real Redis.
"""

from __future__ import annotations

import orjson
from redis.asyncio import Redis

from passbridge.keys import account_keys
from tests.conftest import async_wait_for
from worker import dlq
from worker.batching import SyncMode
from worker.retry import RetryPolicy

from .conftest import StartEngine
from .e2e import Pipeline
from .helpers import pass_event

#: A stored state whose times carry no time zone: readable as a PassState (the engine never writes one), but
#: comparing them with an event's time raises in the coalescing, every time.
NAIVE_STATE = {
    "serial_number": "S1",
    "pass_type": "ptk_0x216",
    "platform": "apple",
    "status": "active",
    "pass_url": "https://passninja.com/p/S1",
    "created_at": "2026-11-25T09:00:00",
    "updated_at": "2026-11-25T09:00:00",
    "event_id": "acme-S1-old",
}


async def test_a_serial_the_coalescing_fails_on_is_dead_lettered_and_its_batch_is_written(
    pipeline: Pipeline, redis: Redis, start_engine: StartEngine
) -> None:
    await pipeline.add_account("acme")
    await redis.hset(account_keys("acme").state, "S1", orjson.dumps(NAIVE_STATE))
    # Claimed together: S2 must not pay for S1.
    await pipeline.put([pass_event("acme", "S1", 0), pass_event("acme", "S2", 0, kind="created")])
    policy = RetryPolicy(base_delay_s=0.05, max_delay_s=0.2, max_attempts=3)
    await start_engine(mode=SyncMode.bulk, retry=policy)
    await async_wait_for(pipeline.drained, timeout=20)
    assert pipeline.stored_unique_ids("acme") == ["acme-S2-0"]
    (dead,) = await dlq.list_entries(redis, "acme")
    assert dead.event_id == "acme-S1-0"
    assert [e["code"] for e in dead.errors] == ["internal"] * 3
    assert "offset-naive" in dead.errors[-1]["message"]
