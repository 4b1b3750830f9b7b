"""Redis outages seen by a long-running loop: reported once, reminded of, and closed.

A worker (and the producer's background flush) must outlive a Redis restart: a container upgrade, a
failover, the host's Redis restarted. Exiting would only turn a short outage into a crash loop, and the
supervisor (compose, systemd) would start processes that fail the same way until Redis is back. So the loops
that talk to Redis keep going, and what the operator reads is three kinds of line per outage:
``redis_unreachable`` at its start, the same every :data:`REMIND_S` while it lasts (with how long so far), and
``redis_reachable_again`` with its length.
"""

from __future__ import annotations

import time

import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = structlog.get_logger(__name__)

#: What an unreachable or restarting Redis raises (``LOADING`` is a ``ConnectionError`` too). Script errors
#: and wrong types are not outages and are not caught by callers as such.
OUTAGE_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
#: While an outage lasts, one reminder per this many seconds.
REMIND_S = 30.0


class OutageLog:
    """Logs the start, reminders and end of a Redis outage for one loop (``where`` names it in each line)."""

    def __init__(self, where: str, **context: str) -> None:
        self.where = where
        self.context = context
        self.since: float | None = None
        self._told = 0.0

    def failed(self, exc: BaseException) -> None:
        """A call to Redis failed with an outage error."""
        now = time.monotonic()
        if self.since is None:
            self.since = self._told = now
            log.warning("redis_unreachable", loop=self.where, error=_describe(exc), **self.context)
        elif now - self._told >= REMIND_S:
            self._told = now
            log.warning(
                "redis_unreachable",
                loop=self.where,
                error=_describe(exc),
                down_s=round(now - self.since, 1),
                **self.context,
            )

    def succeeded(self) -> None:
        """A call to Redis worked: closes the outage, if one was open (cheap otherwise)."""
        if self.since is not None:
            log.warning(
                "redis_reachable_again",
                loop=self.where,
                down_s=round(time.monotonic() - self.since, 1),
                **self.context,
            )
            self.since = None


def _describe(exc: BaseException) -> str:
    # redis-py's messages name host and port, never the URL's password.
    return f"{type(exc).__name__}: {exc}"[:300]


class StillUnreachable(Exception):
    """Redis did not answer within the start-up wait (the message says where and why, for a person)."""


def wait_until_reachable(url: str, timeout_s: float) -> None:
    """Block until the Redis at ``url`` answers PING, for at most ``timeout_s``: a worker started before its
    Redis (a host booting, compose without health checks) waits instead of failing. Raises
    :class:`StillUnreachable` after that, so a wrong ``REDIS_URL`` ends in one clear error."""
    import redis  # the sync client: this runs before the worker's event loop exists

    from passbridge.redis_client import redis_location

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    outage = OutageLog("start-up")
    deadline = time.monotonic() + timeout_s
    pause = 0.1
    try:
        while True:
            try:
                client.ping()
            except OUTAGE_ERRORS as exc:
                outage.failed(exc)
                if time.monotonic() + pause > deadline:
                    raise StillUnreachable(
                        f"Redis at {redis_location(url)} did not answer for {timeout_s:g} s ({_describe(exc)}); "
                        "check REDIS_URL, or raise PASSBRIDGE_WORKER_REDIS_WAIT_S"
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, 2.0)
                continue
            outage.succeeded()
            return
    finally:
        client.close()
