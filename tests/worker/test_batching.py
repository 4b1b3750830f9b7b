"""PURE: the lane policy of the bulk strategy (:mod:`worker.batching`) and the drain ceiling of DESIGN §4."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.batching import (
    KLAVIYO_BUDGETS,
    KindBudget,
    LanePolicy,
    LaneView,
    SyncMode,
    bulk_due,
    bulk_take,
    drain_ceiling,
    halves,
    is_tail,
    is_urgent,
    rejected_item,
    single_quota,
)
from worker.bulk import EVENTS_POINTER, RECORDS_POINTER
from worker.import_jobs import PROFILES_POINTER

#: A record lane as ``worker.bulk.AccountLanes`` builds it (Klaviyo's 500 records / 4 MB, less a margin).
RECORDS = LanePolicy(500, int(3.6 * 1024 * 1024), small_backlog=32, linger_s=0.04, tail_units=50)
EVENTS = LanePolicy(1000, int(4.5 * 1024 * 1024), small_backlog=32, linger_s=0.01)


def view(**over: float) -> LaneView:
    """A lane holding 100 items of a big backlog, nothing urgent, bulk slots free."""
    base: dict[str, float] = {
        "pending_units": 100,
        "pending_items": 100,
        "urgent_items": 0,
        "oldest_age_s": 0.0,
        "backlog_events": 10_000,
        "upstream_units": 0.0,
        "bulk_wait_s": 0.0,
    }
    base.update(over)
    return LaneView(
        int(base["pending_units"]),
        int(base["pending_items"]),
        int(base["urgent_items"]),
        base["oldest_age_s"],
        int(base["backlog_events"]),
        base["upstream_units"],
        base["bulk_wait_s"],
    )


# --- the ceiling (DESIGN §4) -----------------------------------------------------------------------------------


def test_budgets_are_klaviyos_steady_tiers() -> None:
    assert KLAVIYO_BUDGETS["records"] == KindBudget(single_per_min=750, bulk_per_min=15, bulk_items=500)
    assert KLAVIYO_BUDGETS["records"].items_per_min == 750 + 15 * 500
    assert KLAVIYO_BUDGETS["metric events"].items_per_min == 3500 + 150 * 1000
    assert KLAVIYO_BUDGETS["profiles"].items_per_min == 750 + 150 * 10_000


def test_distinct_serials_are_bound_by_records_at_137_5_per_second() -> None:
    c = drain_ceiling(events=10_000, serials=10_000)
    assert c.bound_by == "records"
    assert c.events_per_s == pytest.approx((15 * 500 + 750) / 60)
    assert c.events_per_s == pytest.approx(137.5)
    # One call per operation would be capped by the 750/min single endpoints: 11x slower.
    assert c.events_per_s / (750 / 60) == pytest.approx(11.0)


def test_issue_backlog_100k_events_over_40k_serials_is_bound_by_records_at_343_events_per_second() -> None:
    c = drain_ceiling(events=100_000, serials=40_000)
    assert c.bound_by == "records"
    assert c.drain_s == pytest.approx(40_000 / 137.5)
    assert c.events_per_s == pytest.approx(343.75)
    assert c.seconds_by_kind["metric events"] == pytest.approx(100_000 / (153_500 / 60))
    assert c.seconds_by_kind["profiles"] == pytest.approx(40_000 / (1_500_750 / 60))
    # The five-account backlog of bench/drain.py has the same shape per account: the same rate.
    assert drain_ceiling(events=20_000, serials=8_000).events_per_s == pytest.approx(343.75)


def test_repeating_serials_shift_the_bound_to_metric_events() -> None:
    c = drain_ceiling(events=1_000_000, serials=1_000)
    assert c.bound_by == "metric events"
    assert c.events_per_s == pytest.approx(153_500 / 60)
    # Between the two, more events per serial always drain at least as fast.
    rates = [drain_ceiling(events=40_000 * k, serials=40_000).events_per_s for k in (1, 2, 5, 10, 50)]
    assert rates == sorted(rates)


def test_rate_scale_speeds_klaviyos_clock() -> None:
    base = drain_ceiling(events=100_000, serials=40_000)
    fast = drain_ceiling(events=100_000, serials=40_000, rate_scale=20)
    assert fast.events_per_s == pytest.approx(base.events_per_s * 20)
    assert fast.drain_s == pytest.approx(base.drain_s / 20)
    assert fast.bound_by == base.bound_by


def test_custom_budgets_pick_the_slowest_kind() -> None:
    budgets = {
        "metric events": KindBudget(60, 0, 1),  # 1 event/s
        "profiles": KindBudget(6000, 0, 1),
        "records": KindBudget(6000, 0, 1),
    }
    c = drain_ceiling(events=30, serials=30, budgets=budgets)
    assert (c.bound_by, c.drain_s, c.events_per_s) == (
        "metric events",
        pytest.approx(30.0),
        pytest.approx(1.0),
    )


def test_empty_backlog_has_no_finite_ceiling() -> None:
    c = drain_ceiling(events=0, serials=0)
    assert c.drain_s == 0
    assert math.isinf(c.events_per_s)


# --- single calls: how many items go alone --------------------------------------------------------------------


def test_bulk_mode_never_sends_single_calls() -> None:
    for v in (view(), view(backlog_events=1, pending_items=1, pending_units=1, urgent_items=1)):
        assert single_quota(SyncMode.bulk, RECORDS, v) == 0


def test_single_mode_sends_everything_alone() -> None:
    assert single_quota(SyncMode.single, RECORDS, view()) == 100


def test_adaptive_small_backlog_goes_by_single_calls() -> None:
    v = view(backlog_events=RECORDS.small_backlog - 1, pending_items=5, pending_units=5)
    assert single_quota(SyncMode.adaptive, RECORDS, v) == 5
    assert bulk_due(SyncMode.adaptive, RECORDS, v) is False
    # The same lane at the threshold is a backlog: no single call while bulk slots are free.
    big = view(backlog_events=RECORDS.small_backlog, pending_items=5, pending_units=5, upstream_units=1000)
    assert single_quota(SyncMode.adaptive, RECORDS, big) == 0


def test_adaptive_backlog_with_free_bulk_slots_sends_only_urgent_items_alone() -> None:
    assert single_quota(SyncMode.adaptive, RECORDS, view(urgent_items=3, upstream_units=5000)) == 3
    assert single_quota(SyncMode.adaptive, RECORDS, view(urgent_items=0, upstream_units=5000)) == 0


def test_adaptive_blocked_bulk_spends_the_single_budget_on_the_overflow() -> None:
    # 800 records pending, the bulk endpoint out of slots for a moment, 100 more serials on their way: the
    # next bulk request keeps 500 - 100 = 400 of them (it fills up from upstream), the other 400 go alone.
    v = view(pending_units=800, pending_items=800, upstream_units=100, bulk_wait_s=RECORDS.linger_s)
    assert single_quota(SyncMode.adaptive, RECORDS, v) == 400
    # Fresh items come on top of the overflow (bounded by what is pending).
    v2 = view(pending_units=800, pending_items=800, upstream_units=100, urgent_items=10, bulk_wait_s=0.01)
    assert single_quota(SyncMode.adaptive, RECORDS, v2) == 410
    # Enough upstream to fill the next request on its own: everything pending may go alone.
    v3 = view(pending_units=800, pending_items=800, upstream_units=600, bulk_wait_s=0.01)
    assert single_quota(SyncMode.adaptive, RECORDS, v3) == 800
    # Less pending than the next request needs: nothing goes alone.
    v4 = view(pending_units=300, pending_items=300, upstream_units=100, bulk_wait_s=0.01)
    assert single_quota(SyncMode.adaptive, RECORDS, v4) == 0


def test_adaptive_far_bulk_slot_keeps_nothing_back() -> None:
    v = view(pending_units=300, pending_items=300, upstream_units=0, bulk_wait_s=2 * RECORDS.linger_s)
    assert single_quota(SyncMode.adaptive, RECORDS, v) == 300


def test_end_of_a_drain_does_not_wait_a_linger_for_a_bulk_slot_it_cannot_fill() -> None:
    # The last 300 records and 100 on their way, the next bulk slot a linger away: a request of 400 would
    # waste most of the slot and hold them back; they go alone (the five-account drain lost a Klaviyo
    # minute to this: a 16th bulk request of ~100 records in the next window).
    tail = view(pending_units=300, pending_items=300, upstream_units=100, bulk_wait_s=RECORDS.linger_s)
    assert single_quota(SyncMode.adaptive, RECORDS, tail) == 300
    # Enough on its way to fill that request: the next 500 - 300 = 200 are kept for it, as in mid-drain.
    more = view(pending_units=300, pending_items=300, upstream_units=300, bulk_wait_s=RECORDS.linger_s)
    assert single_quota(SyncMode.adaptive, RECORDS, more) == 100


def test_overflow_counts_items_by_their_average_units() -> None:
    # Events lane: 1000 serials carrying 3 events each; the next bulk request keeps 1000 events (333 serials).
    v = view(pending_units=3000, pending_items=1000, upstream_units=0, bulk_wait_s=EVENTS.linger_s)
    assert single_quota(SyncMode.adaptive, EVENTS, v) == math.floor(2000 / 3)


def test_tail_of_a_backlog_goes_by_single_calls() -> None:
    tail = view(pending_units=20, pending_items=20, upstream_units=10)
    assert is_tail(RECORDS, tail)
    assert single_quota(SyncMode.adaptive, RECORDS, tail) == 20
    # A lingered tail does not spend a scarce bulk slot (unless it waited four lingers: then bulk takes it).
    lingered = view(pending_units=20, pending_items=20, oldest_age_s=RECORDS.linger_s)
    assert bulk_due(SyncMode.adaptive, RECORDS, lingered) is False
    # More on its way, or more than the tail size: not a tail.
    assert not is_tail(RECORDS, view(pending_units=20, pending_items=20, upstream_units=480))
    assert not is_tail(RECORDS, view(pending_units=51, pending_items=51))
    assert not is_tail(RECORDS, view(pending_units=0, pending_items=0))
    # Lanes without a tail size (events, profiles) never have a tail.
    assert not is_tail(EVENTS, view(pending_units=1, pending_items=1))


# --- bulk requests: when they go -----------------------------------------------------------------------------


def test_nothing_pending_or_single_mode_never_sends_bulk() -> None:
    assert bulk_due(SyncMode.bulk, RECORDS, view(pending_units=0, pending_items=0, oldest_age_s=9)) is False
    assert bulk_due(SyncMode.single, RECORDS, view(pending_units=500, oldest_age_s=9)) is False


def test_bulk_mode_sends_when_full_or_lingered_however_small_the_backlog() -> None:
    small = {"backlog_events": 1, "pending_units": 1, "pending_items": 1}
    assert bulk_due(SyncMode.bulk, RECORDS, view(**small, oldest_age_s=RECORDS.linger_s)) is True
    assert bulk_due(SyncMode.bulk, RECORDS, view(**small, oldest_age_s=0.0)) is False
    assert bulk_due(SyncMode.bulk, RECORDS, view(pending_units=500, pending_items=500)) is True


def test_adaptive_bulk_waits_to_fill_while_serials_are_on_their_way() -> None:
    lingered = RECORDS.linger_s
    # Full: at once.
    assert bulk_due(SyncMode.adaptive, RECORDS, view(pending_units=500, pending_items=500)) is True
    # Lingered, and what is on its way would fill it: wait for it ...
    fillable = view(pending_units=100, pending_items=100, upstream_units=400, oldest_age_s=lingered)
    assert bulk_due(SyncMode.adaptive, RECORDS, fillable) is False
    # ... but never more than four lingers.
    assert bulk_due(SyncMode.adaptive, RECORDS, view(**{**_asdict(fillable), "oldest_age_s": 4 * lingered}))
    # Lingered and nothing would fill it: send.
    assert bulk_due(
        SyncMode.adaptive, RECORDS, view(pending_units=100, pending_items=100, oldest_age_s=lingered)
    )
    # Not lingered, not full: wait.
    assert not bulk_due(SyncMode.adaptive, RECORDS, view(pending_units=100, pending_items=100))


def test_adaptive_small_backlog_falls_back_to_bulk_after_four_lingers() -> None:
    small = {"backlog_events": 3, "pending_units": 3, "pending_items": 3}
    assert bulk_due(SyncMode.adaptive, EVENTS, view(**small, oldest_age_s=2 * EVENTS.linger_s)) is False
    assert bulk_due(SyncMode.adaptive, EVENTS, view(**small, oldest_age_s=4 * EVENTS.linger_s)) is True


def _asdict(v: LaneView) -> dict[str, float]:
    return {
        "pending_units": v.pending_units,
        "pending_items": v.pending_items,
        "urgent_items": v.urgent_items,
        "oldest_age_s": v.oldest_age_s,
        "backlog_events": v.backlog_events,
        "upstream_units": v.upstream_units,
        "bulk_wait_s": v.bulk_wait_s,
    }


def test_bulk_blocked_is_a_positive_wait() -> None:
    assert view(bulk_wait_s=0.001).bulk_blocked
    assert not view(bulk_wait_s=0.0).bulk_blocked


# --- how much one bulk request carries -------------------------------------------------------------------------


def test_bulk_take_stops_at_the_unit_limit() -> None:
    policy = LanePolicy(500, 10**9, 32, 1.0)
    assert bulk_take([(1, 10)] * 600, policy) == 500
    assert bulk_take([(250, 1), (250, 1), (1, 1)], policy) == 2
    assert bulk_take([(400, 1), (400, 1)], policy) == 1
    assert bulk_take([(1, 1)] * 7, policy) == 7
    assert bulk_take([], policy) == 0


def test_bulk_take_stops_at_the_byte_limit_counting_envelope_and_commas() -> None:
    policy = LanePolicy(1000, 1000, 32, 1.0, envelope_bytes=500)
    # 500 + 2 × (200 + 1) = 902 fits; a third item would make it 1103.
    assert bulk_take([(1, 200)] * 5, policy) == 2
    # Exactly at the limit fits: 500 + (499 + 1) = 1000.
    assert bulk_take([(1, 499), (1, 1)], policy) == 1
    assert bulk_take([(1, 498), (1, 0)], LanePolicy(1000, 1001, 32, 1.0, envelope_bytes=500)) == 2


def test_bulk_take_sends_an_oversized_item_alone() -> None:
    policy = LanePolicy(10, 1000, 32, 1.0)
    assert bulk_take([(50, 5000), (1, 1)], policy) == 1


@given(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 3000)), max_size=60))
def test_bulk_take_is_the_longest_prefix_within_both_limits(sizes: list[tuple[int, int]]) -> None:
    policy = LanePolicy(100, 20_000, 32, 1.0, envelope_bytes=256)

    def fits(prefix: list[tuple[int, int]]) -> bool:
        units = sum(u for u, _ in prefix)
        size = policy.envelope_bytes + sum(b + 1 for _, b in prefix)
        return units <= policy.bulk_max_units and size <= policy.bulk_max_bytes

    n = bulk_take(sizes, policy)
    if not sizes:
        assert n == 0
        return
    assert 1 <= n <= len(sizes)
    assert n == 1 or fits(sizes[:n])
    assert n == len(sizes) or not fits(sizes[: n + 1])


# --- which item a 4xx names --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pointer", "list_pointer", "index"),
    [
        # What the sandbox (and Klaviyo) answer for a bad item of each bulk endpoint.
        (f"{EVENTS_POINTER}/7/attributes/profile/data/attributes/external_id", EVENTS_POINTER, 7),
        (f"{EVENTS_POINTER}/0/attributes/events/data/3/attributes/unique_id", EVENTS_POINTER, 0),
        (f"{RECORDS_POINTER}/12/attributes/record", RECORDS_POINTER, 12),
        (f"{PROFILES_POINTER}/2/attributes", PROFILES_POINTER, 2),
        (f"{PROFILES_POINTER}/31", PROFILES_POINTER, 31),
        # The list itself (e.g. "too many items"), another list, nothing, junk: no item.
        (EVENTS_POINTER, EVENTS_POINTER, None),
        (f"{EVENTS_POINTER}/", EVENTS_POINTER, None),
        (f"{RECORDS_POINTER}/3/attributes/record", EVENTS_POINTER, None),
        ("/data", EVENTS_POINTER, None),
        ("/data/relationships/data-source", RECORDS_POINTER, None),
        (None, EVENTS_POINTER, None),
        ("", EVENTS_POINTER, None),
        (f"{PROFILES_POINTER}/x/attributes", PROFILES_POINTER, None),
        (f"{PROFILES_POINTER}x/3", PROFILES_POINTER, None),
    ],
)
def test_rejected_item_reads_the_pointer(pointer: str | None, list_pointer: str, index: int | None) -> None:
    assert rejected_item(pointer, list_pointer) == index


@given(st.integers(2, 5000))
def test_halves_partition_and_isolate_in_logarithmic_depth(n: int) -> None:
    first, second = halves(n)
    assert list(first) + list(second) == list(range(n))
    assert len(first) >= 1
    assert len(second) >= 1
    assert abs(len(first) - len(second)) <= 1
    # Splitting again and again isolates any one item after at most ceil(log2 n) rounds.
    depth, size = 0, n
    while size > 1:
        size = max(len(r) for r in halves(size))
        depth += 1
    assert depth == math.ceil(math.log2(n))


def test_is_urgent_at_the_age_boundary() -> None:
    assert is_urgent(oldest_received_ms=1000, now_ms=3000, urgent_age_ms=2000)
    assert not is_urgent(oldest_received_ms=1000, now_ms=3001, urgent_age_ms=2000)


def test_sync_mode_values_match_the_setting() -> None:
    assert [m.value for m in SyncMode] == ["adaptive", "single", "bulk"]
    assert SyncMode("bulk") is SyncMode.bulk


@pytest.mark.parametrize(
    ("mode", "backlog", "single", "bulk"),
    [
        # A lane with 10 items lingered past its linger, bulk slots free, nothing on its way.
        (SyncMode.single, 10, 10, False),
        (SyncMode.single, 10_000, 10, False),
        (SyncMode.bulk, 10, 0, True),
        (SyncMode.bulk, 10_000, 0, True),
        (SyncMode.adaptive, 10, 10, False),
        (SyncMode.adaptive, 10_000, 0, True),
    ],
)
def test_modes_side_by_side(mode: SyncMode, backlog: int, single: int, bulk: bool) -> None:
    v = view(backlog_events=backlog, pending_units=10, pending_items=10, oldest_age_s=EVENTS.linger_s)
    assert single_quota(mode, EVENTS, v) == single
    assert bulk_due(mode, EVENTS, v) is bulk
