"""The shared rate limiter: one budget per (Klaviyo account, endpoint), shared by every worker process.

Klaviyo enforces two windows per account and endpoint: a burst window of one second and a steady window of
one minute (``x-klaviyo-ratelimit`` in the spec, e.g. 75/s and 750/m). Each window is a sliding log in Redis
(``AccountKeys.rate_window``) and one Lua script (``passbridge/lua/klaviyo_rate_acquire.lua``) checks both and
takes the slot atomically, on Redis's clock. A 429 writes a pause (``AccountKeys.rate_pause``) that holds the
endpoint back for that account only, until its ``Retry-After`` has passed.

``scale`` runs the clock faster exactly as the sandbox's ``--rate-scale`` does (windows of 1/scale s and
60/scale s with the same counts), so a benchmark spends Klaviyo's real budget in 1/scale of the time.
Windows are stretched by ``safety`` (a fraction) plus ``pad_s`` (wall-clock seconds) so that network jitter
between our send time and Klaviyo's receive time does not push a request into a full window on Klaviyo's side.
What still slips through is a 429 like any other: the request was not processed, the endpoint pauses.
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
    ) -> None:
        if not scale > 0:
            raise ValueError("rate scale must be > 0")
        self.redis = redis
        self.scale = scale
        self.burst_window_us = self._window_us(BURST_WINDOW_S, safety, pad_s)
        self.steady_window_us = self._window_us(STEADY_WINDOW_S, safety, pad_s)
        self._acquire = script(redis, "klaviyo_rate_acquire")
        self._pause = script(redis, "klaviyo_rate_pause")

    def _window_us(self, seconds: float, safety: float, pad_s: float) -> int:
        # The pad is wall-clock (network jitter does not speed up with the scale); the safety share is not.
        return math.ceil((seconds / self.scale * (1 + safety) + pad_s) * 1_000_000)

    async def try_acquire(self, account_id: str, endpoint: str, tier: Tier) -> float:
        """Take a slot now if there is one (returns 0.0), else return the seconds until one may free up."""
        keys = account_keys(account_id)
        wait_us = await self._acquire(
            keys=[
                keys.rate_window(endpoint, "b"),
                keys.rate_window(endpoint, "s"),
                keys.rate_pause(endpoint),
            ],
            args=[
                tier.burst,
                self.burst_window_us,
                tier.steady,
                self.steady_window_us,
                secrets.token_hex(8),
            ],
        )
        return int(wait_us) / 1_000_000

    async def acquire(self, account_id: str, endpoint: str, tier: Tier, *, max_wait_s: float) -> float:
        """Wait for a slot and take it; returns the seconds waited.

        Raises :class:`ThrottledError` without waiting when the slot is further away than ``max_wait_s``
        (a long 429 pause, a spent minute budget): the caller's retry policy parks the work instead of
        holding a worker.
        """
        started = time.monotonic()
        while True:
            wait = await self.try_acquire(account_id, endpoint, tier)
            if wait <= 0:
                return time.monotonic() - started
            waited = time.monotonic() - started
            if waited + wait > max_wait_s:
                raise ThrottledError(
                    wait, endpoint, detail=f"{endpoint}: no rate-limit slot for {wait:.3f} s"
                )
            # A little jitter so that waiters woken by the same free slot do not all race for it at once.
            await asyncio.sleep(wait + random.uniform(0, min(0.005, wait)))

    async def pause(self, account_id: str, endpoint: str, seconds: float) -> None:
        """Hold the endpoint back for this account for ``seconds`` (a 429's Retry-After, in real seconds)."""
        if seconds <= 0:
            return
        await self._pause(
            keys=[account_keys(account_id).rate_pause(endpoint)],
            args=[math.ceil(seconds * 1_000_000)],
        )
        log.info("klaviyo_endpoint_paused", account=account_id, endpoint=endpoint, seconds=seconds)
