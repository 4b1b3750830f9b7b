"""Prometheus exposition: gauges computed from Redis at scrape time, and the worker's ``/metrics`` server.

:func:`queue_families` reads the queue through :mod:`worker.inspect` (the same figures ``passbridge status``
shows) and :func:`render` adds them to the process's counters (:mod:`passbridge.metrics`). The producer serves
that at ``GET /metrics``; a worker started with ``--metrics-port`` serves it from a small HTTP server running
in the worker's own event loop (:class:`MetricsServer`), so a scrape reads Redis with the worker's client and
needs no thread. Both read the gauges at most once per :data:`GAUGES_FRESH_S` (:class:`GaugeCache`) and, with
``PASSBRIDGE_METRICS_TOKEN`` set, answer only requests that carry it (:func:`bearer_ok`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import math
import time
from dataclasses import dataclass, field

import orjson
import structlog
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from redis.asyncio import Redis
from redis.exceptions import RedisError

from passbridge import metrics
from worker import inspect

log = structlog.get_logger(__name__)

STATES = ("connected", "paused", "disconnected", "unknown")


async def queue_families(redis: Redis) -> list[Metric]:
    """Per-account queue gauges and worker liveness, read from Redis now."""
    now, accounts = await inspect.overview(redis)
    depth = GaugeMetricFamily(
        "passbridge_queue_depth", "Pending events (queued, not yet delivered).", labels=["account"]
    )
    serials = GaugeMetricFamily(
        "passbridge_serials",
        "Serials with pending events by state: ready (due), parked (waiting for a retry), leased (being worked).",
        labels=["account", "state"],
    )
    oldest = GaugeMetricFamily(
        "passbridge_oldest_event_age_seconds",
        "Age of the oldest pending event since the producer received it (0 when none is pending).",
        labels=["account"],
    )
    dlq = GaugeMetricFamily("passbridge_dlq_size", "Events in the dead-letter queue.", labels=["account"])
    paused = GaugeMetricFamily(
        "passbridge_account_paused",
        "1 while the account's events are not being sent (paused or disconnected).",
        labels=["account"],
    )
    state = GaugeMetricFamily(
        "passbridge_account_state", "1 for the account's current state.", labels=["account", "state"]
    )
    for a in accounts:
        account_id = a.info.account_id
        q = a.queue
        depth.add_metric([account_id], q.pending_events)
        serials.add_metric([account_id, "ready"], q.ready_serials)
        serials.add_metric([account_id, "parked"], q.parked_serials)
        serials.add_metric([account_id, "leased"], q.leased_serials)
        oldest.add_metric([account_id], q.oldest_age_s(now))
        dlq.add_metric([account_id], q.dlq)
        paused.add_metric([account_id], 0 if a.state == "connected" else 1)
        for s in STATES:
            state.add_metric([account_id, s], 1 if a.state == s else 0)
    alive = GaugeMetricFamily(
        "passbridge_workers_alive", "Worker processes with a heartbeat in the last 10 s."
    )
    beat = GaugeMetricFamily(
        "passbridge_worker_heartbeat_age_seconds",
        "Seconds since each known worker's last heartbeat.",
        labels=["worker"],
    )
    held = GaugeMetricFamily(
        "passbridge_worker_held_serials", "Serials each worker holds.", labels=["worker"]
    )
    live = 0
    for w in await inspect.workers(redis):
        live += w.alive(now)
        beat.add_metric([w.worker_id], max(0.0, (now - w.beat_ms) / 1000))
        held.add_metric([w.worker_id], float(w.info.get("held", 0)))
    alive.add_metric([], live)
    return [depth, serials, oldest, dlq, paused, state, alive, beat, held]


#: How long a process reuses the queue gauges it read: one scrape reads every account's queue, so a tight
#: scrape loop (or several Prometheus servers) must not multiply that work on the Redis shared with ingest.
GAUGES_FRESH_S = 5.0


class GaugeCache:
    """The queue gauges of one process, read from Redis at most once per :data:`GAUGES_FRESH_S`.

    Concurrent scrapes of a stale cache wait for the one read in flight instead of starting their own.
    """

    def __init__(self, fresh_s: float = GAUGES_FRESH_S) -> None:
        self.fresh_s = fresh_s
        self._read_at = -math.inf
        self._families: list[Metric] = []
        self._lock: asyncio.Lock | None = None

    async def families(self, redis: Redis) -> list[Metric]:
        """The gauges, read now if the last read is older than ``fresh_s`` (RedisError/OSError propagate)."""
        if time.monotonic() - self._read_at < self.fresh_s:
            return self._families
        if self._lock is None:  # created on the loop that uses it
            self._lock = asyncio.Lock()
        async with self._lock:
            if time.monotonic() - self._read_at < self.fresh_s:  # another scrape read them meanwhile
                return self._families
            self._families = await queue_families(redis)
            self._read_at = time.monotonic()
            return self._families


async def render(redis: Redis, cache: GaugeCache | None = None) -> bytes:
    """The full exposition: this process's (or all producer processes') counters plus the queue gauges
    (through ``cache`` when given).

    If Redis cannot be read the counters are still served, and ``passbridge_redis_up`` says why the gauges
    are missing.
    """
    up = GaugeMetricFamily("passbridge_redis_up", "1 when the scrape could read the queue from Redis.")
    try:
        families = await (cache.families(redis) if cache is not None else queue_families(redis))
        up.add_metric([], 1)
    except (RedisError, OSError) as exc:
        log.warning("metrics_redis_unreadable", error=type(exc).__name__)
        families = []
        up.add_metric([], 0)
    return metrics.exposition([*families, up])


def bearer_ok(authorization: str, token: str | None) -> bool:
    """Whether an ``Authorization`` header value carries ``Bearer <token>``; always true without a token.

    Compared in constant time, like the dashboard's admin token (``producer/dashboard/auth.py``).
    """
    if not token:
        return True
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


#: The 401 problem of a /metrics request without the metrics token (producer and worker alike).
UNAUTHORIZED_TITLE = "Missing or wrong metrics token"
UNAUTHORIZED_DETAIL = "send `Authorization: Bearer <PASSBRIDGE_METRICS_TOKEN>` to read /metrics"
UNAUTHORIZED_CHALLENGE = 'Bearer realm="passbridge-metrics"'


@dataclass
class MetricsServer:
    """``GET /metrics`` (and ``/healthz``) for one worker process, on the worker's event loop.

    A deliberately tiny HTTP/1.1 server (one request per connection): Prometheus is its only client.
    """

    redis: Redis
    host: str
    port: int
    #: ``PASSBRIDGE_METRICS_TOKEN``: when set, /metrics answers 401 without ``Authorization: Bearer`` it.
    token: str | None = None
    server: asyncio.Server | None = None
    cache: GaugeCache = field(default_factory=GaugeCache)

    async def start(self) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        self.server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = int(self.server.sockets[0].getsockname()[1])
        log.info("metrics_listening", host=self.host, port=self.port)
        return self.port

    async def stop(self) -> None:
        """Stop listening."""
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, _, rest = request_line.partition(" ")
                path = rest.split(" ", 1)[0].split("?", 1)[0]
                authorization = next(
                    (
                        value.strip()
                        for name, _, value in (line.partition(":") for line in header_lines)
                        if name.strip().lower() == "authorization"
                    ),
                    "",
                )
                extra = ""
                if method not in ("GET", "HEAD"):
                    status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET only\n"
                elif path == "/metrics" and not bearer_ok(authorization, self.token):
                    status, ctype = "401 Unauthorized", "application/problem+json"
                    extra = f"WWW-Authenticate: {UNAUTHORIZED_CHALLENGE}\r\n"
                    body = orjson.dumps(
                        {
                            "type": "https://passbridge.dev/problems/unauthorized",
                            "title": UNAUTHORIZED_TITLE,
                            "status": 401,
                            "detail": UNAUTHORIZED_DETAIL,
                            "instance": path,
                        }
                    )
                elif path == "/metrics":
                    status, ctype, body = "200 OK", metrics.CONTENT_TYPE, await render(self.redis, self.cache)
                elif path == "/healthz":
                    status, ctype, body = "200 OK", "text/plain", b"ok\n"
                else:
                    status, ctype, body = "404 Not Found", "text/plain", b"try /metrics\n"
                writer.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    f"{extra}Connection: close\r\n\r\n".encode()
                )
                if method != "HEAD":
                    writer.write(body)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


@dataclass
class ProcessOps:
    """What a worker process runs for operators besides the engine: the activity flusher and, when asked
    for, the metrics server."""

    redis: Redis
    flusher: asyncio.Task[None]
    server: MetricsServer | None = None

    @classmethod
    async def start(
        cls, redis: Redis, *, metrics_host: str, metrics_port: int | None, metrics_token: str | None = None
    ) -> ProcessOps:
        """Start flushing activity to Redis and, with ``metrics_port`` (0 = any free port), serve /metrics
        (to holders of ``metrics_token`` when given)."""
        ops = cls(redis, metrics.start_flusher(redis))
        if metrics_port is not None:
            ops.server = MetricsServer(redis, metrics_host, metrics_port, metrics_token)
            await ops.server.start()
        return ops

    async def stop(self) -> None:
        """Stop serving and flush the last counts."""
        if self.server is not None:
            await self.server.stop()
        await metrics.stop_flusher(self.flusher, self.redis)
