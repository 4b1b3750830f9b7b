"""The shared limiter against a real Redis: both windows, the rate scale, 429 pauses, many processes' worth of
concurrent callers, per-account and per-endpoint isolation."""

from __future__ import annotations

import asyncio
import itertools
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


# --- pacing a backlog's requests ------------------------------------------------------------------------------

# scale 60: the minute window lasts one second (1.02 s + 20 ms of pad), so a steady budget of 10 is paced at one
# request per 104 ms.
PACE_TIER = Tier(burst=100, steady=10)
PACE_S = (60 / 60 * 1.02 + 0.02) / 10


async def test_paced_requests_are_spread_over_the_window(redis: Redis) -> None:
    limiter = RateLimiter(redis, scale=60)
    assert await limiter.try_acquire("acme", "create_event", PACE_TIER, paced=True) == 0.0
    wait = await limiter.try_acquire("acme", "create_event", PACE_TIER, paced=True)
    assert PACE_S - 0.02 < wait <= PACE_S
    # Looking does not move the pace on.
    assert await limiter.try_acquire("acme", "create_event", PACE_TIER, paced=True, peek=True) > 0.05
    await asyncio.sleep(wait)
    assert await limiter.try_acquire("acme", "create_event", PACE_TIER, paced=True) == 0.0
    # The same budget unpaced: all ten go at once, up to the window.
    waits = [await limiter.try_acquire("globex", "create_event", PACE_TIER) for _ in range(11)]
    assert waits[:10] == [0.0] * 10
    assert waits[10] > 0.8


async def test_a_paced_backlog_spends_the_steady_budget_evenly(redis: Redis) -> None:
    """Over one window the paced caller gets about the whole budget, never more, one request at a time."""
    limiter = RateLimiter(redis, scale=60)
    admitted: list[float] = []
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        await limiter.acquire("acme", "create_event", PACE_TIER, max_wait_s=1, paced=True)
        admitted.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(admitted)]
    assert 9 <= len(admitted) <= 11
    assert min(gaps) > PACE_S - 0.03  # evenly spaced: never two in a burst


async def test_fresh_requests_are_not_held_by_the_pace_and_still_count_in_the_windows(redis: Redis) -> None:
    limiter = RateLimiter(redis, scale=60)
    assert await limiter.try_acquire("acme", "create_event", PACE_TIER, paced=True) == 0.0
    # A fresh event's request (not paced) goes at once, right behind the backlog's.
    assert [await limiter.try_acquire("acme", "create_event", PACE_TIER) for _ in range(9)] == [0.0] * 9
    # The window is full now: the backlog waits for the window, whatever its pace says.
    await asyncio.sleep(PACE_S)
    assert await limiter.try_acquire("acme", "create_event", PACE_TIER, paced=True) > 0.8


async def test_pace_burst_lets_a_share_of_the_budget_go_at_once(redis: Redis) -> None:
    limiter = RateLimiter(redis, scale=60, pace_burst=0.3)
    waits = [await limiter.try_acquire("acme", "create_event", PACE_TIER, paced=True) for _ in range(5)]
    # Three intervals ahead of the pace: four at once, the fifth one interval later.
    assert waits[:4] == [0.0] * 4
    assert PACE_S - 0.02 < waits[4] <= PACE_S


async def test_pacing_off_holds_a_backlog_to_the_windows_only(redis: Redis) -> None:
    limiter = RateLimiter(redis, scale=60, pace_burst=None)
    waits = [await limiter.try_acquire("acme", "create_event", PACE_TIER, paced=True) for _ in range(11)]
    assert waits[:10] == [0.0] * 10
    assert waits[10] > 0.8


@pytest.mark.parametrize("burst", [-0.1, 1.5])
def test_pace_burst_must_be_a_share(burst: float) -> None:
    with pytest.raises(ValueError, match="pace burst"):
        RateLimiter(None, pace_burst=burst)  # type: ignore[arg-type]
