"""Klaviyo's two-window rate limits (burst per second, steady per minute), as sliding windows.

Pure logic on an injected clock. Each (account, client, operation) has one log of admission times; the burst
window holds at most ``burst`` admissions in any 1/F s, the steady window at most ``steady`` in any 60/F s
(F = rate scale). Only admitted requests enter the log, so a client that keeps retrying too early does not push
its own admission further away. Memory per key is bounded by ``burst + steady``.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass

_RATE = re.compile(r"^(\d+)/([sm])$")


@dataclass(frozen=True)
class Tier:
    """A burst/steady pair, e.g. 75/s and 750/m."""

    burst: int
    steady: int

    @classmethod
    def parse(cls, ratelimit: dict[str, str]) -> Tier:
        """From the spec's ``x-klaviyo-ratelimit`` (``{"burst": "75/s", "steady": "750/m"}``)."""
        burst = _RATE.match(ratelimit["burst"])
        steady = _RATE.match(ratelimit["steady"])
        if not burst or burst.group(2) != "s" or not steady or steady.group(2) != "m":
            raise ValueError(f"unexpected rate limit {ratelimit!r}")
        return cls(int(burst.group(1)), int(steady.group(1)))


@dataclass(frozen=True)
class Decision:
    """The outcome of one admission check. Times are in real (scaled) seconds."""

    admitted: bool
    remaining: int
    reset_s: float
    retry_after_s: float


class SlidingWindowLimiter:
    """Admission control for every key, on one clock."""

    __slots__ = ("_burst_window", "_logs", "_steady_window", "scale")

    def __init__(self, scale: float = 1.0) -> None:
        if scale <= 0:
            raise ValueError("rate scale must be > 0")
        self.scale = scale
        self._burst_window = 1.0 / scale
        self._steady_window = 60.0 / scale
        # key → (burst log, steady log): admission times inside each window, oldest first.
        self._logs: dict[tuple[str, ...], tuple[deque[float], deque[float]]] = {}

    def check(self, key: tuple[str, ...], tier: Tier, now: float) -> Decision:
        """Admit (and record) a request at ``now`` if both windows have room."""
        logs = self._logs.get(key)
        if logs is None:
            logs = self._logs[key] = (deque(), deque())
        burst_log, steady_log = logs
        burst_horizon = now - self._burst_window
        while burst_log and burst_log[0] <= burst_horizon:
            burst_log.popleft()
        steady_horizon = now - self._steady_window
        while steady_log and steady_log[0] <= steady_horizon:
            steady_log.popleft()
        # A full window frees a slot when its oldest admission leaves it.
        wait = 0.0
        if len(burst_log) >= tier.burst:
            wait = burst_log[len(burst_log) - tier.burst] + self._burst_window - now
        if len(steady_log) >= tier.steady:
            wait = max(wait, steady_log[len(steady_log) - tier.steady] + self._steady_window - now)
        if wait > 0:
            return Decision(False, 0, wait, wait)
        burst_log.append(now)
        steady_log.append(now)
        remaining = max(0, min(tier.burst - len(burst_log), tier.steady - len(steady_log)))
        return Decision(True, remaining, burst_log[0] + self._burst_window - now, 0.0)

    def reset(self) -> None:
        """Forget every admission."""
        self._logs.clear()

    def retry_after_header(self, wait_s: float) -> str:
        """``Retry-After``: whole Klaviyo seconds (at least 1), divided by the scale (fractional when scaled)."""
        klaviyo_seconds = max(1, math.ceil(wait_s * self.scale - 1e-9))
        if self.scale == 1.0:
            return str(klaviyo_seconds)
        return format_seconds(klaviyo_seconds / self.scale)


def format_seconds(value: float) -> str:
    """A compact decimal for a header (no exponent, no trailing zeros)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text or "0"
