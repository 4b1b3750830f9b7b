"""Per-event history: what happened to each event, kept per serial for the operator tools' timelines.

Each serial has one Redis list (``AccountKeys.history``) of compact JSON arrays
``[at_ms, kind, event_id]`` or ``[at_ms, kind, event_id, {detail}]``, oldest first:

- ``ingested``  — written by the producer's ``enqueue.lua`` in the same step as the mailbox entry
- ``attempt``   — a failed attempt (detail: status, code, endpoint, worker, next attempt)
- ``throttled`` — a 429 (not an attempt)
- ``written``   — Klaviyo accepted the event (detail: worker, stale flag, notes)
- ``dead``      — moved to the DLQ (detail: reason)
- ``replayed``  — put back from the DLQ
- ``paused``    — the account was paused while the event was at the head (detail: reason)

Cheap by construction: one ``RPUSH`` per entry inside scripts that run anyway, and the list expires
``history_retention_s`` after its newest entry; entries older than the retention are dropped from the
head whenever the engine appends. It is not part of the queue: nothing reads it to make decisions.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson
from redis.asyncio import Redis

from passbridge.keys import account_keys


class HistoryKind(StrEnum):
    """What happened to an event."""

    ingested = "ingested"
    attempt = "attempt"
    throttled = "throttled"
    written = "written"
    dead = "dead"
    replayed = "replayed"
    paused = "paused"


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One step of one event's life."""

    at_ms: int
    kind: str
    event_id: str
    detail: dict[str, Any]

    def to_doc(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"at_ms": self.at_ms, "kind": self.kind, "event_id": self.event_id, **self.detail}


def entry(kind: HistoryKind, event_id: str, at_ms: int, **detail: Any) -> bytes:
    """The stored form of one entry (its timestamp first: scripts read it to drop expired entries)."""
    doc: list[Any] = [int(at_ms), kind.value, event_id]
    clean = {k: v for k, v in detail.items() if v not in (None, "", [], {})}
    if clean:
        doc.append(clean)
    return orjson.dumps(doc)


def parse(raw: bytes) -> HistoryEntry:
    """Inverse of :func:`entry`."""
    doc = orjson.loads(raw)
    return HistoryEntry(int(doc[0]), str(doc[1]), str(doc[2]), dict(doc[3]) if len(doc) > 3 else {})


async def timeline(redis: Redis, account_id: str, serial: str) -> list[HistoryEntry]:
    """Every kept entry of the serial, oldest first."""
    raw = await redis.lrange(account_keys(account_id).history(serial), 0, -1)
    return [parse(r) for r in raw]


async def serial_of(redis: Redis, account_id: str, event_id: str) -> str | None:
    """The serial an event id belongs to, from the producer's dedup index (kept for the dedup window)."""
    keys = account_keys(account_id)
    async for key in redis.scan_iter(match=keys.dedup_prefix + "*", count=100):
        serial = await redis.hget(key, event_id)
        if serial is not None:
            return str(serial.decode())
    return None


async def event_history(
    redis: Redis, account_id: str, event_id: str, serial: str | None = None
) -> list[HistoryEntry]:
    """The entries of one event (its serial looked up in the dedup index unless given)."""
    serial = serial or await serial_of(redis, account_id, event_id)
    if serial is None:
        return []
    return [e for e in await timeline(redis, account_id, serial) if e.event_id == event_id]
