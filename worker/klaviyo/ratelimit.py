"""The shared rate limiter: one budget per (Klaviyo account, endpoint), shared by every worker process.

Klaviyo enforces two windows per account and endpoint: a burst window of one second and a steady window of
one minute (``x-klaviyo-ratelimit`` in the spec, e.g. 75/s and 750/m). Each window is a sliding log in Redis
(``AccountKeys.rate_window``) and one Lua script (``passbridge/lua/klaviyo_rate_acquire.lua``) checks both and
takes the slot atomically, on Redis's clock. A 429 writes a pause (``AccountKeys.rate_pause``) that holds the
endpoint back for that account only, until its ``Retry-After`` has passed.

``scale`` runs the clock faster exactly as the sandbox's ``--rate-scale`` does (windows of 1/scale s and
60/scale s with the same counts), so a benchmark spends Klaviyo's real budget in 1/scale of the time.
Windows are stretched by ``safety`` (a fraction; ``burst_safety`` for the one-second window) plus ``pad_s``
(wall-clock seconds) so that the delay between taking a slot and Klaviyo receiving the request (a busy event
loop, network jitter) does not push a request into a full window on Klaviyo's side.
What still slips through is a 429 like any other: the request was not processed, the endpoint pauses.

A backlog's requests may also be *paced* (:meth:`RateLimiter.pace`, ``AccountKeys.rate_pace``): admitted one
interval of the steady window apart instead of all at the window's start, on top of the windows (README
"Fair share across accounts").
"""

from __future__ import annotations

import asyncio
import math
import random
import secrets
import time

import structlog
from redis.asyncio import Redis

from passbridge.keys import account_keys
from passbridge.scripts import script
from worker.klaviyo.endpoints import Tier
from worker.klaviyo.errors import ThrottledError

log = structlog.get_logger(__name__)

BURST_WINDOW_S = 1.0


def new_slot() -> str:
    """A fresh, unique slot name (the member a request is logged under in the windows)."""
    return secrets.token_hex(8)


STEADY_WINDOW_S = 60.0


class RateLimiter:
    """Takes request slots from the shared per-(account, endpoint) budget in Redis."""

    def __init__(
        self,
        redis: Redis,
        *,
        scale: float = 1.0,
        safety: float = 0.02,
        pad_s: float = 0.02,
        burst_safety: float = 0.5,
        pace_burst: float | None = 0.0,
    ) -> None:
        if not scale > 0:
            raise ValueError("rate scale must be > 0")
        if pace_burst is not None and not 0 <= pace_burst <= 1:
            raise ValueError("pace burst must be within 0..1")
        self.redis = redis
        self.scale = scale
        # The burst window gets a wider margin: a request is sent a little after its slot was taken (an
        # event loop busy for tens of ms), and a one-second window has little room for that. It costs no
        # steady throughput: every tier can spend its minute budget in well under a minute at 2/3 of its
        # burst rate.
        self.burst_window_us = self._window_us(BURST_WINDOW_S, max(safety, burst_safety), pad_s)
        self.steady_window_us = self._window_us(STEADY_WINDOW_S, safety, pad_s)
        #: The share of an endpoint's steady budget a backlog may spend at once before it is paced (``None``:
        #: backlogs are not paced, only held to the windows).
        self.pace_burst = pace_burst
        self._acquire = script(redis, "klaviyo_rate_acquire")
        self._pause = script(redis, "klaviyo_rate_pause")

    def _window_us(self, seconds: float, safety: float, pad_s: float) -> int:
        # The pad is wall-clock (network jitter does not speed up with the scale); the safety share is not.
        return math.ceil((seconds / self.scale * (1 + safety) + pad_s) * 1_000_000)

    async def try_acquire(
        self,
        account_id: str,
        endpoint: str,
        tier: Tier,
        *,
        reserve: float = 0.0,
        peek: bool = False,
        slot: str | None = None,
        paced: bool = False,
    ) -> float:
        """Take a slot now if there is one (returns 0.0), else return the seconds until one may free up.

        ``reserve`` (a fraction of each window): take the slot only if that share of the window stays free,
        for callers that must not be kept waiting (the bulk lanes keep it for fresh events). ``peek``: only
        say whether a slot is free, without taking it (the caller takes it right before sending: a slot
        taken long before its request leaves would let Klaviyo see the requests closer together than the
        limiter admitted them). ``slot``: the name the slot is logged under (see :meth:`refund`). ``paced``:
        a backlog's request, held to the steady rate evenly over the window (:meth:`pace`).
        """
        keys = account_keys(account_id)
        interval_us, tolerance_us = self.pace(tier) if paced and self.pace_burst is not None else (0, 0)
        wait_us = await self._acquire(
            keys=[
                keys.rate_window(endpoint, "b"),
                keys.rate_window(endpoint, "s"),
                keys.rate_pause(endpoint),
                keys.rate_pace(endpoint),
            ],
            args=[
                tier.burst,
                self.burst_window_us,
                tier.steady,
                self.steady_window_us,
                slot or new_slot(),
                min(tier.burst - 1, math.ceil(tier.burst * reserve)),
                min(tier.steady - 1, math.ceil(tier.steady * reserve)),
                "1" if peek else "0",
                interval_us,
                tolerance_us,
            ],
        )
        return int(wait_us) / 1_000_000

    def pace(self, tier: Tier) -> tuple[int, int]:
        """The interval (µs) between a backlog's paced requests to an endpoint of ``tier``, and how far ahead
        of that pace they may run (µs): ``pace_burst`` of the steady budget.

        Left to the windows alone, a backlog spends a whole minute's budget in its first seconds (at the burst
        rate) and then waits for the minute to roll over: every worker, Redis and the sandbox get busy at once,
        each minute, and another account's event that arrives then waits behind all of it. Paced, the same
        budget goes out evenly: the same requests per minute, never more than the windows allow.
        """
        interval = self.steady_window_us // tier.steady
        return interval, math.floor(tier.steady * (self.pace_burst or 0.0)) * interval

    async def acquire(
        self,
        account_id: str,
        endpoint: str,
        tier: Tier,
        *,
        max_wait_s: float,
        slot: str | None = None,
        paced: bool = False,
    ) -> float:
        """Wait for a slot and take it (logged as ``slot``); returns the seconds waited.

        Raises :class:`ThrottledError` without waiting when the slot is further away than ``max_wait_s``
        (a long 429 pause, a spent minute budget): the caller's retry policy parks the work instead of
        holding a worker.
        """
        started = time.monotonic()
        while True:
            wait = await self.try_acquire(account_id, endpoint, tier, slot=slot, paced=paced)
            if wait <= 0:
                return time.monotonic() - started
            waited = time.monotonic() - started
            if waited + wait > max_wait_s:
                raise ThrottledError(
                    wait, endpoint, detail=f"{endpoint}: no rate-limit slot for {wait:.3f} s"
                )
            # A little jitter so that waiters woken by the same free slot do not all race for it at once.
            await asyncio.sleep(wait + random.uniform(0, min(0.005, wait)))

    async def refund(self, account_id: str, endpoint: str, slot: str) -> None:
        """Give back a slot whose request Klaviyo refused with a 429: Klaviyo counts only what it admitted,
        so keeping it in our log would cost a slot of the window for nothing (dear for a tier of 15/min)."""
        keys = account_keys(account_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(keys.rate_window(endpoint, "b"), slot)
            pipe.zrem(keys.rate_window(endpoint, "s"), slot)
            await pipe.execute()

    async def pause(self, account_id: str, endpoint: str, seconds: float) -> None:
        """Hold the endpoint back for this account for ``seconds`` (a 429's Retry-After, in real seconds)."""
        if seconds <= 0:
            return
        await self._pause(
            keys=[account_keys(account_id).rate_pause(endpoint)],
            args=[math.ceil(seconds * 1_000_000)],
        )
        log.info("klaviyo_endpoint_paused", account=account_id, endpoint=endpoint, seconds=seconds)
