"""The producer's Python API: :func:`publish` validates, normalizes, deduplicates and enqueues events
exactly as the HTTP routes do, for code that already runs beside Redis (backfills, migrations, tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from passbridge.accounts import Account
from passbridge.event import EventSource, PassEvent, utcnow
from passbridge.queue import count_skipped, enqueue
from producer.ingest import ItemError, to_event


@dataclass
class PublishSummary:
    """What happened to each item: accepted, duplicate, skipped (pass type not synced) or rejected."""

    accepted: int = 0
    duplicates: int = 0
    skipped: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)
    #: Every item up to this one (1-based) is settled in Redis: where to resume after a failure.
    settled_through: int = 0

    @property
    def total(self) -> int:
        return self.accepted + self.duplicates + self.skipped + len(self.rejected)


async def publish(
    redis: Redis,
    account: Account,
    items: Iterable[Any],
    *,
    source: EventSource = "api",
    default_region: str = "US",
    high_water: int = 1_000_000,
    dedup_window_s: int = 7 * 24 * 3600,
    chunk: int = 500,
) -> PublishSummary:
    """Publish raw event items (dicts in the events-API shape) for ``account``; invalid ones are reported."""
    summary = PublishSummary()
    async for _ in publish_iter(
        redis,
        account,
        items,
        summary,
        source=source,
        default_region=default_region,
        high_water=high_water,
        dedup_window_s=dedup_window_s,
        chunk=chunk,
    ):
        pass
    return summary


async def publish_iter(
    redis: Redis,
    account: Account,
    items: Iterable[Any],
    summary: PublishSummary,
    *,
    source: EventSource,
    default_region: str,
    high_water: int,
    dedup_window_s: int,
    chunk: int = 500,
) -> AsyncIterator[int]:
    """Like :func:`publish`, yielding the number of items handled after each chunk (for progress bars)."""
    pending: list[PassEvent] = []
    skipped: list[str] = []
    handled = 0

    async def flush(through: int) -> None:
        flags = (
            await enqueue(
                redis, account.account_id, pending, high_water=high_water, dedup_window_s=dedup_window_s
            )
        ).accepted
        summary.accepted += sum(flags)
        summary.duplicates += len(flags) - sum(flags)
        summary.settled_through = through
        pending.clear()
        await count_skipped(redis, account.account_id, skipped)
        skipped.clear()

    for index, raw in enumerate(items, start=1):
        handled += 1
        try:
            ev = to_event(
                raw, account=account, source=source, received_at=utcnow(), default_region=default_region
            )
        except ItemError as exc:
            summary.rejected.append({"line": index, "errors": exc.errors})
            continue
        if account.syncs(ev.pass_type):
            pending.append(ev)
        else:
            summary.skipped += 1
            skipped.append(ev.pass_type)
        if len(pending) + len(skipped) >= chunk:
            await flush(index)
            yield handled
    if pending or skipped:
        await flush(handled)
    summary.settled_through = handled
    yield handled
