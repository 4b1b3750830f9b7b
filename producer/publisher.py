"""Amortized enqueueing: concurrent requests share Redis round trips.

A webhook request costs a few tens of microseconds of Python; one Redis round trip costs more than that.
So instead of one ``EVALSHA`` per request, requests hand their events to :class:`Publisher`, whose single
flusher sends everything that arrived while the previous call was in flight as one atomic Lua call per
account. Under no load a request waits for exactly one round trip, as before; under load the round trips
are shared. Every request still hears back only after its events are in Redis.

A request may also hand over how to build its events (:meth:`Publisher.publish_prepared`): the flusher then
runs the builds of all the requests that arrived meanwhile back to back, right before their shared call. Run
so, a webhook's verification and normalization stay in the CPU's caches instead of being evicted by the
server's other work between two requests: a webhook costs about 12 % less producer CPU (BENCHMARKS.md,
"Ingest → Session 15").
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Sequence

import structlog
from redis.asyncio import Redis

from passbridge import metrics
from passbridge.event import PassEvent
from passbridge.queue import BacklogFull, enqueue
from passbridge.redis_lean import LeanScripts
from passbridge.tasks import cancel_until_done

log = structlog.get_logger(__name__)


Prepare = Callable[[], Sequence[PassEvent]]


class _Pending:
    """One request's events (or how to build them) and the future its handler awaits (a plain slotted class:
    one per request)."""

    __slots__ = ("account_id", "events", "future", "prepare")

    def __init__(
        self,
        account_id: str,
        events: Sequence[PassEvent],
        prepare: Prepare | None,
        future: asyncio.Future[list[bool]],
    ) -> None:
        self.account_id = account_id
        self.events = events
        self.prepare = prepare
        self.future = future


class Publisher:
    """Coalesces concurrent enqueue requests into shared Lua calls (see module docstring)."""

    def __init__(
        self,
        redis: Redis,
        *,
        high_water: int,
        dedup_window_s: int,
        max_batch: int = 2000,
    ) -> None:
        self.redis = redis
        # The enqueue script's own lean connection when the URL allows it (see passbridge.redis_lean).
        self.lean = LeanScripts.for_client(redis)
        self.high_water = high_water
        self.dedup_window_s = dedup_window_s
        self.max_batch = max_batch
        self._queue: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="publisher")

    async def close(self) -> None:
        if self._task:
            await cancel_until_done(self._task)  # not a bare cancel and await: see cancel_until_done
        if self.lean is not None:
            await self.lean.close()

    async def publish(self, account_id: str, events: Sequence[PassEvent]) -> list[bool]:
        """Enqueue ``events`` (one account) and return per event whether it was new (``False`` = duplicate).

        Raises what :func:`passbridge.queue.enqueue` raises (``BacklogFull``, Redis errors); nothing of the
        request is written then.
        """
        if not events:
            return []
        return await self._submit(account_id, events, None)

    async def publish_prepared(self, account_id: str, prepare: Prepare) -> list[bool]:
        """:meth:`publish` for the events ``prepare()`` returns, called in the flusher (see module docstring).

        ``prepare`` must not block (no I/O). What it raises is raised here, and nothing of this request is
        written; when it returns no events, the answer is ``[]`` and Redis is not called for this request.
        """
        return await self._submit(account_id, (), prepare)

    async def _submit(
        self, account_id: str, events: Sequence[PassEvent], prepare: Prepare | None
    ) -> list[bool]:
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[list[bool]] = loop.create_future()
        self._queue.append(_Pending(account_id, events, prepare, future))
        if not self._wakeup.is_set():
            self._wakeup.set()
        return await future

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch, self._queue = self._queue, []
                batch = _prepared(batch)
                if batch:
                    await self._flush(batch)

    async def _flush(self, batch: list[_Pending]) -> None:
        by_account: dict[str, list[_Pending]] = defaultdict(list)
        for p in batch:
            by_account[p.account_id].append(p)
        if len(by_account) == 1:  # the common case needs no task per account
            [(account_id, pendings)] = by_account.items()
            await self._flush_account(account_id, pendings)
            return
        await asyncio.gather(*(self._flush_account(a, ps) for a, ps in by_account.items()))

    async def _flush_account(self, account_id: str, pendings: list[_Pending]) -> None:
        # Chunk so one Lua call never holds Redis for long; a request is never split across chunks,
        # which keeps each request all-or-nothing.
        chunk: list[_Pending] = []
        size = 0
        for p in pendings:
            if chunk and size + len(p.events) > self.max_batch:
                await self._send(account_id, chunk)
                chunk, size = [], 0
            chunk.append(p)
            size += len(p.events)
        if chunk:
            await self._send(account_id, chunk)

    async def _send(self, account_id: str, chunk: list[_Pending]) -> None:
        events = [e for p in chunk for e in p.events]
        try:
            result = await enqueue(
                self.redis,
                account_id,
                events,
                high_water=self.high_water,
                dedup_window_s=self.dedup_window_s,
                lean=self.lean,
            )
        except BacklogFull as exc:
            if len(chunk) > 1:
                # Refused as a whole, for the new events of all the requests that shared the call. Each is
                # asked again on its own, in order, so a request whose events are all duplicates (they need no
                # room) or that fits alone is not refused for the others' sake. Only a full backlog pays this.
                for p in chunk:
                    await self._send(account_id, [p])
                return
            _fail(chunk, exc)
            return
        except Exception as exc:
            _fail(chunk, exc)
            return
        metrics.events_ingested(account_id, events, result.accepted)
        offset = 0
        for p in chunk:
            n = len(p.events)
            if not p.future.done():
                p.future.set_result(result.accepted[offset : offset + n])
            offset += n


def _fail(chunk: list[_Pending], exc: Exception) -> None:
    """Hand ``exc`` to every request still waiting in ``chunk``; each answers for itself (a 503, say)."""
    for p in chunk:
        if not p.future.done():
            p.future.set_exception(exc)


def _prepared(batch: list[_Pending]) -> list[_Pending]:
    """Build the events of the requests that handed over a ``prepare``, back to back; the requests to send.

    A request whose ``prepare`` raised hears the exception, and one with no events hears ``[]``: neither goes
    to Redis.
    """
    ready = []
    for p in batch:
        if p.prepare is not None:
            try:
                p.events = p.prepare()
            except Exception as exc:  # the request's own answer (a 401 or 422 problem, say)
                if not p.future.done():
                    p.future.set_exception(exc)
                continue
            if not p.events:
                if not p.future.done():
                    p.future.set_result([])
                continue
        ready.append(p)
    return ready
