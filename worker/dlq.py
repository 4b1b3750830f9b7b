"""The dead-letter queue, per account: events the engine gave up on, with every attempt's error.

Layout (``docs/architecture.md``): ``AccountKeys.dlq`` is a sorted set of event ids scored by when they were
dead-lettered, ``AccountKeys.dlq_entries`` a hash event id → :class:`DLQEntry` JSON. An entry keeps the event's
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
        """JSON-able form (what is stored, plus nothing secret: events and Klaviyo errors only)."""
        return {
            "event_id": self.event_id,
            "serial": self.serial,
            "member": self.member,
            "score": self.score,
            "reason": self.reason,
            "dead_at_ms": self.dead_at_ms,
            "worker": self.worker,
            "errors": self.errors,
            "replays": self.replays,
        }

    def to_json(self) -> bytes:
        """Stored form."""
        return orjson.dumps(self.to_doc())

    @classmethod
    def from_json(cls, raw: bytes, *, dlq_score: float | None = None) -> DLQEntry:
        """Inverse of :meth:`to_json`; ``dlq_score`` (the entry's DLQ score, Redis time) replaces the stored
        ``dead_at_ms`` when given."""
        d = orjson.loads(raw)
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
        )


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
    """(event id, score) of the entries scored in ``[lo, hi]``, oldest (or newest) first, a page at a time.

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
            event_id, at = member.decode(), int(score)
            if (lo is not None and at < lo) if newest_first else (hi is not None and at > hi):
                in_range = False
                break
            if at == last_score:
                if event_id in seen_at_last:
                    continue
                seen_at_last.add(event_id)
            else:
                last_score, seen_at_last = at, {event_id}
            page.append((event_id, at))
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
    """Ids of the entries dead-lettered in ``[since_ms, until_ms]`` (Redis time), oldest first, a page at a
    time, without reading the entries."""
    async for page in _pages(redis, account_keys(account_id).dlq, since_ms, until_ms):
        yield [event_id for event_id, _ in page]


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
            raws = await redis.hmget(keys.dlq_entries, [event_id for event_id, _ in page])
            for (_, dlq_score), raw in zip(page, raws, strict=True):
                if raw is None:  # purged or replayed meanwhile
                    continue
                entry = DLQEntry.from_json(raw, dlq_score=dlq_score)
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
    """Ids of every entry ``flt`` matches, oldest first. Only a code or serial filter reads the entries (and
    spends ``budget``); a time range alone is answered from the DLQ's scores."""
    flt = flt or DLQFilter()
    if not needs_entries(flt):
        return [i async for page in iter_ids(redis, account_id, flt.since_ms, flt.until_ms) for i in page]
    return [e.event_id async for e in iter_entries(redis, account_id, flt, budget=budget)]


async def list_entries(
    redis: Redis, account_id: str, flt: DLQFilter | None = None, *, limit: int | None = None
) -> list[DLQEntry]:
    """:func:`iter_entries` as a list."""
    return [e async for e in iter_entries(redis, account_id, flt, limit=limit)]


async def get(redis: Redis, account_id: str, event_id: str) -> DLQEntry | None:
    """One entry by event id."""
    keys = account_keys(account_id)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hget(keys.dlq_entries, event_id)
        pipe.zscore(keys.dlq, event_id)
        raw, dlq_score = await pipe.execute()
    return DLQEntry.from_json(raw, dlq_score=dlq_score) if raw is not None else None


@dataclass(slots=True)
class ReplayOutcome:
    """What one :func:`replay` call did."""

    replayed: int = 0
    #: Ids still in the DLQ, in the order given: no room under the account's high-water mark (``full``), or
    #: the caller stopped the replay. The next wave replays them.
    left: list[str] = field(default_factory=list)
    #: Ids that were not in the DLQ (replayed or purged meanwhile).
    missing: int = 0
    #: The account's pending events after the last step.
    depth: int = 0
    #: Whether the account's backlog reached its high-water mark.
    full: bool = False


async def depth(redis: Redis, account_id: str) -> int:
    """The account's pending events: what a replay's room under the backlog high-water mark is measured from."""
    return int(await redis.get(account_keys(account_id).depth) or 0)


def backlog_full_message(account_id: str, depth: int, high_water: int, left: int) -> str:
    """Why ``left`` entries stayed in the DLQ, for an operator (the CLI and the dashboard add what to do)."""
    return (
        f"account {account_id}'s backlog is at its high-water mark ({depth} pending, "
        f"PASSBRIDGE_BACKLOG_HIGH_WATER={high_water}): {left} of the selected entries are still in the DLQ; "
        "replaying them now would make its live ingest answer 503"
    )


async def replay(
    redis: Redis,
    account_id: str,
    event_ids: Sequence[str],
    *,
    high_water: int,
    history_retention_ms: int,
    by: str = "operator",
    progress: Callable[[int], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> ReplayOutcome:
    """Put entries back into their serials' mailboxes (see ``replay.lua``), oldest first as given, while the
    account's pending events stay within ``high_water`` (the producer's backlog high-water mark: ingest answers
    503 beyond it).

    Each chunk is one atomic step: an entry leaves the DLQ in the step that puts it back in its mailbox. At the
    first chunk that finds the backlog full, the rest of ``event_ids`` is left (``ReplayOutcome.left``), so
    what is replayed is always the oldest part of the selection; so is everything after ``stop()`` turns true.
    Their earlier errors move into the event's retry record, so one that fails again lands in the DLQ with
    its whole history. ``progress`` is called after each chunk with how many of it are done (replayed, or
    no longer in the DLQ).
    """
    scripts = Scripts(redis)
    keys = account_keys(account_id)
    outcome = ReplayOutcome()
    for i in range(0, len(event_ids), CHUNK):
        if stop is not None and stop():
            outcome.left += event_ids[i:]
            break
        chunk = list(event_ids[i : i + CHUNK])
        depth, *flags = await scripts.replay(
            args=[
                keys.base,
                account_id,
                ACTIVE_ACCOUNTS,
                NOTIFY,
                history_retention_ms,
                orjson.dumps({"by": by}),
                high_water,
                *chunk,
            ]
        )
        outcome.depth = int(depth)
        settled = 0
        for event_id, flag in zip(chunk, flags, strict=True):
            if flag == 2:
                outcome.left.append(event_id)
            else:
                outcome.replayed += int(flag)
                outcome.missing += 1 - int(flag)
                settled += 1
        if progress:
            progress(settled)
        if outcome.left:
            outcome.full = True
            outcome.left += event_ids[i + CHUNK :]
            break
    return outcome


async def purge(
    redis: Redis, account_id: str, event_ids: Sequence[str], *, progress: Callable[[int], None] | None = None
) -> int:
    """Delete entries for good; returns how many existed."""
    keys = account_keys(account_id)
    removed = 0
    for i in range(0, len(event_ids), CHUNK):
        chunk = list(event_ids[i : i + CHUNK])
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hdel(keys.dlq_entries, *chunk)
            pipe.zrem(keys.dlq, *chunk)
            deleted, _ = await pipe.execute()
        removed += int(deleted)
        if progress:
            progress(len(chunk))
    return removed
