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
from producer.ingest import REJECTED_DETAILS, ItemError, Rejections, to_event


@dataclass
class PublishSummary:
    """What happened to each item: accepted, duplicate, skipped (pass type not synced) or rejected.

    ``rejected`` lists every rejected item by its 1-based number, with its errors for the first
    ``rejected.details`` of them only (:class:`~producer.ingest.Rejections`), as the NDJSON route does.
    """

    accepted: int = 0
    duplicates: int = 0
    skipped: int = 0
    rejected: Rejections = field(default_factory=Rejections)
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
    rejected_details: int = REJECTED_DETAILS,
) -> PublishSummary:
    """Publish raw event items (dicts in the events-API shape) for ``account``; invalid ones are reported, the
    errors of the first ``rejected_details`` of them included."""
    summary = PublishSummary(rejected=Rejections(rejected_details))
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
    """Like :func:`publish`, yielding the number of items handled after each chunk (for progress bars).

    An item that is an :class:`~producer.ingest.ItemError` is rejected with its errors (a line that is not JSON,
    say).
    """
    rejected = summary.rejected
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
        if isinstance(raw, ItemError):
            rejected.add(index, raw.errors)
            continue
        try:
            ev = to_event(
                raw,
                account=account,
                source=source,
                received_at=utcnow(),
                default_region=default_region,
                details=rejected.wants_details,
            )
        except ItemError as exc:
            rejected.add(index, exc.errors)
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
