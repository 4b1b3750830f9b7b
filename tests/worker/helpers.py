"""Canonical events for engine tests, enqueued through the producer's own enqueue script."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from redis.asyncio import Redis

from passbridge.event import PassEvent
from passbridge.keys import account_keys
from passbridge.queue import enqueue
from worker.dlq import DLQEntry
from worker.queue import WorkQueue

BASE_TIME = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
#: The backlog high-water mark tests enqueue and replay under: far above any test's backlog.
HIGH_WATER = 10_000_000
#: The share of it replays leave to live ingest (PASSBRIDGE_REPLAY_RESERVE's default).
REPLAY_RESERVE = 0.1


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
        await enqueue(redis, account_id, evs, high_water=HIGH_WATER, dedup_window_s=3600)


#: Error (code, status) of the n-th event dead-lettered by :func:`fill_dlq`.
FILL_CODES = [("invalid", 400), ("not_found", 404), ("invalid", 400), ("conflict", 409)]


async def fill_dlq(redis: Redis, account_id: str, serials: Sequence[str], per_serial: int) -> None:
    """Dead-letter ``per_serial`` events of each serial through the engine's own claim and settle steps (many
    per settle call, so many entries share one DLQ score), with errors cycling through ``FILL_CODES``."""
    events = [pass_event(account_id, s, n) for s in serials for n in range(per_serial)]
    for i in range(0, len(events), 5000):
        await put(redis, *events[i : i + 5000])
    q = WorkQueue(redis, worker_id="filler")
    keys = account_keys(account_id)
    for lease in (await q.claim(len(serials), per_account=len(serials))).leases:
        while members := await redis.zrange(keys.mailbox(lease.serial), 0, 499):
            dead = []
            for member in members:
                event_id = orjson.loads(member[12:])["id"]
                code, status = FILL_CODES[int(event_id.rsplit("-", 1)[1]) % len(FILL_CODES)]
                at = int(datetime.now(UTC).timestamp() * 1000)
                entry = permanent_entry("filler", lease.serial, member, 0, code=code, status=status, at_ms=at)
                dead.append((event_id, entry.to_json()))
            assert (await q.settle(lease, members, dead=dead)).ok
        await q.release(lease)


def permanent_entry(
    worker: str,
    serial: str,
    member: bytes,
    score: int,
    *,
    at_ms: int,
    code: str = "invalid",
    status: int = 400,
    reason: str | None = None,
    detail: str | None = None,
) -> DLQEntry:
    """The dead letter of mailbox ``member`` after one permanent Klaviyo error, as the engine writes it."""
    error: dict[str, Any] = {
        "at_ms": at_ms,
        "worker": worker,
        "kind": "permanent",
        "status": status,
        "code": code,
    }
    if detail is not None:
        error |= {"endpoint": "create_event", "detail": detail}
    return DLQEntry(
        event_id=orjson.loads(member[12:])["id"],
        serial=serial,
        member=member.decode(),
        score=score,
        reason=reason or f"permanent error: HTTP {status} {code}",
        dead_at_ms=at_ms,
        worker=worker,
        errors=[error],
    )


async def dead_letter_head(q: WorkQueue, redis: Redis, account_id: str, serial: str, **kw: Any) -> DLQEntry:
    """Claim ``serial`` with ``q``, dead-letter its head event (:func:`permanent_entry` with ``kw``), release it."""
    claimed = await q.claim(50)
    (lease,) = [lease for lease in claimed.leases if lease.serial == serial]
    for other in claimed.leases:
        if other is not lease:
            await q.release(other)
    (member, score) = (await redis.zrange(account_keys(account_id).mailbox(serial), 0, 0, withscores=True))[0]
    entry = permanent_entry(lease.worker_id, serial, member, int(score), **kw)
    assert (await q.settle(lease, [member], dead=[(entry.event_id, entry.to_json())])).ok
    assert await q.release(lease)
    return entry


async def settle_pending(redis: Redis, account_id: str, limit: int) -> int:
    """Settle (as written) up to ``limit`` pending events of ``account_id`` through the engine's own claim,
    settle and release steps, as a worker that drains the backlog would; returns how many."""
    q = WorkQueue(redis, worker_id="drainer")
    keys = account_keys(account_id)
    done = 0
    for lease in (await q.claim(50, per_account=50)).leases:
        if lease.account_id == account_id and done < limit:
            members = await redis.zrange(keys.mailbox(lease.serial), 0, limit - done - 1)
            if members:
                assert (await q.settle(lease, members)).ok
                done += len(members)
        await q.release(lease)
    return done


async def forget_dedup(redis: Redis, account_id: str) -> None:
    """What the passing of the dedup window does: the producer forgets every event id it saw."""
    async for key in redis.scan_iter(match=account_keys(account_id).dedup_prefix + "*"):
        await redis.delete(key)


async def dead_letter_same_id_twice(redis: Redis, account_id: str, serial: str) -> tuple[DLQEntry, DLQEntry]:
    """Event ``<account>-<serial>-0`` dead-lettered (400 invalid, points 1), then — the dedup window passed —
    sent again with other properties (points 2) and dead-lettered too (404 not_found)."""
    q = WorkQueue(redis, worker_id="w1", history_retention_ms=86_400_000)
    await put(redis, pass_event(account_id, serial, 0, properties={"points": 1}))
    first = await dead_letter_head(
        q, redis, account_id, serial, code="invalid", status=400, at_ms=1, detail="bad phone"
    )
    await forget_dedup(redis, account_id)
    await put(redis, pass_event(account_id, serial, 0, properties={"points": 2}))
    second = await dead_letter_head(
        q, redis, account_id, serial, code="not_found", status=404, at_ms=2, detail="no such list"
    )
    return first, second
