"""Benchmark the shared Klaviyo rate limiter (worker/klaviyo/ratelimit.py) on a real Redis.

    python bench/klaviyo_limiter.py [--seconds 5]

1. Cost: slots taken per second by one process (one Lua call each) with 1 and with 32 concurrent callers, on
   a tier that never binds — the limiter's own ceiling, to compare with what Klaviyo allows an account in
   total (350 + 75 + 75 requests/s on the per-event endpoints).
2. Budget use: 4 "worker processes" (4 Redis connections, 8 callers each) compete for the profile-import tier
   (75/s, 750/min) with the clock scaled 60× (so one minute lasts one second) for ``--seconds``; the slots
   granted are compared side by side with the tier's budget for that time. It must never exceed the budget,
   and should use most of it: the first window is spent at once, after that a window of grants opens every
   (window + 2 % + 20 ms), the long-run rate reported beside it.

The last line of output is one JSON object with the figures and the targets checked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from redis.asyncio import Redis  # noqa: E402

from passbridge.redis_server import start_redis  # noqa: E402
from worker.klaviyo.endpoints import CREATE_OR_UPDATE_PROFILE, Tier  # noqa: E402
from worker.klaviyo.ratelimit import RateLimiter  # noqa: E402

TARGET_ACQUIRES_PER_S = 2000.0
TARGET_BUDGET_USE = 0.9
SCALE = 60.0


async def cost(url: str, callers: int, seconds: float) -> float:
    redis = Redis.from_url(url)
    limiter = RateLimiter(redis)
    tier = Tier(burst=10**9, steady=10**9)
    done = 0
    deadline = time.perf_counter() + seconds

    async def caller(i: int) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            await limiter.try_acquire(f"bench{i % 4}", "create_event", tier)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(callers)))
    elapsed = time.perf_counter() - started
    await redis.flushall()
    await redis.aclose()
    return done / elapsed


async def budget_use(url: str, seconds: float) -> tuple[int, float, float]:
    clients = [Redis.from_url(url) for _ in range(4)]
    limiters = [RateLimiter(c, scale=SCALE) for c in clients]
    tier = CREATE_OR_UPDATE_PROFILE.tier
    times: list[float] = []
    deadline = time.monotonic() + seconds

    async def caller(limiter: RateLimiter) -> None:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            wait = await limiter.try_acquire("acme", CREATE_OR_UPDATE_PROFILE.name, tier)
            if wait == 0:
                times.append(time.monotonic())
            else:
                await asyncio.sleep(min(wait, left))

    await asyncio.gather(*(caller(limiters[i % 4]) for i in range(32)))
    await clients[0].flushall()
    for c in clients:
        await c.aclose()
    # The tier's budget over `seconds` of scaled time: the steady window binds (750 per 60/SCALE s); the
    # first window may also be spent at once, so the exact bound is 750 × ceil(seconds / window).
    window = 60.0 / SCALE
    budget = tier.steady * (seconds / window)
    # Long-run rate: a new steady window of grants opens every `spacing` seconds (window + safety margin).
    times.sort()
    starts = [
        times[j * tier.steady] for j in range(len(times) // tier.steady) if j * tier.steady < len(times)
    ]
    spacing = (starts[-1] - starts[0]) / (len(starts) - 1) if len(starts) > 1 else float("nan")
    return len(times), budget, window / spacing


async def main(seconds: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        server = start_redis(Path(tmp), appendonly=False)
        try:
            one = await cost(server.url, 1, seconds)
            many = await cost(server.url, 32, seconds)
            granted, budget, steady_use = await budget_use(server.url, seconds)
        finally:
            server.stop()
    use = granted / budget
    print(
        f"limiter cost: {one:,.0f} slots/s with 1 caller, {many:,.0f} slots/s with 32 callers (one process)"
    )
    print(
        f"budget use: {granted} slots granted vs {budget:,.0f} allowed "
        f"(profile-import 750/min, clock ×{SCALE:g}, {seconds:g} scaled minutes) = {use:.1%}; "
        f"long-run rate {steady_use:.1%} of 750/min (one window of grants every {60 / SCALE / steady_use:.3f} s)"
    )
    ok = (
        many >= TARGET_ACQUIRES_PER_S
        and TARGET_BUDGET_USE <= use <= 1.0
        and TARGET_BUDGET_USE <= steady_use <= 1.0
    )
    return {
        "acquires_per_s_1_caller": round(one),
        "acquires_per_s_32_callers": round(many),
        "target_acquires_per_s": TARGET_ACQUIRES_PER_S,
        "granted": granted,
        "budget": round(budget),
        "budget_use": round(use, 4),
        "steady_rate_use": round(steady_use, 4),
        "target_budget_use": [TARGET_BUDGET_USE, 1.0],
        "ok": ok,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.seconds))))
