"""Canonical events for engine tests, enqueued through the producer's own enqueue script."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from redis.asyncio import Redis

from passbridge.event import PassEvent
from passbridge.queue import enqueue

BASE_TIME = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)


def pass_event(
    account_id: str, serial: str, n: int, *, kind: str = "updated", offset_s: float | None = None, **over: Any
) -> PassEvent:
    """Event ``n`` of ``serial``; occurred ``offset_s`` (default ``n``) seconds after a fixed base time."""
    occurred = BASE_TIME + timedelta(seconds=n if offset_s is None else offset_s)
    data: dict[str, Any] = {
        "event_id": f"{account_id}-{serial}-{n}",
        "account_id": account_id,
        "kind": kind,
        "serial_number": serial,
        "pass_type": "ptk_0x216",
        "platform": "apple",
        "occurred_at": occurred,
        "received_at": datetime.now(UTC),
        "source": "api",
        "email": f"{serial.lower()}@example.com",
        "pass_url": f"https://passninja.com/p/{serial}",
        "properties": {"points": n, "tier": "gold"},
    }
    data.update(over)
    return PassEvent.model_validate(data)


async def put(redis: Redis, *events: PassEvent) -> None:
    """Enqueue ``events`` (grouped by account) exactly as the producer does."""
    by_account: dict[str, list[PassEvent]] = {}
    for ev in events:
        by_account.setdefault(ev.account_id, []).append(ev)
    for account_id, evs in by_account.items():
        await enqueue(redis, account_id, evs, high_water=10_000_000, dedup_window_s=3600)
