"""The read API over the queue's Redis layout: everything the operator tools show, in one place.

``passbridge status|serial|event|report``, the dashboard and the Prometheus gauges computed at scrape time all
read through this module, so they agree. It only reads (replay and purge are :mod:`worker.dlq`'s) and it never
touches an account's secrets: account details come from the registry hash's ``config`` field alone, never its
``secrets`` field.

What it reads (``docs/architecture.md``): ``depth``, ``ready`` (score = not-before: due when ≤ now, else parked
until then), ``leased`` (score = lease expiry) and ``tok`` (lease tokens ``<worker id>.<n>``), mailboxes
(``mb:<serial>``), applied states, retry records, the DLQ, per-serial history, pauses, the dedup index
(``dd:<bucket>``, event id → serial), the workers' heartbeats and the activity series and report counters the
processes' recorders write (:mod:`passbridge.metrics`).
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from redis.asyncio import Redis

from passbridge.keys import (
    ACCOUNTS_INDEX,
    ACTIVE_ACCOUNTS,
    REMOVED_ACCOUNTS,
    WORKERS,
    WORKERS_INFO,
    account_keys,
)
from passbridge.metrics import BUCKET_S, BUCKETS_PER_HOUR, REPORT_TTL_S, SAMPLED, SERIES, bucket_of
from passbridge.queue import dedup_bucket_width
from worker import dlq, history, pause
from worker.dlq import DLQEntry
from worker.pause import Pause
from worker.queue import split_member
from worker.report import ReportRow

#: A worker whose last heartbeat is older than this is shown as not alive (it beats every 2 s).
WORKER_ALIVE_MS = 10_000
#: Serials whose mailbox heads are read to estimate an account's oldest pending event (see ``queue_figures``).
OLDEST_SAMPLE = 100
#: Accounts :func:`overview` reads concurrently.
OVERVIEW_CONCURRENCY = 8
#: Most pending events :func:`serial_detail` lists (and whose ``ingested`` steps its timeline shows).
PENDING_LIMIT = 200
#: Most history entries :func:`serial_detail` reads, the newest (the dashboard re-reads them every few seconds;
#: ``passbridge engine history`` reads them all).
TIMELINE_LIMIT = 500
#: Most mailbox entries :func:`find_event` reads looking for an event (a serial rarely queues more).
MAILBOX_SCAN_LIMIT = 10_000


def iso(ms: int | None) -> str | None:
    """Epoch ms as ISO 8601 UTC (``Z``), or None."""
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _ms(text: Any) -> int | None:
    try:
        return int(datetime.fromisoformat(str(text)).timestamp() * 1000)
    except ValueError:
        return None


# --- accounts and queues ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccountInfo:
    """An account's registry entry as operators see it (no secrets are ever read)."""

    account_id: str
    name: str = ""
    #: ``connected``/``paused``/``disconnected``; None when the account is not in the registry.
    registry_state: str | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class QueueFigures:
    """An account's queue at one instant."""

    pending_events: int
    ready_serials: int
    parked_serials: int
    leased_serials: int
    #: The earliest time a parked serial may be tried again.
    next_attempt_ms: int | None
    #: When the longest-waiting pending event was received (estimated over :data:`OLDEST_SAMPLE` serials).
    oldest_received_ms: int | None
    dlq: int

    def oldest_age_s(self, now_ms: int) -> float:
        """Age of the oldest pending event in seconds (0 when nothing is pending)."""
        if self.oldest_received_ms is None or not self.pending_events:
            return 0.0
        return max(0.0, (now_ms - self.oldest_received_ms) / 1000)


@dataclass(frozen=True, slots=True)
class Activity:
    """Counts of each :data:`passbridge.metrics.SERIES` over the last minute and the last five minutes."""

    last_1m: dict[str, int]
    last_5m: dict[str, int]
    #: Seconds the windows actually cover (the current bucket is partial).
    span_1m_s: float
    span_5m_s: float

    def per_s(self, name: str, window: str = "1m") -> float:
        """Rate of ``name`` per second over ``window`` (``1m`` or ``5m``)."""
        counts, span = (self.last_1m, self.span_1m_s) if window == "1m" else (self.last_5m, self.span_5m_s)
        return counts.get(name, 0) / span if span > 0 else 0.0


@dataclass(frozen=True, slots=True)
class AccountOverview:
    """One row of ``passbridge status`` and of the dashboard."""

    info: AccountInfo
    #: ``connected``, ``paused``, ``disconnected`` or ``unknown`` (events queued for an unregistered id).
    state: str
    pause: Pause | None
    queue: QueueFigures
    activity: Activity
    #: Until when (Redis ms) the engine claims nothing of the account: Klaviyo throttled it (429).
    throttled_until_ms: int | None = None

    def to_doc(self, now_ms: int) -> dict[str, Any]:
        """JSON form (``passbridge status --json``)."""
        q, a = self.queue, self.activity
        return {
            "account": self.info.account_id,
            "name": self.info.name,
            "state": self.state,
            "state_reason": (self.pause.reason if self.pause else "") or self.info.reason,
            "paused": None
            if self.pause is None
            else {"since": iso(self.pause.since_ms), "kind": self.pause.kind, "reason": self.pause.reason},
            "throttled_until": iso(self.throttled_until_ms),
            "pending_events": q.pending_events,
            "ready_serials": q.ready_serials,
            "parked_serials": q.parked_serials,
            "leased_serials": q.leased_serials,
            "next_attempt": iso(q.next_attempt_ms),
            "oldest_event_age_s": round(q.oldest_age_s(now_ms), 1),
            "dlq": q.dlq,
            "ingested_per_s": {"1m": round(a.per_s("in", "1m"), 2), "5m": round(a.per_s("in", "5m"), 2)},
            "delivered_per_s": {"1m": round(a.per_s("out", "1m"), 2), "5m": round(a.per_s("out", "5m"), 2)},
            "last_5m": a.last_5m,
            "klaviyo_requests_5m": a.last_5m.get("req", 0),
            "klaviyo_429s_5m": a.last_5m.get("429", 0),
        }


async def now_ms(redis: Redis) -> int:
    """Redis's clock (the engine's scripts score leases and not-before times with it)."""
    return await pause.redis_now_ms(redis)


async def account_ids(redis: Redis) -> list[str]:
    """Registered accounts, any account with queued work, and removed accounts that still have pending events
    or dead letters (``pb:active`` forgets an account once nothing is pending, its DLQ may remain), sorted."""
    ids = {m.decode() for m in await redis.smembers(ACCOUNTS_INDEX)}
    ids |= {m.decode() for m in await redis.zrange(ACTIVE_ACCOUNTS, 0, -1)}
    removed = sorted({m.decode() for m in await redis.smembers(REMOVED_ACCOUNTS)} - ids)
    if removed:
        async with redis.pipeline(transaction=False) as pipe:
            for account_id in removed:
                pipe.zcard(account_keys(account_id).dlq)
                pipe.get(account_keys(account_id).depth)
            answers = await pipe.execute()
        for i, account_id in enumerate(removed):
            if answers[2 * i] or int(answers[2 * i + 1] or 0):
                ids.add(account_id)
    return sorted(ids)


async def account_info(redis: Redis, account_id: str) -> AccountInfo:
    """The account's public registry fields (reads the ``config`` field only, never ``secrets``)."""
    raw = await redis.hget(account_keys(account_id).config, "config")
    if raw is None:
        return AccountInfo(account_id)
    doc = orjson.loads(raw)
    return AccountInfo(
        account_id,
        str(doc.get("name") or ""),
        str(doc.get("state") or "connected"),
        str(doc.get("state_reason") or ""),
    )


def effective_state(info: AccountInfo, paused: Pause | None) -> str:
    """What the account is doing: the registry's state, ``paused`` while the engine holds it paused."""
    if info.registry_state is None:
        return "paused" if paused is not None else "unknown"
    if paused is not None and info.registry_state == "connected":
        return "paused"
    return info.registry_state


async def queue_figures(redis: Redis, account_id: str, now: int) -> QueueFigures:
    """Depth, ready/parked/leased serials, next attempt, oldest pending event and DLQ size of one account.

    The oldest pending event is estimated from the mailbox heads of the :data:`OLDEST_SAMPLE` serials that
    have waited longest in ``ready``, the longest-parked ones and the leased ones: exact while fewer serials
    are queued, a lower bound beyond (cost stays constant however large the backlog).
    """
    keys = account_keys(account_id)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.get(keys.depth)
        pipe.zcount(keys.ready, "-inf", now)
        pipe.zcount(keys.ready, f"({now}", "+inf")
        pipe.zcard(keys.leased)
        pipe.zrangebyscore(keys.ready, f"({now}", "+inf", start=0, num=1, withscores=True)
        pipe.zcard(keys.dlq)
        pipe.zrange(keys.ready, 0, OLDEST_SAMPLE - 1)
        pipe.zrange(keys.ready, -(OLDEST_SAMPLE // 2), -1)
        pipe.zrange(keys.leased, 0, OLDEST_SAMPLE - 1)
        depth, due, parked, leased, nxt, dlq_size, first, last, held = await pipe.execute()
    serials = list(dict.fromkeys([*first, *last, *held]))
    oldest: int | None = None
    if serials:
        async with redis.pipeline(transaction=False) as pipe:
            for s in serials:
                pipe.zrange(keys.mailbox(s.decode()), 0, 0)
            heads = await pipe.execute()
        for head in heads:
            if head:
                received = _ms(_wire(head[0]).get("r"))
                if received is not None and (oldest is None or received < oldest):
                    oldest = received
    return QueueFigures(
        pending_events=int(depth or 0),
        ready_serials=int(due),
        parked_serials=int(parked),
        leased_serials=int(leased),
        next_attempt_ms=int(nxt[0][1]) if nxt else None,
        oldest_received_ms=oldest,
        dlq=int(dlq_size),
    )


def _series_fields(buckets: range, names: tuple[str, ...]) -> dict[int, list[str]]:
    """hour → the ``"<bucket>:<name>"`` fields of ``buckets`` in that hour."""
    out: dict[int, list[str]] = {}
    for b in buckets:
        out.setdefault(b // BUCKETS_PER_HOUR, []).extend(f"{b}:{n}" for n in names)
    return out


async def _read_series(
    redis: Redis, account_id: str, buckets: range, names: tuple[str, ...]
) -> dict[str, list[int | None]]:
    keys = account_keys(account_id)
    wanted = _series_fields(buckets, names)
    async with redis.pipeline(transaction=False) as pipe:
        for hour, fields in wanted.items():
            pipe.hmget(keys.series(hour), fields)
        answers = await pipe.execute()
    values: dict[str, int] = {}
    for fields, got in zip(wanted.values(), answers, strict=True):
        for f, v in zip(fields, got, strict=True):
            if v is not None:
                values[f] = int(v)
    return {n: [values.get(f"{b}:{n}") for b in buckets] for n in names}


async def activity(redis: Redis, account_id: str, now_s: float) -> Activity:
    """Counts over the last 1 and 5 minutes from the activity series (current, partial bucket included)."""
    current = bucket_of(now_s)
    per_minute = 60 // BUCKET_S
    buckets = range(current - 5 * per_minute + 1, current + 1)
    series = await _read_series(redis, account_id, buckets, SERIES)
    partial = now_s - current * BUCKET_S

    def total(n: int) -> dict[str, int]:
        return {name: sum(v or 0 for v in values[-n:]) for name, values in series.items()}

    return Activity(
        last_1m=total(per_minute),
        last_5m=total(5 * per_minute),
        span_1m_s=(per_minute - 1) * BUCKET_S + partial,
        span_5m_s=(5 * per_minute - 1) * BUCKET_S + partial,
    )


@dataclass(frozen=True, slots=True)
class Series:
    """An account's activity over time, one value per 10-second bucket, oldest first (for the charts)."""

    start_s: int
    step_s: int
    #: Counted series (0 when nothing happened) and sampled ones (None where no sample was taken).
    values: dict[str, list[int | None]]


async def activity_series(redis: Redis, account_id: str, now_s: float, minutes: int = 30) -> Series:
    """The last ``minutes`` of every series and sample of the account."""
    current = bucket_of(now_s)
    buckets = range(current - minutes * 60 // BUCKET_S + 1, current + 1)
    values = await _read_series(redis, account_id, buckets, SERIES + SAMPLED)
    for name in SERIES:
        values[name] = [v or 0 for v in values[name]]
    return Series(buckets.start * BUCKET_S, BUCKET_S, values)


async def throttled_until(redis: Redis, account_id: str, now: int) -> int | None:
    """Until when the engine defers the account after Klaviyo's 429s (``claim.lua`` skips it meanwhile)."""
    left = int(await redis.pttl(account_keys(account_id).deferred))
    return now + left if left > 0 else None


async def account_overview(redis: Redis, account_id: str, now: int) -> AccountOverview:
    """Everything ``passbridge status`` shows for one account."""
    info = await account_info(redis, account_id)
    paused = await pause.get_pause(redis, account_id)
    return AccountOverview(
        info=info,
        state=effective_state(info, paused),
        pause=paused,
        queue=await queue_figures(redis, account_id, now),
        activity=await activity(redis, account_id, now / 1000),
        throttled_until_ms=await throttled_until(redis, account_id, now),
    )


async def overview(redis: Redis, accounts: list[str] | None = None) -> tuple[int, list[AccountOverview]]:
    """Redis's time and the overview of every account (or of ``accounts``)."""
    now = await now_ms(redis)
    ids = accounts if accounts is not None else await account_ids(redis)
    # A few accounts at a time: the round trips overlap without opening a connection per account.
    gate = asyncio.Semaphore(OVERVIEW_CONCURRENCY)

    async def one(account_id: str) -> AccountOverview:
        async with gate:
            return await account_overview(redis, account_id, now)

    return now, list(await asyncio.gather(*(one(a) for a in ids)))


# --- workers ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A worker process from its heartbeat (``pb:workers`` and ``pb:workers:info``)."""

    worker_id: str
    beat_ms: int
    info: dict[str, Any]

    def alive(self, now: int) -> bool:
        """Whether its last heartbeat is recent (:data:`WORKER_ALIVE_MS`)."""
        return now - self.beat_ms < WORKER_ALIVE_MS

    def to_doc(self, now: int) -> dict[str, Any]:
        """JSON form."""
        i = self.info
        return {
            "worker": self.worker_id,
            "host": i.get("host"),
            "pid": i.get("pid"),
            #: ``main`` (a ``passbridge worker``) or ``express`` (its express-lane child: small accounts only).
            "lane": i.get("lane", "main"),
            "alive": self.alive(now),
            "last_heartbeat": iso(self.beat_ms),
            "heartbeat_age_s": round((now - self.beat_ms) / 1000, 1),
            "started": iso(i.get("started_ms")),
            "held_serials": i.get("held", 0),
            "max_serials": i.get("max_serials"),
            "stopping": bool(i.get("stopping", False)),
            "written": i.get("written", 0),
            "retried": i.get("retried", 0),
            "dead_lettered": i.get("dead_lettered", 0),
            "taken_over": i.get("taken_over", 0),
        }


async def workers(redis: Redis) -> list[WorkerInfo]:
    """Every worker that has beaten in the last minute (the sweep prunes older ones), newest beat first."""
    beats = await redis.zrange(WORKERS, 0, -1, withscores=True)
    if not beats:
        return []
    infos = await redis.hmget(WORKERS_INFO, [w for w, _ in beats])
    out = [
        WorkerInfo(w.decode(), int(score), orjson.loads(raw) if raw else {})
        for (w, score), raw in zip(beats, infos, strict=True)
    ]
    return sorted(out, key=lambda w: -w.beat_ms)


# --- serials and events ----------------------------------------------------------------------------------


def _wire(member: bytes) -> dict[str, Any]:
    try:
        doc = orjson.loads(split_member(member)[1])
    except (orjson.JSONDecodeError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """A queued event of a serial, from its mailbox entry."""

    seq: int
    event_id: str
    kind: str
    occurred_at: str
    received_at: str
    source: str
    #: The event's wire fields (``PassEvent.to_wire``): contact details and custom properties, no secrets.
    wire: dict[str, Any]

    @classmethod
    def from_member(cls, member: bytes) -> PendingEvent:
        """Parse a mailbox member (arrival sequence + wire JSON)."""
        seq = split_member(member)[0]
        doc = _wire(member)
        return cls(
            seq,
            str(doc.get("id", "")),
            str(doc.get("k", "")),
            str(doc.get("o", "")),
            str(doc.get("r", "")),
            str(doc.get("src", "")),
            doc,
        )

    def to_doc(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "seq": self.seq,
            "event_id": self.event_id,
            "kind": self.kind,
            "occurred_at": self.occurred_at,
            "received_at": self.received_at,
            "source": self.source,
        }


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """Who holds a serial and until when (unless renewed)."""

    worker_id: str
    expires_ms: int


@dataclass(slots=True)
class SerialDetail:
    """One pass serial: its queue, applied state, lease, retries, dead letters and timeline."""

    account_id: str
    serial: str
    pending_total: int
    pending: list[PendingEvent]
    applied: dict[str, Any] | None
    lease: LeaseInfo | None
    #: The serial's not-before time in ``ready`` (None when it is not there).
    ready_at_ms: int | None
    #: Retry records of pending events: event id → record (attempts, throttles, errors).
    retries: dict[str, dict[str, Any]]
    dead: list[DLQEntry]
    #: The newest :data:`TIMELINE_LIMIT` history entries, with the ``ingested`` steps of the listed events.
    timeline: list[history.HistoryEntry]
    now_ms: int = 0
    #: Kept history entries older than those read (not in ``timeline``), and all the serial keeps.
    timeline_omitted: int = 0
    history_total: int = 0
    #: The account's registry entry and engine pause, and its Klaviyo deferral: why a due serial may wait.
    account: AccountInfo | None = None
    pause: Pause | None = None
    throttled_until_ms: int | None = None

    @property
    def waiting(self) -> str:
        """Why the serial's pending events wait, for people."""
        return _serial_sentence(self)

    @property
    def status(self) -> str:
        """``leased`` (a worker holds it), ``parked`` (waiting for a retry), ``ready`` (due), ``idle``."""
        if self.lease is not None:
            return "leased"
        if self.ready_at_ms is not None:
            return "parked" if self.ready_at_ms > self.now_ms else "ready"
        return "idle"

    def to_doc(self) -> dict[str, Any]:
        """JSON form (``passbridge serial --json``)."""
        return {
            "account": self.account_id,
            "serial": self.serial,
            "status": self.status,
            "waiting": self.waiting if self.pending_total else None,
            "next_attempt": iso(self.ready_at_ms) if self.status == "parked" else None,
            "lease": None
            if self.lease is None
            else {"worker": self.lease.worker_id, "expires": iso(self.lease.expires_ms)},
            "pending_total": self.pending_total,
            "pending": [
                {**p.to_doc(), "attempts": self.retries.get(p.event_id, {}).get("attempts", 0)}
                for p in self.pending
            ],
            "applied_state": self.applied,
            "retries": self.retries,
            "dead_lettered": [e.dlq_id for e in self.dead],
            "timeline": [h.to_doc() for h in self.timeline],
            "timeline_omitted": self.timeline_omitted,
        }


async def serial_detail(redis: Redis, account_id: str, serial: str) -> SerialDetail:
    """Everything known about ``serial`` of ``account_id`` (empty parts when it is unknown).

    Bounded however hot the serial is: the first :data:`PENDING_LIMIT` pending events and the newest
    :data:`TIMELINE_LIMIT` history entries are read (the dashboard re-reads them every few seconds).
    """
    keys = account_keys(account_id)
    now = await now_ms(redis)
    read = await history.read(
        redis, account_id, serial, stored_limit=TIMELINE_LIMIT, pending_limit=PENDING_LIMIT
    )
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hget(keys.state, serial)
        pipe.hget(keys.lease_tokens, serial)
        pipe.zscore(keys.leased, serial)
        pipe.zscore(keys.ready, serial)
        state, token, expiry, ready_at = await pipe.execute()
    pending = [PendingEvent.from_member(m) for m in read.members]
    retries: dict[str, dict[str, Any]] = {}
    if pending:
        raw = await redis.hmget(keys.retries, [p.event_id for p in pending])
        retries = {p.event_id: orjson.loads(r) for p, r in zip(pending, raw, strict=True) if r is not None}
    timeline = read.entries
    dead_ids = list(dict.fromkeys(h.event_id for h in timeline if h.kind == "dead"))
    # Every entry of those ids: one sent again after the dedup window may be in the DLQ twice.
    dead = [e for e in await dlq.entries_of(redis, account_id, dead_ids) if e.serial == serial]
    lease = None
    if token is not None:
        lease = LeaseInfo(token.decode().rsplit(".", 1)[0], int(expiry) if expiry is not None else 0)
    account_pause = await pause.get_pause(redis, account_id)
    return SerialDetail(
        account_id=account_id,
        serial=serial,
        pending_total=read.pending_total,
        pending=pending,
        applied=orjson.loads(state) if state is not None else None,
        lease=lease,
        ready_at_ms=int(ready_at) if ready_at is not None else None,
        retries=retries,
        dead=dead,
        timeline=timeline,
        now_ms=now,
        timeline_omitted=read.stored_omitted,
        history_total=read.stored_total,
        account=await account_info(redis, account_id),
        pause=account_pause,
        throttled_until_ms=await throttled_until(redis, account_id, now),
    )


async def serial_of(redis: Redis, account_id: str, event_id: str, dedup_window_s: int) -> str | None:
    """The serial of an event id from the producer's dedup index (event id → serial, kept for the window).

    Reads exactly the buckets covering ``dedup_window_s`` (``PASSBRIDGE_DEDUP_TTL_S``, the producer's setting):
    a handful of ``HGET``s, never a keyspace scan, however large Redis is.
    """
    keys = account_keys(account_id)
    width = dedup_bucket_width(dedup_window_s)
    current = int(await now_ms(redis) / 1000) // width
    buckets = range(current, current - math.ceil(dedup_window_s / width) - 1, -1)
    async with redis.pipeline(transaction=False) as pipe:
        for b in buckets:
            pipe.hget(f"{keys.dedup_prefix}{b}", event_id)
        found = [s for s in await pipe.execute() if s is not None]
    return str(found[0].decode()) if found else None


@dataclass(slots=True)
class EventDetail:
    """Where one event is now, and what happened to it."""

    account_id: str
    event_id: str
    serial: str | None
    #: ``pending`` (in its serial's mailbox), ``dead_lettered``, ``delivered`` or ``unknown``.
    where: str
    #: A sentence for people: "3rd of 5 queued; serial parked until ...", "in the DLQ: ...".
    detail: str
    position: int | None = None
    event: dict[str, Any] | None = None
    retry: dict[str, Any] | None = None
    #: Its newest DLQ entry; ``dead_letters``: all of them, oldest first (an event id sent again after the
    #: dedup window may have several).
    dlq: DLQEntry | None = None
    dead_letters: list[DLQEntry] = field(default_factory=list)
    history: list[history.HistoryEntry] = field(default_factory=list)
    serial_status: str | None = None
    #: Older history entries of its serial that were not read (:data:`TIMELINE_LIMIT`) when its history may be
    #: missing steps among them (it does not start with its ``ingested`` step); else 0.
    history_omitted: int = 0

    def to_doc(self) -> dict[str, Any]:
        """JSON form (``passbridge event --json``)."""
        dlq_doc = None
        if self.dlq is not None:
            dlq_doc = self.dlq.to_doc()
            dlq_doc.pop("member")
        return {
            "account": self.account_id,
            "event_id": self.event_id,
            "serial": self.serial,
            "where": self.where,
            "detail": self.detail,
            "position": self.position,
            "serial_status": self.serial_status,
            "event": self.event,
            "retry": self.retry,
            "dlq": dlq_doc,
            "dlq_entries": [{"dlq_id": e.dlq_id, "dead_at": iso(e.dead_at_ms)} for e in self.dead_letters],
            "history": [h.to_doc() for h in self.history],
            "history_omitted": self.history_omitted,
        }


async def find_event(
    redis: Redis, account_id: str, event_id: str, dedup_window_s: int, *, serial: str | None = None
) -> EventDetail:
    """Locate ``event_id``: in the DLQ, queued in its serial's mailbox, delivered, or unknown.

    Its serial comes from the DLQ entry or the dedup index, which forgets an event after the dedup window
    although it may still be queued (a paused account's events wait as long as the pause lasts): ``serial``,
    when the caller knows it, is searched then (its mailbox up to :data:`MAILBOX_SCAN_LIMIT` entries).
    """
    keys = account_keys(account_id)
    dead_letters = await dlq.entries_of(redis, account_id, [event_id])
    dead = max(dead_letters, key=lambda e: e.dead_at_ms) if dead_letters else None
    given = serial
    serial = dead.serial if dead is not None else await serial_of(redis, account_id, event_id, dedup_window_s)
    serial = serial or given
    if serial is None:
        return EventDetail(
            account_id,
            event_id,
            None,
            "unknown",
            "no such event id in the dedup window (an older event is found with its serial)",
        )
    detail = await serial_detail(redis, account_id, serial)
    hist = [h for h in detail.timeline if h.event_id == event_id]
    out = EventDetail(
        account_id,
        event_id,
        serial,
        "unknown",
        "",
        history=hist,
        serial_status=detail.status,
        history_omitted=_omitted(hist, detail.timeline_omitted),
    )
    if dead is not None:
        last = dead.errors[-1] if dead.errors else {}
        out.where, out.dlq, out.event = "dead_lettered", dead, dead.event
        out.dead_letters = dead_letters
        out.detail = f"in the DLQ since {iso(dead.dead_at_ms)}: {dead.reason}"
        if last.get("endpoint"):
            out.detail += f" ({last['endpoint']})"
        if len(dead_letters) > 1:
            out.detail += f"; {len(dead_letters)} DLQ entries have this event id: " + ", ".join(
                f"{e.dlq_id} (dead at {iso(e.dead_at_ms)})" for e in dead_letters
            )
        return out
    for i, p in enumerate(detail.pending):
        if p.event_id == event_id:
            out.where, out.position, out.event = "pending", i + 1, p.wire
            out.retry = detail.retries.get(event_id)
            out.detail = f"queued, {i + 1} of {detail.pending_total} in its serial; " + detail.waiting
            return out
    if detail.pending_total > len(detail.pending):
        # Beyond the first PENDING_LIMIT entries: look the member up in the rest, bounded.
        members = await redis.zrange(keys.mailbox(serial), PENDING_LIMIT, MAILBOX_SCAN_LIMIT - 1)
        for i, m in enumerate(members):
            p = PendingEvent.from_member(m)
            if p.event_id == event_id:
                out.where, out.position, out.event = "pending", PENDING_LIMIT + i + 1, p.wire
                # The timeline read only the listed events' mailbox entries: add this one's own step.
                if (raw := history.ingested_entry(m)) is not None:
                    out.history = history.merge(hist, [history.parse(raw)])
                    out.history_omitted = _omitted(out.history, detail.timeline_omitted)
                out.retry = detail.retries.get(event_id) or await _retry_record(redis, account_id, event_id)
                out.detail = (
                    f"queued, {out.position} of {detail.pending_total} in its serial; " + detail.waiting
                )
                return out
    written = [h for h in hist if h.kind == "written"]
    if written:
        out.where = "delivered"
        out.detail = f"delivered to Klaviyo at {iso(written[-1].at_ms)}"
        if written[-1].detail.get("worker"):
            out.detail += f" by {written[-1].detail['worker']}"
    else:
        if detail.pending_total > MAILBOX_SCAN_LIMIT:
            out.detail = (
                f"not among the first {MAILBOX_SCAN_LIMIT} of the serial's {detail.pending_total} queued events, "
                "not in the DLQ"
            )
        else:
            out.detail = "not queued, not in the DLQ"
        if out.history_omitted:
            out.detail += (
                f" and no delivery in the newest {TIMELINE_LIMIT} of its serial's {detail.history_total} kept "
                f"history entries (`passbridge engine history {account_id} --event {event_id} --serial {serial}` "
                "reads them all)"
            )
        else:
            out.detail += " and no delivery in the kept history"
    return out


def _omitted(hist: list[history.HistoryEntry], omitted: int) -> int:
    """``omitted`` unless an event's history read from the newest entries is whole: an event's life starts
    with its ``ingested`` step, and the entries read are the newest, so nothing of it is older than that."""
    return 0 if hist and hist[0].kind == history.HistoryKind.ingested else omitted


async def _retry_record(redis: Redis, account_id: str, event_id: str) -> dict[str, Any] | None:
    raw = await redis.hget(account_keys(account_id).retries, event_id)
    return orjson.loads(raw) if raw is not None else None


def _serial_sentence(detail: SerialDetail) -> str:
    if detail.lease is not None:
        return f"the serial is being worked on by {detail.lease.worker_id}"
    # A paused or throttled account's serials look due, but no worker takes them: say why, not "free worker".
    info = detail.account
    if detail.pause is not None:
        return (
            f"the account is paused since {iso(detail.pause.since_ms)} ({detail.pause.kind}: "
            f"{detail.pause.reason or 'no reason given'}); nothing is sent until it resumes"
        )
    if info is not None and info.registry_state not in (None, "connected"):
        return (
            f"the account is {info.registry_state} in the registry ({info.reason or 'no reason given'}); "
            "nothing is sent until it is connected"
        )
    if detail.status == "parked":
        return f"the serial waits for its next attempt at {iso(detail.ready_at_ms)}"
    if detail.status == "ready" and detail.throttled_until_ms is not None:
        return (
            f"the serial is due, but Klaviyo throttled the account (429): no worker takes its serials "
            f"before {iso(detail.throttled_until_ms)}"
        )
    if detail.status == "ready":
        return "the serial is due and waits for a free worker"
    return "the serial is not scheduled"


# --- the report --------------------------------------------------------------------------------------------


#: Most UTC days a report reads: every day whose counters may still be kept (:data:`REPORT_TTL_S` past the
#: day's end, so the day that began up to a day before the oldest instant kept counts too).
REPORT_DAYS = REPORT_TTL_S // 86_400 + 1


def report_kept_since(now_ms: int) -> int:
    """The start (epoch ms) of the oldest UTC day whose report counters may still be kept at ``now_ms``;
    events that occurred before it are no longer counted anywhere."""
    return (now_ms - REPORT_TTL_S * 1000) // 86_400_000 * 86_400_000


async def report_rows(redis: Redis, account_id: str, since_ms: int, until_ms: int) -> list[ReportRow]:
    """Ingested lifecycle events of the account that occurred in ``[since_ms, until_ms)``, hour-granular,
    summed by (kind, platform, pass type). At most :data:`REPORT_DAYS` days are read: the newest of the range
    (older ones have expired; see :func:`report_kept_since`)."""
    keys = account_keys(account_id)
    start_hour = since_ms // 3_600_000
    end_hour = -(-until_ms // 3_600_000)
    end_day = -(-end_hour // 24)
    days = range(max(start_hour // 24, end_day - REPORT_DAYS), end_day)
    async with redis.pipeline(transaction=False) as pipe:
        for d in days:
            pipe.hgetall(keys.report(datetime.fromtimestamp(d * 86_400, UTC).strftime("%Y%m%d")))
        answers = await pipe.execute()
    sums: dict[tuple[str, str, str], int] = {}
    for d, fields in zip(days, answers, strict=True):
        for raw_field, raw_count in fields.items():
            hour_s, kind, platform, pass_type = raw_field.decode().split("|", 3)
            hour = d * 24 + int(hour_s)
            if start_hour <= hour < end_hour:
                k = (kind, platform, pass_type)
                sums[k] = sums.get(k, 0) + int(raw_count)
    return [ReportRow(k, p, t, n) for (k, p, t), n in sorted(sums.items())]


# --- lists for the dashboard -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScheduledSerial:
    """A parked serial and when it is tried again, or a leased one, its holder and lease expiry."""

    serial: str
    at_ms: int
    worker_id: str | None = None


async def parked_serials(redis: Redis, account_id: str, now: int, limit: int = 50) -> list[ScheduledSerial]:
    """Parked serials of the account, soonest next attempt first."""
    raw = await redis.zrangebyscore(
        account_keys(account_id).ready, f"({now}", "+inf", start=0, num=limit, withscores=True
    )
    return [ScheduledSerial(s.decode(), int(score)) for s, score in raw]


async def leased_serials(redis: Redis, account_id: str, limit: int = 50) -> list[ScheduledSerial]:
    """Leased serials of the account with their holders, soonest lease expiry first."""
    keys = account_keys(account_id)
    raw = await redis.zrange(keys.leased, 0, limit - 1, withscores=True)
    if not raw:
        return []
    tokens = await redis.hmget(keys.lease_tokens, [s for s, _ in raw])
    return [
        ScheduledSerial(s.decode(), int(score), t.decode().rsplit(".", 1)[0] if t is not None else None)
        for (s, score), t in zip(raw, tokens, strict=True)
    ]


def dlq_summary(account_id: str, entry: DLQEntry) -> dict[str, Any]:
    """One line of a DLQ listing: its DLQ id, the event's id, serial and kind, when and why it died, its last
    error, the attempts of its last run (since its last replay; None when an old entry does not say) and of
    all its runs."""
    last = entry.errors[-1] if entry.errors else {}
    event = entry.event
    return {
        "account": account_id,
        "dlq_id": entry.dlq_id,
        "event_id": entry.event_id,
        "serial": entry.serial,
        "kind": event.get("k"),
        "occurred_at": event.get("o"),
        "dead_at": iso(entry.dead_at_ms),
        "attempts": entry.last_run_attempts,
        "attempts_total": entry.total_attempts,
        "status": last.get("status"),
        "code": last.get("code") or last.get("kind"),
        "endpoint": last.get("endpoint"),
        "reason": entry.reason,
        "replays": entry.replays,
    }


_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


#: The latest time :func:`parse_when` accepts (9999-12-31T23:59:59.999Z); the earliest is the epoch.
MAX_WHEN_MS = 253_402_300_799_999


def parse_when(text: str, *, now: datetime | None = None) -> int:
    """Epoch ms of ``text``: ISO 8601 (UTC when it has no offset), ``now``, or an age such as ``90s``, ``30m``,
    ``2h``, ``7d``, ``1w`` (that long ago). Raises ValueError naming both forms, or the range when the time is
    before 1970 or after 9999 (``infd``, ``1e309s``, year 1: times no later step can place or print)."""
    try:
        ms = _parse_when(text, now or datetime.now(UTC))
    except OverflowError:
        ms = -1
    if not 0 <= ms <= MAX_WHEN_MS:
        raise ValueError(f"{text!r} is out of range: give a time between 1970-01-01 and 9999-12-31")
    return ms


def _parse_when(text: str, now: datetime) -> int:
    t = text.strip().lower()
    if t == "now":
        return int(now.timestamp() * 1000)
    if len(t) >= 2 and t[-1] in _UNIT_S:
        try:
            return int((now.timestamp() - float(t[:-1]) * _UNIT_S[t[-1]]) * 1000)
        except ValueError:
            pass
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is neither ISO 8601 (2026-11-25T10:00Z) nor an age (30m, 2h, 7d)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)
