"""The shared limiter against a real Redis: both windows, the rate scale, 429 pauses, many processes' worth of
concurrent callers, per-account and per-endpoint isolation."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio import Redis

from worker.klaviyo.endpoints import Tier
from worker.klaviyo.errors import ThrottledError
from worker.klaviyo.ratelimit import RateLimiter


async def test_burst_window_admits_exactly_the_burst(redis: Redis) -> None:
    limiter = RateLimiter(redis, pad_s=0.005)
    tier = Tier(burst=5, steady=100)
    waits = [await limiter.try_acquire("acme", "create_event", tier) for _ in range(6)]
    assert waits[:5] == [0.0] * 5
    assert 1.45 < waits[5] <= 1.53  # the oldest of the five leaves the (1 s + 50 % burst margin) window


async def test_steady_window_and_scale(redis: Redis) -> None:
    # scale 60: the minute window lasts one second; the burst window 1/60 s.
    limiter = RateLimiter(redis, scale=60)
    tier = Tier(burst=100, steady=10)
    assert [await limiter.try_acquire("acme", "create_event", tier) for _ in range(10)] == [0.0] * 10
    wait = await limiter.try_acquire("acme", "create_event", tier)
    assert 0.9 < wait <= 1.05  # 1 s + 2 % + 20 ms of wall-clock pad
    await asyncio.sleep(wait)
    assert await limiter.try_acquire("acme", "create_event", tier) == 0.0


async def test_acquire_waits_for_a_slot(redis: Redis) -> None:
    limiter = RateLimiter(redis, scale=20)  # burst window 50 ms
    tier = Tier(burst=2, steady=1000)
    started = time.monotonic()
    for _ in range(6):
        await limiter.acquire("acme", "create_event", tier, max_wait_s=1)
    elapsed = time.monotonic() - started
    assert 0.09 < elapsed < 0.5  # three bursts of two, two waits of ~51 ms


async def test_acquire_gives_up_beyond_max_wait(redis: Redis) -> None:
    limiter = RateLimiter(redis)
    tier = Tier(burst=1, steady=100)
    await limiter.acquire("acme", "create_event", tier, max_wait_s=0.1)
    started = time.monotonic()
    with pytest.raises(ThrottledError) as info:
        await limiter.acquire("acme", "create_event", tier, max_wait_s=0.1)
    assert time.monotonic() - started < 0.05  # it did not sit out the wait it could not afford
    assert info.value.endpoint == "create_event"
    assert 1.45 < info.value.retry_after_s <= 1.55  # the one-second window plus its 50 % margin


async def test_429_pause_holds_one_endpoint_of_one_account(redis: Redis) -> None:
    limiter = RateLimiter(redis)
    tier = Tier(burst=100, steady=1000)
    await limiter.pause("acme", "create_event", 0.3)
    wait = await limiter.try_acquire("acme", "create_event", tier)
    assert 0.25 < wait <= 0.3
    assert await limiter.try_acquire("acme", "create_or_update_profile", tier) == 0.0
    assert await limiter.try_acquire("globex", "create_event", tier) == 0.0
    await limiter.pause("acme", "create_event", 0.05)  # a shorter pause never shortens a running one
    assert await limiter.try_acquire("acme", "create_event", tier) > 0.2
    await asyncio.sleep(0.31)
    assert await limiter.try_acquire("acme", "create_event", tier) == 0.0


async def test_many_clients_share_one_budget(redis_url: str) -> None:
    """Twenty callers on four connections (as four worker processes would be) get exactly the budget."""
    clients = [Redis.from_url(redis_url) for _ in range(4)]
    limiters = [RateLimiter(c, scale=30) for c in clients]  # minute window = 2 s
    tier = Tier(burst=5, steady=15)
    admitted: list[float] = []
    deadline = time.monotonic() + 1.5

    async def caller(limiter: RateLimiter) -> None:
        while time.monotonic() < deadline:
            wait = await limiter.try_acquire("acme", "create_event", tier)
            if wait == 0:
                admitted.append(time.monotonic())
            else:
                await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())) + 0.001)

    try:
        await asyncio.gather(*(caller(limiters[i % 4]) for i in range(20)))
    finally:
        for c in clients:
            await c.aclose()
    assert len(admitted) == 15  # the steady budget of one (scaled) minute, not one more
    admitted.sort()
    # The burst window (1/30 s) let at most five through at a time: fifteen need at least two more windows.
    assert admitted[-1] - admitted[0] > 2 / 30


def test_scale_must_be_positive() -> None:
    with pytest.raises(ValueError, match="rate scale"):
        RateLimiter(None, scale=0)  # type: ignore[arg-type]
