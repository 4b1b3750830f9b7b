"""PURE: how a backlog is spread over Klaviyo's single and bulk endpoints, and what the tiers allow at best.

The bulk strategy (:mod:`worker.bulk`) runs one *lane* per account and kind of write — profiles, WalletPass
records, metric events. Serials submit items (one profile, one record, or a serial's list of metric events)
and the lane decides, from its backlog and the rate limiter's answers, how each item travels:

- **single calls** while the account's backlog is small (fewer than ``small_backlog`` queued events): each
  item goes out at once, which is the lowest latency Klaviyo allows;
- **bulk requests** once the backlog grows: the oldest items, as many as one request carries, whenever a bulk
  slot is free (and the request is full, or its oldest item has waited ``linger_s``);
- and the **single-call budget spent alongside**: while the bulk endpoint is out of slots (the bottleneck, as
  record bulk requests are at 15 a minute), items beyond what the next bulk request carries (the overflow)
  go out as single calls whenever a single slot is free, so that budget is not left idle; items of fresh
  events (``urgent``) take single calls first, so an event that just arrived does not wait behind the
  backlog. While bulk slots are free, single calls would add nothing but CPU, so they are not used.

``SyncMode.bulk`` always uses bulk requests (tests use it to exercise the bulk path with tiny backlogs);
``SyncMode.single`` is one call per operation with no coalescing (the engine's :class:`PerEventSync`).

:func:`drain_ceiling` computes the best drain rate the tiers allow for a backlog, the yardstick of
``bench/drain.py``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum


class SyncMode(StrEnum):
    """How a worker writes to Klaviyo (``PASSBRIDGE_WORKER_SYNC_MODE``)."""

    #: Single calls for small backlogs, bulk endpoints as they grow, both budgets spent (the default).
    adaptive = "adaptive"
    #: One call per operation, no coalescing: what RudderStack's Klaviyo destination does.
    single = "single"
    #: Bulk endpoints for everything, however small (for tests of the bulk path).
    bulk = "bulk"


@dataclass(frozen=True, slots=True)
class LanePolicy:
    """Limits and thresholds of one lane. Units are what the bulk limit counts (events, profiles, records)."""

    #: Most units and bytes one bulk request carries (Klaviyo's limits, less a safety margin for bytes).
    bulk_max_units: int
    bulk_max_bytes: int
    #: While the account has fewer events than this queued, single calls only (adaptive mode).
    small_backlog: int
    #: A bulk request that is not full waits at most this long (seconds) for more items.
    linger_s: float
    #: Most single calls of the lane in flight at once.
    single_concurrency: int = 32
    #: Bytes of the bulk request's envelope around the items (for the byte limit).
    envelope_bytes: int = 512
    #: A remainder this small, with nothing more on its way, goes by single calls: a bulk request carrying
    #: it would spend a bulk slot on a sliver of its capacity. Only worth it where bulk slots are scarce
    #: (records: 15 a minute); 0 turns it off.
    tail_units: int = 0


@dataclass(frozen=True, slots=True)
class LaneView:
    """What a lane knows when it decides: its pending units and items, the age of its oldest item, the
    account's queued events, the units still on their way to it, and how long the bulk endpoint is out of
    slots."""

    pending_units: int
    pending_items: int
    urgent_items: int
    oldest_age_s: float
    #: The account's queued events (its ``depth``, read from Redis every fraction of a second).
    backlog_events: int = 0
    #: Units queued for the account that will still reach this lane (an estimate from the backlog).
    upstream_units: float = 0.0
    #: Seconds until the bulk endpoint has a slot again (0: it has one, or no bulk request was refused).
    bulk_wait_s: float = 0.0

    @property
    def bulk_blocked(self) -> bool:
        """Whether the bulk endpoint is out of slots right now."""
        return self.bulk_wait_s > 0


def _fills_bulk(policy: LanePolicy, view: LaneView) -> bool:
    """Whether what is pending and what is still on its way would fill a bulk request."""
    return view.pending_units + view.upstream_units >= policy.bulk_max_units


def _per_item(view: LaneView) -> float:
    """Average units per pending item (a serial's metric events vary in number)."""
    return view.pending_units / view.pending_items if view.pending_items else 1.0


def single_quota(mode: SyncMode, policy: LanePolicy, view: LaneView) -> int:
    """How many pending items single calls may take now (before asking the limiter for slots).

    Adaptive: everything while the account's backlog is small. Beyond that the urgent items, and — while the
    bulk endpoint is out of slots — the overflow: what the next bulk request will not need, because it can be
    filled from the serials still on their way (or all of it, when the next bulk slot is far off). So the
    single budget adds to the bulk budget without thinning the bulk requests, and goes unused while bulk
    slots are free (it would only cost CPU). Nothing is kept back for a bulk slot two lingers away, or one
    linger away when the rest of the backlog would not fill that request. Bulk mode: none.
    """
    if mode is SyncMode.bulk:
        return 0
    if mode is SyncMode.single or view.backlog_events < policy.small_backlog:
        return view.pending_items
    if is_tail(policy, view):
        return view.pending_items
    if not view.bulk_blocked:
        return min(view.pending_items, view.urgent_items)
    if view.bulk_wait_s >= 2 * policy.linger_s or (
        view.bulk_wait_s >= policy.linger_s and not _fills_bulk(policy, view)
    ):
        # The next bulk slot is far off (the window's budget is spent), or it is a linger or more away and
        # the rest of the backlog would not fill it anyway: keeping items back for it would only delay them
        # (at the end of a drain, the last few hundred records waited up to 8 s for a slot that carried them
        # alone, while the single budget had room).
        keep_units = 0.0
    else:
        keep_units = max(0.0, policy.bulk_max_units - view.upstream_units)
    overflow = math.floor(max(0.0, view.pending_units - keep_units) / _per_item(view))
    return min(view.pending_items, view.urgent_items + overflow)


def bulk_due(mode: SyncMode, policy: LanePolicy, view: LaneView) -> bool:
    """Whether the lane should send a bulk request as soon as a bulk slot is free.

    A full request goes at once. One that is not full waits ``linger_s`` for more items — in adaptive mode
    longer while enough serials are on their way to fill it (a bulk slot is scarce: a record bulk request
    comes every 4 s at Klaviyo's steady rate), but never more than four lingers.
    """
    if view.pending_items == 0 or mode is SyncMode.single:
        return False
    full = view.pending_units >= policy.bulk_max_units
    waited = view.oldest_age_s >= policy.linger_s
    if mode is SyncMode.bulk:
        return full or waited
    if view.oldest_age_s >= 4 * policy.linger_s:
        return True
    if view.backlog_events < policy.small_backlog:
        # Single calls serve a small backlog; if their budget is spent the items age, and a bulk request
        # (rather than a long wait for single slots) takes them after a few lingers.
        return False
    if is_tail(policy, view):
        return False
    return full or (waited and not _fills_bulk(policy, view))


def is_tail(policy: LanePolicy, view: LaneView) -> bool:
    """The lane holds the last few items of a backlog (nothing more to fill a bulk request is on its way)."""
    return 0 < view.pending_units <= policy.tail_units and not _fills_bulk(policy, view)


def bulk_take(sizes: Sequence[tuple[int, int]], policy: LanePolicy) -> int:
    """How many of the items (``(units, bytes)`` each, oldest first) the next bulk request carries.

    At least one (an item alone over the byte limit is sent alone, and Klaviyo's answer decides its fate).
    """
    units = 0
    size = policy.envelope_bytes
    for n, (u, b) in enumerate(sizes):
        if n and (units + u > policy.bulk_max_units or size + b + 1 > policy.bulk_max_bytes):
            return n
        units += u
        size += b + 1
    return len(sizes)


_INDEX = re.compile(r"/(\d+)(?:/|$)")


def rejected_item(pointer: str | None, list_pointer: str) -> int | None:
    """The index of the item a 4xx's ``source.pointer`` names inside the bulk body's item list at
    ``list_pointer`` (e.g. ``/data/attributes/events-bulk-create/data``), or ``None``."""
    if not pointer or not pointer.startswith(list_pointer):
        return None
    match = _INDEX.match(pointer[len(list_pointer) :])
    return int(match.group(1)) if match else None


def halves(n: int) -> tuple[range, range]:
    """Split ``n`` items in two to isolate an unnamed bad item (a bulk request rejected whole)."""
    mid = n // 2
    return range(0, mid), range(mid, n)


def is_urgent(oldest_received_ms: int, now_ms: int, urgent_age_ms: int) -> bool:
    """Whether a serial's queued events are fresh (not a backlog): they then take single calls first."""
    return now_ms - oldest_received_ms <= urgent_age_ms


# --- the ceiling a backlog can be drained at ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KindBudget:
    """One kind of write's per-account budget: a single endpoint and a bulk endpoint (steady per minute)."""

    single_per_min: int
    bulk_per_min: int
    bulk_items: int

    @property
    def items_per_min(self) -> int:
        """Items per minute with both budgets spent and every bulk request full."""
        return self.single_per_min + self.bulk_per_min * self.bulk_items


#: Klaviyo's per-account steady budgets (DESIGN §4; spec revision 2026-07-15).
KLAVIYO_BUDGETS: Mapping[str, KindBudget] = {
    "metric events": KindBudget(single_per_min=3500, bulk_per_min=150, bulk_items=1000),
    "profiles": KindBudget(single_per_min=750, bulk_per_min=150, bulk_items=10_000),
    "records": KindBudget(single_per_min=750, bulk_per_min=15, bulk_items=500),
}


@dataclass(frozen=True, slots=True)
class Ceiling:
    """The best steady drain of a backlog of one account: its rate and which kind of write bounds it."""

    events_per_s: float
    drain_s: float
    bound_by: str
    seconds_by_kind: dict[str, float]


def drain_ceiling(
    events: int, serials: int, budgets: Mapping[str, KindBudget] = KLAVIYO_BUDGETS, rate_scale: float = 1.0
) -> Ceiling:
    """The fastest one account's backlog of ``events`` over ``serials`` distinct serials can reach Klaviyo.

    Every event needs its metric event; every serial at least one profile write and one record write (its
    queued states coalesce into one); each kind spends its single and its bulk budget with full bulk requests.
    The slowest kind sets the drain time (DESIGN §4: records cap distinct serials at (15×500 + 750)/60 ≈
    137.5 per second). ``rate_scale`` runs Klaviyo's clock faster, as the sandbox's ``--rate-scale`` does.
    """
    need = {"metric events": events, "profiles": serials, "records": serials}
    seconds = {
        kind: need[kind] / (budgets[kind].items_per_min * rate_scale / 60.0)
        for kind in ("metric events", "profiles", "records")
    }
    bound = max(seconds, key=lambda k: seconds[k])
    drain = seconds[bound]
    return Ceiling(events / drain if drain else math.inf, drain, bound, seconds)
