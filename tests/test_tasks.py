"""Stopping the producer's background loops: one cancellation may be lost on Python 3.11, and the stop must still
end (passbridge/tasks.py)."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from redis.asyncio import Redis

from passbridge import metrics
from passbridge.tasks import cancel_until_done
from producer.app import redis_client


async def test_a_loop_that_misses_one_cancellation_is_still_stopped() -> None:
    """What Python 3.11's wait_for does to a cancellation that comes with its inner result, made deterministic: the
    loop goes on after the first cancellation, and the second ends it."""
    cancellations = 0

    async def loop() -> None:
        nonlocal cancellations
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                cancellations += 1
                if cancellations == 1:
                    continue  # lost, as wait_for loses it
                raise

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.02)
    async with asyncio.timeout(2):
        await cancel_until_done(task)
    assert task.cancelled()
    assert cancellations == 2


async def test_what_the_task_raised_other_than_the_cancellation_is_raised() -> None:
    async def fails() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            raise ValueError("closing failed") from None

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="closing failed"):
        await cancel_until_done(task)


async def test_the_activity_flusher_stops_whenever_the_stop_comes(redis_url: str, redis: Redis) -> None:
    """The flusher against a real Redis, flushing back to back, stopped at random instants: a stop that lands as
    redis-py's send of a command completes used to be lost (about one stop in twenty here), and the producer's
    shutdown then waited for the flusher for ever."""
    client = redis_client(redis_url)
    try:
        for _ in range(200):
            metrics.RECORDER.count("acme", "ingested", 1)
            task = metrics.start_flusher(client, interval_s=0.0005)
            await asyncio.sleep(random.uniform(0, 0.01))
            started = time.monotonic()
            # A bare cancel and await stuck on a lost cancellation is cancelled again by this timeout, and then
            # ends: hence the time taken, measured (well under the timeout, with room for a busy machine).
            async with asyncio.timeout(3):
                await metrics.stop_flusher(task, client)
            assert task.done()
            assert time.monotonic() - started < 2.5
    finally:
        await client.aclose()
