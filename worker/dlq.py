"""The dead-letter queue, per account: events the engine gave up on, with every attempt's error.

Layout (``docs/architecture.md``): ``AccountKeys.dlq`` is a sorted set of DLQ ids scored by when they were
dead-lettered, ``AccountKeys.dlq_entries`` a hash DLQ id → :class:`DLQEntry` JSON. A DLQ id is the entry's
event id, or the event id plus ``#2``, ``#3``, ... when an entry of that event id was in the DLQ already (after
the dedup window a client may send the same event id again, and both may fail): ``settle.lua`` picks the
smallest free one, so no entry ever replaces another. Every operation takes DLQ ids. An entry keeps the event's
exact mailbox member (arrival sequence + wire JSON) and score (``occurred_at`` ms), so :func:`replay` puts it
back into its serial's mailbox in its original place in time. Entries are written by the engine inside the
fenced ``settle.lua`` step that removes the event from its mailbox, so an event is always in exactly one of
the two places.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from redis.asyncio import Redis

from passbridge.keys import ACTIVE_ACCOUNTS, NOTIFY, account_keys
from passbridge.settings import replay_limit
from worker.queue import split_member
from worker.scripts import Scripts

#: Entries read or replayed per Redis call in bulk operations.
CHUNK = 200


@dataclass(slots=True)
class DLQEntry:
    """One dead-lettered event."""

    event_id: str
    serial: str
    member: str
    score: int
    reason: str
    #: When it was dead-lettered. Read from the DLQ, this is the entry's DLQ score (Redis time, the clock the
    #: time filters query), not the worker's own clock reading stored with it: one clock for filters and display.
    dead_at_ms: int
    worker: str
    errors: list[dict[str, Any]] = field(default_factory=list)
    #: How often the event was replayed before (an entry that fails again keeps its earlier errors).
    replays: int = 0
    #: Counted attempts of its last run, since its last replay (``None`` in entries written before it was
    #: stored: see :attr:`last_run_attempts`). ``errors`` also holds earlier runs' (the newest 50 in all).
    attempts: int | None = None
    #: Counted attempts across all its runs (``None``: not known, see :attr:`last_run_attempts`).
    attempts_total: int | None = None
    #: Its key in the DLQ (the event id, or the event id plus ``#n``: see the module docstring). Not stored:
    #: readers set it from the key they read; empty means the event id.
    dlq_id: str = ""

    def __post_init__(self) -> None:
        if not self.dlq_id:
            self.dlq_id = self.event_id

    @property
    def last_run_attempts(self) -> int | None:
        """Counted attempts since its last replay; entries written before this was stored fall back to
        ``len(errors)`` when the event was never replayed (then that is every attempt), else ``None``."""
        if self.attempts is not None:
            return self.attempts
        return len(self.errors) if self.replays == 0 else None

    @property
    def total_attempts(self) -> int:
        """Counted attempts across every run (at least ``len(errors)`` for entries written before it was kept)."""
        return self.attempts_total if self.attempts_total is not None else len(self.errors)

    @property
    def event(self) -> dict[str, Any]:
        """The event's wire JSON, decoded (see ``PassEvent.to_wire``)."""
        return dict(orjson.loads(split_member(self.member.encode())[1]))

    @property
    def codes(self) -> set[str]:
        """Every error code and HTTP status seen in its attempts (what ``--code`` filters on)."""
        out: set[str] = set()
        for err in self.errors:
            if err.get("code"):
                out.add(str(err["code"]))
            if err.get("status") is not None:
                out.add(str(err["status"]))
            if err.get("kind"):
                out.add(str(err["kind"]))
        return out

    def to_doc(self) -> dict[str, Any]:
        """JSON-able form (what is stored, plus nothing secret: events and Klaviyo errors only); the DLQ id is
        not stored (it is the entry's key) but is part of the doc."""
        return {
            "dlq_id": self.dlq_id,
            "event_id": self.event_id,
            "serial": self.serial,
            "member": self.member,
            "score": self.score,
            "reason": self.reason,
            "dead_at_ms": self.dead_at_ms,
            "worker": self.worker,
            "errors": self.errors,
            "replays": self.replays,
            "attempts": self.attempts,
            "attempts_total": self.attempts_total,
        }

    def to_json(self) -> bytes:
        """Stored form (without the DLQ id: that is chosen when it is stored, see ``settle.lua``)."""
        doc = self.to_doc()
        del doc["dlq_id"]
        return orjson.dumps(doc)

    @classmethod
    def from_json(
        cls, raw: bytes, *, dlq_score: float | None = None, dlq_id: str | bytes | None = None
    ) -> DLQEntry:
        """Inverse of :meth:`to_json`; ``dlq_score`` (the entry's DLQ score, Redis time) replaces the stored
        ``dead_at_ms`` when given; ``dlq_id`` is the key it was read from (default: its event id)."""
        d = orjson.loads(raw)
        if isinstance(dlq_id, bytes):
            dlq_id = dlq_id.decode()
        return cls(
            event_id=d["event_id"],
            serial=d["serial"],
            member=d["member"],
            score=int(d["score"]),
            reason=d["reason"],
            dead_at_ms=int(dlq_score) if dlq_score is not None else int(d["dead_at_ms"]),
            worker=d["worker"],
            errors=list(d.get("errors", [])),
            replays=int(d.get("replays", 0)),
            attempts=_int_or_none(d.get("attempts")),
            attempts_total=_int_or_none(d.get("attempts_total")),
            dlq_id=dlq_id or "",
        )


def _int_or_none(value: Any) -> int | None:
    return int(value) if value is not None else None


@dataclass(frozen=True, slots=True)
class DLQFilter:
    """Which entries an operator means: by error code/status/kind, dead-lettered time range (Redis time, as
    DLQ scores are), serial."""

    code: str | None = None
    since_ms: int | None = None
    until_ms: int | None = None
    serial: str | None = None

    def matches(self, entry: DLQEntry) -> bool:
        """Whether ``entry`` passes every given criterion."""
        if self.serial is not None and entry.serial != self.serial:
            return False
        if self.code is not None and self.code not in entry.codes:
            return False
        if self.since_ms is not None and entry.dead_at_ms < self.since_ms:
            return False
        return not (self.until_ms is not None and entry.dead_at_ms > self.until_ms)


async def count(redis: Redis, account_id: str) -> int:
    """How many entries the account's DLQ holds."""
    return int(await redis.zcard(account_keys(account_id).dlq))


@dataclass(slots=True)
class Budget:
    """A cap on how many entries one or more :func:`iter_entries` calls read: the dashboard scans on the
    producer's event loop, so it stops after ``limit`` and says so."""

    limit: int
    examined: int = 0
    #: Set when the scan stopped at the cap with entries left unread (more may match).
    exhausted: bool = False


def needs_entries(flt: DLQFilter) -> bool:
    """Whether ``flt`` looks inside entries; a time range alone is answered by the DLQ's scores."""
    return flt.code is not None or flt.serial is not None


async def _pages(
    redis: Redis, key: str, lo: int | None, hi: int | None, *, newest_first: bool = False
) -> AsyncIterator[list[tuple[str, int]]]:
    """(DLQ id, score) of the entries scored in ``[lo, hi]``, oldest (or newest) first, a page at a time.

    Pages are positioned by rank, never by an offset (Redis walks every skipped entry again for an offset, so a
    full scan of a big DLQ would be quadratic): the first by ZCOUNT, each next one by the rank of the last id
    seen — O(log N + page) each. If that id was removed meanwhile (replayed or purged), the scan resumes at the
    start of its score and skips the ids of that score it already gave.

    Scores are Redis time with a fractional part (microseconds); an entry's time is its whole millisecond, so
    ``hi`` takes in the whole of its millisecond.
    """
    if newest_first:
        start = 0 if hi is None else int(await redis.zcount(key, hi + 1, "+inf"))
    else:
        start = 0 if lo is None else int(await redis.zcount(key, "-inf", f"({lo}"))
    last_score: int | None = None
    seen_at_last: set[str] = set()
    while True:
        raw = await redis.zrange(key, start, start + CHUNK - 1, desc=newest_first, withscores=True)
        page: list[tuple[str, int]] = []
        in_range = True
        for member, score in raw:
            dlq_id, at = member.decode(), int(score)
            if (lo is not None and at < lo) if newest_first else (hi is not None and at > hi):
                in_range = False
                break
            if at == last_score:
                if dlq_id in seen_at_last:
                    continue
                seen_at_last.add(dlq_id)
            else:
                last_score, seen_at_last = at, {dlq_id}
            page.append((dlq_id, at))
        if page:
            yield page
        if not in_range or len(raw) < CHUNK:
            return
        rank = await (redis.zrevrank if newest_first else redis.zrank)(key, raw[-1][0])
        if rank is not None:
            start = int(rank) + 1
        elif newest_first:
            start = int(await redis.zcount(key, (last_score or 0) + 1, "+inf"))
        else:
            start = int(await redis.zcount(key, "-inf", f"({last_score}"))


async def iter_ids(
    redis: Redis, account_id: str, since_ms: int | None = None, until_ms: int | None = None
) -> AsyncIterator[list[str]]:
    """DLQ ids of the entries dead-lettered in ``[since_ms, until_ms]`` (Redis time), oldest first, a page at
    a time, without reading the entries."""
    async for page in _pages(redis, account_keys(account_id).dlq, since_ms, until_ms):
        yield [dlq_id for dlq_id, _ in page]


async def iter_entries(
    redis: Redis,
    account_id: str,
    flt: DLQFilter | None = None,
    *,
    limit: int | None = None,
    budget: Budget | None = None,
    newest_first: bool = False,
) -> AsyncGenerator[DLQEntry, None]:
    """Entries in the order they were dead-lettered (``newest_first``: the reverse), filtered; the time range
    is applied in Redis. With a ``budget``, stops once it is spent (and marks it exhausted if entries were left
    unread)."""
    flt = flt or DLQFilter()
    keys = account_keys(account_id)
    yielded = 0
    async for page in _pages(redis, keys.dlq, flt.since_ms, flt.until_ms, newest_first=newest_first):
        cut = False
        if budget is not None:
            room = budget.limit - budget.examined
            if len(page) > room:
                page, cut = page[: max(room, 0)], True
                budget.exhausted = True
            budget.examined += len(page)
        if page:
            raws = await redis.hmget(keys.dlq_entries, [dlq_id for dlq_id, _ in page])
            for (dlq_id, dlq_score), raw in zip(page, raws, strict=True):
                if raw is None:  # purged or replayed meanwhile
                    continue
                entry = DLQEntry.from_json(raw, dlq_score=dlq_score, dlq_id=dlq_id)
                if flt.matches(entry):
                    yield entry
                    yielded += 1
                    if limit is not None and yielded >= limit:
                        return
        if cut:
            return


async def select_ids(
    redis: Redis, account_id: str, flt: DLQFilter | None = None, *, budget: Budget | None = None
) -> list[str]:
    """DLQ ids of every entry ``flt`` matches, oldest first. Only a code or serial filter reads the entries (and
    spends ``budget``); a time range alone is answered from the DLQ's scores."""
    flt = flt or DLQFilter()
    if not needs_entries(flt):
        return [i async for page in iter_ids(redis, account_id, flt.since_ms, flt.until_ms) for i in page]
    return [e.dlq_id async for e in iter_entries(redis, account_id, flt, budget=budget)]


async def list_entries(
    redis: Redis, account_id: str, flt: DLQFilter | None = None, *, limit: int | None = None
) -> list[DLQEntry]:
    """:func:`iter_entries` as a list."""
    return [e async for e in iter_entries(redis, account_id, flt, limit=limit)]


async def get(redis: Redis, account_id: str, dlq_id: str) -> DLQEntry | None:
    """One entry by DLQ id (for an event's first entry, its event id)."""
    keys = account_keys(account_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hget(keys.dlq_entries, dlq_id)
        pipe.zscore(keys.dlq, dlq_id)
        raw, dlq_score = await pipe.execute()
    return DLQEntry.from_json(raw, dlq_score=dlq_score, dlq_id=dlq_id) if raw is not None else None


#: How many ``#n`` DLQ ids of one event id :func:`entries_of` looks at. ``settle.lua`` takes the smallest free
#: ``n``, so an entry lies beyond this only if that many entries of one event id were in the DLQ at once.
SAME_ID_PROBE = 8


def same_id_keys(event_id: str) -> list[str]:
    """The DLQ ids an event id's entries can have (see :data:`SAME_ID_PROBE`)."""
    return [event_id, *(f"{event_id}#{n}" for n in range(2, SAME_ID_PROBE + 2))]


async def entries_of(redis: Redis, account_id: str, event_ids: Sequence[str]) -> list[DLQEntry]:
    """Every DLQ entry of these event ids (an event id sent again after the dedup window can have several),
    oldest first per event id, in one round trip."""
    if not event_ids:
        return []
    keys = account_keys(account_id)
    probe = [k for event_id in event_ids for k in same_id_keys(event_id)]
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hmget(keys.dlq_entries, probe)
        pipe.zmscore(keys.dlq, probe)
        raws, scores = await pipe.execute()
    width = SAME_ID_PROBE + 1
    out: list[DLQEntry] = []
    for i, event_id in enumerate(event_ids):
        found = [
            DLQEntry.from_json(raw, dlq_score=score, dlq_id=dlq_id)
            for dlq_id, raw, score in zip(
                probe[i * width : (i + 1) * width],
                raws[i * width : (i + 1) * width],
                scores[i * width : (i + 1) * width],
                strict=True,
            )
            if raw is not None
        ]
        # A key such as "x#2" may belong to another event whose id is "x#2".
        out += sorted((e for e in found if e.event_id == event_id), key=lambda e: (e.dead_at_ms, e.dlq_id))
    return out


@dataclass(slots=True)
class ReplayOutcome:
    """What one :func:`replay` call did."""

    replayed: int = 0
    #: Ids still in the DLQ, in the order given: no room under the account's replay limit (``full``), or
    #: the caller stopped the replay. The next wave replays them.
    left: list[str] = field(default_factory=list)
    #: Ids that were not in the DLQ (replayed or purged meanwhile).
    missing: int = 0
    #: The account's pending events after the last step.
    depth: int = 0
    #: Whether the account's backlog reached the replay limit.
    full: bool = False
    #: The replay limit: the depth up to which the replay filled the backlog (see :func:`replay`).
    limit: int = 0


async def depth(redis: Redis, account_id: str) -> int:
    """The account's pending events: what a replay's room under its replay limit is measured from."""
    return int(await redis.get(account_keys(account_id).depth) or 0)


def limit_text(high_water: int, reserve: float) -> str:
    """The replay limit and where it comes from, for operators' messages."""
    return (
        f"{replay_limit(high_water, reserve)} pending: PASSBRIDGE_BACKLOG_HIGH_WATER={high_water} less the "
        f"PASSBRIDGE_REPLAY_RESERVE={reserve:g} kept for live ingest"
    )


def backlog_full_message(account_id: str, depth: int, high_water: int, reserve: float, left: int) -> str:
    """Why ``left`` entries stayed in the DLQ, for an operator (the CLI and the dashboard add what to do)."""
    return (
        f"account {account_id}'s backlog has reached its replay limit ({depth} pending; a replay fills it up to "
        f"{limit_text(high_water, reserve)}): {left} of the selected entries are still in the DLQ; replaying "
        "them now would take the room kept for its live ingest"
    )


async def replay(
    redis: Redis,
    account_id: str,
    dlq_ids: Sequence[str],
    *,
    high_water: int,
    reserve: float,
    history_retention_ms: int,
    by: str = "operator",
    progress: Callable[[int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> ReplayOutcome:
    """Put the entries ``dlq_ids`` back into their serials' mailboxes (see ``replay.lua``), oldest first as
    given, while the account's pending events stay within its replay limit: ``high_water`` (the producer's
    backlog high-water mark: ingest answers 503 beyond it) less the share ``reserve`` of it, which is kept for
    the account's live ingest (see ``passbridge.settings.replay_limit``; ``reserve`` 0: up to the mark). Each
    replays its own payload, under its event id (replay writes the mailbox directly: no dedup window drops
    it).

    Each chunk is one atomic step: an entry leaves the DLQ in the step that puts it back in its mailbox. At the
    first chunk that finds the backlog full, the rest of ``dlq_ids`` is left (``ReplayOutcome.left``), so
    what is replayed is always the oldest part of the selection; so is everything after ``stop()`` turns true.
    Their earlier errors move into the event's retry record, so one that fails again lands in the DLQ with
    its whole history. ``progress`` is called after each chunk with how many of it are done (replayed, or
    no longer in the DLQ).
    """
    scripts = Scripts(redis)
    keys = account_keys(account_id)
    outcome = ReplayOutcome(limit=replay_limit(high_water, reserve))
    for i in range(0, len(dlq_ids), CHUNK):
        if stop is not None and stop():
            outcome.left += dlq_ids[i:]
            break
        chunk = list(dlq_ids[i : i + CHUNK])
        depth, *flags = await scripts.replay(
            args=[
                keys.base,
                account_id,
                ACTIVE_ACCOUNTS,
                NOTIFY,
                history_retention_ms,
                orjson.dumps({"by": by}),
                outcome.limit,
                *chunk,
            ]
        )
        outcome.depth = int(depth)
        settled = 0
        for dlq_id, flag in zip(chunk, flags, strict=True):
            if flag == 2:
                outcome.left.append(dlq_id)
            else:
                outcome.replayed += int(flag)
                outcome.missing += 1 - int(flag)
                settled += 1
        if progress:
            progress(settled)
        if outcome.left:
            outcome.full = True
            outcome.left += dlq_ids[i + CHUNK :]
            break
    return outcome


async def purge(
    redis: Redis, account_id: str, dlq_ids: Sequence[str], *, progress: Callable[[int], None] | None = None
) -> int:
    """Delete the entries ``dlq_ids`` for good; returns how many existed."""
    keys = account_keys(account_id)
    removed = 0
    for i in range(0, len(dlq_ids), CHUNK):
        chunk = list(dlq_ids[i : i + CHUNK])
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hdel(keys.dlq_entries, *chunk)
            pipe.zrem(keys.dlq, *chunk)
            deleted, _ = await pipe.execute()
        removed += int(deleted)
        if progress:
            progress(len(chunk))
    return removed
