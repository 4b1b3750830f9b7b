"""Redis outages seen by a long-running loop: reported once, reminded of, and closed.

A worker (and the producer's background flush) must outlive a Redis restart (a container upgrade, a
failover, the host's Redis restarted) and a Redis that refuses writes for a while (full, or a replica
mid-failover). Exiting would only turn a short outage into a crash loop, and the supervisor (compose, systemd)
would start processes that fail the same way until Redis is back. So the loops that talk to Redis keep going,
and what the operator reads is three kinds of line per outage: ``redis_unreachable`` at its start, the same
every :data:`REMIND_S` while it lasts (with how long so far), and ``redis_reachable_again`` with its length.
"""

from __future__ import annotations

import os
import re
import time
from typing import TYPE_CHECKING

import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = structlog.get_logger(__name__)

#: What a Redis that refuses every write answers: ``OOM`` (used memory over ``maxmemory`` with the
#: ``noeviction`` policy) and ``READONLY`` (a replica: a failover under way, or REDIS_URL names a replica).
#: Both last until an operator (or the failover) acts, like an unreachable Redis, and are waited out the same
#: way: a worker that exited on them would turn a full Redis into a crash loop.
REFUSAL_ERRORS = (OutOfMemoryError, ReadOnlyError)
#: What an unreachable, restarting or write-refusing Redis raises (``LOADING`` is a ``ConnectionError``
#: too). Other script errors and wrong types are not outages and are not caught by callers as such.
OUTAGE_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, *REFUSAL_ERRORS)
#: How a Lua script's failed write reports those refusals (a plain ``ResponseError``: "Error running script
#: ... -OOM command not allowed ...").
_SCRIPT_REFUSALS = ("-OOM ", "-READONLY ")


def refuses_writes(exc: BaseException) -> bool:
    """Whether ``exc`` says Redis refuses writes (full, or a replica), raised directly or from a script."""
    if isinstance(exc, REFUSAL_ERRORS):
        return True
    return isinstance(exc, ResponseError) and any(mark in str(exc) for mark in _SCRIPT_REFUSALS)


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` is an outage to wait out: Redis unreachable or restarting, or refusing writes (raised
    directly or from a script)."""
    return isinstance(exc, OUTAGE_ERRORS) or refuses_writes(exc)


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
            log.warning("redis_unreachable", loop=self.where, error=describe_outage(exc), **self.context)
        elif now - self._told >= REMIND_S:
            self._told = now
            log.warning(
                "redis_unreachable",
                loop=self.where,
                error=describe_outage(exc),
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


#: redis-py's error for a command of a pipeline quotes all of its arguments: account records (encrypted
#: secrets), event payloads (contact details), pickled arq jobs. Only the command's name is kept.
_PIPELINE_ARGS = re.compile(r"\((\S+) .*\) of pipeline caused error: ", re.DOTALL)


def redis_error_text(exc: BaseException) -> str:
    """``exc``'s text with a pipeline command's arguments left out (its name stays)."""
    return _PIPELINE_ARGS.sub(r"(\1 ...) of pipeline caused error: ", str(exc))


def describe_outage(exc: BaseException) -> str:
    """One line for an outage error: its type and text, and for a refusal what to do."""
    # redis-py's messages name host and port, never the URL's password.
    text = f"{type(exc).__name__}: {redis_error_text(exc)}"[:300]
    if isinstance(exc, OutOfMemoryError) or "-OOM " in text:
        return f"{text} (Redis is full and refuses writes: free memory or raise maxmemory)"
    if isinstance(exc, ReadOnlyError) or "-READONLY " in text:
        return f"{text} (Redis is a read-only replica: a failover under way, or REDIS_URL names a replica)"
    return text


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
                        f"Redis at {redis_location(url)} did not answer for {timeout_s:g} s ({describe_outage(exc)}); "
                        "check REDIS_URL, or raise PASSBRIDGE_WORKER_REDIS_WAIT_S"
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, 2.0)
                continue
            outage.succeeded()
            return
    finally:
        client.close()


class DataMarker:
    """Notices a Redis that came back without its data (no AOF, a new container without its volume, a
    flush): every event queued before is gone, and so are the accounts. Nothing in the data says so (an
    empty Redis looks like a fresh install), so each process remembers the marker it saw
    (``keys.DATA_MARKER``) and reports, once per loss, when it is gone or replaced."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.seen: bytes | None = None

    async def check(self, redis: Redis) -> bool:
        """Set the marker if missing and read it (one round trip); ``True`` (logged as ``redis_data_lost``)
        when it is not the one this process saw before. Redis errors are the caller's."""
        from passbridge.keys import DATA_MARKER

        async with redis.pipeline(transaction=False) as pipe:
            pipe.set(DATA_MARKER, os.urandom(8).hex(), nx=True)
            pipe.get(DATA_MARKER)
            _, current = await pipe.execute()
        lost = self.seen is not None and current != self.seen
        if lost:
            log.error(
                "redis_data_lost",
                loop=self.where,
                detail="Redis came back without its data (restarted without its AOF, a new server, or "
                "flushed): events queued before are gone; register the accounts again (or restart with "
                "PASSBRIDGE_ACCOUNTS_FILE) and run `passbridge klaviyo setup`",
            )
        self.seen = current
        return lost
