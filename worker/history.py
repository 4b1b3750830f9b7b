"""Per-event history: what happened to each event, kept per serial for the operator tools' timelines.

Each serial has one Redis list (``AccountKeys.history``) of compact JSON arrays
``[at_ms, kind, event_id]`` or ``[at_ms, kind, event_id, {detail}]``, oldest first. The engine's scripts store
them with a 5th element, the account's arrival stamp (``[at_ms, kind, event_id, {detail}, stamp]``): the last
arrival sequence handed out when the entry was written (``worker/lua/lib.lua``):

- ``ingested``  — at the event's ``received_at``, with its arrival sequence as its stamp: derived from its
  mailbox entry while the event is pending (:func:`timeline` reads the mailbox too) and stored by the
  engine's settle step together with the event's ``written`` or ``dead`` entry
  (:meth:`worker.queue.WorkQueue.settle`). The producer writes no history, which keeps two Redis writes per
  event off the ingest path.
- ``attempt``   — a failed attempt (detail: status, code, endpoint, worker, next attempt)
- ``throttled`` — a 429 (not an attempt)
- ``written``   — Klaviyo accepted the event (detail: worker, stale flag, notes)
- ``dead``      — moved to the DLQ (detail: reason)
- ``replayed``  — put back from the DLQ
- ``paused``    — the account was paused while the event was at the head (detail: reason)

Cheap by construction: one ``RPUSH`` per entry inside scripts that run anyway, and the list expires
``history_retention_s`` after its newest entry; entries older than the retention are dropped from the
head whenever the engine appends. It is not part of the queue: nothing reads it to make decisions.

:func:`timeline` shows each event's ``ingested`` step exactly once, exactly where the producer's enqueue fell
among the stored entries: before the first entry whose stamp is at least the event's arrival sequence (so
after every entry written before the event was queued). Stored entries keep their stored order, and an
event's ``ingested`` never comes after its other entries. It makes no difference whether the step came from
the mailbox or the list (a replayed event is settled again, and each settle stores its ``ingested`` entry).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
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
    #: The account's arrival stamp when the entry was stored (for ``ingested``: the event's own arrival
    #: sequence); None for entries stored without one.
    stamp: int | None = None

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
    """Inverse of :func:`entry` (and of the stamped form the scripts store)."""
    doc = orjson.loads(raw)
    return HistoryEntry(
        int(doc[0]),
        str(doc[1]),
        str(doc[2]),
        dict(doc[3]) if len(doc) > 3 else {},
        int(doc[4]) if len(doc) > 4 else None,
    )


def ingested_entry(member: bytes) -> bytes | None:
    """The stored ``ingested`` entry of a mailbox member (arrival sequence + wire JSON): at its
    ``received_at``, stamped with its arrival sequence. None when the member cannot be read (the event is then
    shown without that step)."""
    try:
        start = member.index(b"{")
        seq = int(member[:start], 16)
        doc = orjson.loads(member[start:])
        at = datetime.fromisoformat(doc["r"])
        return orjson.dumps([int(at.timestamp() * 1000), HistoryKind.ingested.value, str(doc["id"]), {}, seq])
    except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
        return None


def _before(ingested: HistoryEntry, other: HistoryEntry) -> bool:
    """Whether an ``ingested`` step belongs before a stored entry: the event was queued before the entry was
    written (by the stamps; by the clocks for entries stored without one)."""
    if ingested.stamp is not None and other.stamp is not None:
        return ingested.stamp <= other.stamp
    return ingested.at_ms <= other.at_ms


def merge(stored: Sequence[HistoryEntry], pending: Sequence[HistoryEntry]) -> list[HistoryEntry]:
    """One timeline from the stored list and the ``ingested`` entries of pending events (pure).

    Entries other than ``ingested`` keep their stored order. Each event's first ``ingested`` entry (stored or
    pending; repeats dropped) goes in before the first entry written after the event was queued (see
    :func:`_before`), and never after another entry of the same event.
    """
    ingested: dict[str, HistoryEntry] = {}
    others: list[HistoryEntry] = []
    for e in (*stored, *pending):
        if e.kind != HistoryKind.ingested:
            others.append(e)
        elif e.event_id not in ingested:
            ingested[e.event_id] = e
    # Arrival order (stamps are the arrival sequence; entries without one by time), stable on ties.
    waiting = sorted(ingested.values(), key=lambda e: (e.stamp is None, e.stamp or 0, e.at_ms))
    out: list[HistoryEntry] = []
    placed: set[str] = set()
    i = 0
    for e in others:
        due = e.event_id in ingested and e.event_id not in placed
        while i < len(waiting) and (due or _before(waiting[i], e)):
            placed.add(waiting[i].event_id)
            out.append(waiting[i])
            if waiting[i].event_id == e.event_id:
                due = False
            i += 1
        out.append(e)
    out += waiting[i:]
    return out


@dataclass(frozen=True, slots=True)
class Timeline:
    """A serial's timeline as read (:func:`read`), and what was left unread."""

    entries: list[HistoryEntry]
    #: The mailbox members read: the first ones in send order (their ``ingested`` steps are in ``entries``).
    members: list[bytes]
    #: Entries in the serial's history list and events in its mailbox, read or not.
    stored_total: int
    pending_total: int
    #: Stored entries not read: the oldest ones.
    stored_omitted: int

    @property
    def pending_omitted(self) -> int:
        """Pending events whose ``ingested`` step was not read (those queued behind the ones read)."""
        return self.pending_total - len(self.members)


async def read(
    redis: Redis,
    account_id: str,
    serial: str,
    *,
    stored_limit: int | None = None,
    pending_limit: int | None = None,
) -> Timeline:
    """The serial's timeline from its newest ``stored_limit`` history entries and the ``ingested`` steps of the
    first ``pending_limit`` events of its mailbox in send order (None or 0: all of them).

    A page that refreshes every few seconds reads a bounded part of a hot serial, not all of it. What is shown
    is in the right order among itself (:func:`merge`): an ``ingested`` step that belongs before the oldest entry
    read comes first. The steps of the events queued behind the ones read are left out, not guessed
    (:attr:`Timeline.pending_omitted` says how many).
    """
    keys = account_keys(account_id)
    history_key, mailbox = keys.history(serial), keys.mailbox(serial)
    async with redis.pipeline(transaction=True) as pipe:  # one snapshot: an event settles in neither or both
        pipe.llen(history_key)
        pipe.lrange(history_key, -stored_limit if stored_limit else 0, -1)
        pipe.zcard(mailbox)
        pipe.zrange(mailbox, 0, pending_limit - 1 if pending_limit else -1)
        stored_total, raw, pending_total, members = await pipe.execute()
    pending = [parse(r) for r in (ingested_entry(m) for m in members) if r is not None]
    return Timeline(
        entries=merge([parse(r) for r in raw], pending),
        members=members,
        stored_total=int(stored_total),
        pending_total=int(pending_total),
        stored_omitted=int(stored_total) - len(raw),
    )


async def timeline(redis: Redis, account_id: str, serial: str) -> list[HistoryEntry]:
    """Every kept entry of the serial, oldest first, with the ``ingested`` step of its pending events (a
    whole read, for one-off commands: the dashboard's pages use :func:`read` with limits)."""
    return (await read(redis, account_id, serial)).entries


async def event_history(redis: Redis, account_id: str, event_id: str, serial: str) -> list[HistoryEntry]:
    """The entries of one event of ``serial`` (an event id's serial: :func:`worker.inspect.serial_of`)."""
    return [e for e in await timeline(redis, account_id, serial) if e.event_id == event_id]
