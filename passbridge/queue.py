"""The producer side of the queue protocol: dedup + enqueue in one atomic Lua step."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from redis.asyncio import Redis

from passbridge.keys import ACTIVE_ACCOUNTS, NOTIFY, account_keys
from passbridge.redis_lean import LeanScripts
from passbridge.scripts import lua_source, script

if TYPE_CHECKING:
    # A type only: readers of the queue (the CLI, the exporter) should not load event validation.
    from passbridge.event import PassEvent


class BacklogFull(Exception):
    """The batch's new events would take the account's backlog over its high-water mark; nothing of it was
    written. ``depth`` is the backlog (-1: unknown), ``high_water`` the mark."""

    def __init__(self, account_id: str, depth: int, high_water: int) -> None:
        super().__init__(backlog_full_text(account_id, depth, high_water))
        self.account_id = account_id
        self.depth = depth
        self.high_water = high_water


def backlog_full_text(account_id: str, depth: int, high_water: int) -> str:
    """Why a batch was refused, in numbers an operator can check: the backlog and the mark it would pass (a
    backlog below the mark is refused too, when the batch does not fit)."""
    mark = f"its high-water mark of {high_water}"
    if depth < 0:
        return f"the new events would take account {account_id}'s backlog over {mark}"
    return f"account {account_id} has {depth} pending events; the new events would take it over {mark}"


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    """Per event: ``True`` if enqueued, ``False`` if it was a duplicate; and the account's depth after."""

    accepted: list[bool]
    depth: int


def dedup_bucket_width(window_s: int) -> int:
    """Eight buckets cover the window: a day wide for the default week, narrower for short test windows."""
    return max(1, min(86_400, -(-window_s // 7)))


async def enqueue(
    redis: Redis,
    account_id: str,
    events: Sequence[PassEvent],
    *,
    high_water: int,
    dedup_window_s: int,
    now_ms: int | None = None,
    lean: LeanScripts | None = None,
) -> EnqueueResult:
    """Deduplicate ``events`` by ``event_id`` and append the new ones to their serials' mailboxes.

    All-or-nothing: raises :class:`BacklogFull` (writing nothing) when the new events would push the
    account's backlog over ``high_water``. No history entry is written: a pending event's "ingested" step is
    read from its mailbox entry (``worker.history.timeline``) and stored when the engine settles it.
    With ``lean`` (the publisher's own connection to the same server) the script runs over it instead of
    ``redis``'s pool; the outcome and the errors are the same.
    """
    if not events:
        return EnqueueResult([], 0)
    keys = account_keys(account_id)
    args: list[str | int | bytes] = [
        keys.base,
        now_ms if now_ms is not None else int(time.time() * 1000),
        high_water,
        dedup_window_s,
        dedup_bucket_width(dedup_window_s),
        NOTIFY,
        ACTIVE_ACCOUNTS,
        account_id,
    ]
    for ev in events:
        args += [ev.event_id, ev.serial_number, ev.occurred_ms, ev.to_wire()]
    if lean is not None:
        reply = await lean.run(lua_source("enqueue"), args)
    else:
        reply = await script(redis, "enqueue")(args=args)
    status, depth, *flags = reply
    if status == 0:
        raise BacklogFull(account_id, int(depth), high_water)
    return EnqueueResult([bool(f) for f in flags], int(depth))


async def count_skipped(redis: Redis, account_id: str, pass_types: Iterable[str]) -> int:
    """Count events acknowledged but not synced (their pass type is not among the account's synced ones).

    Adds to ``skipped`` and ``skipped:<pass_type>`` in the account's stats hash; returns how many.
    """
    counts = Counter(pass_types)
    if not counts:
        return 0
    key = account_keys(account_id).stats
    total = sum(counts.values())
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hincrby(key, "skipped", total)
        for pass_type, n in counts.items():
            pipe.hincrby(key, f"skipped:{pass_type}", n)
        await pipe.execute()
    return total
