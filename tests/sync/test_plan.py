"""plan() exhaustively, without servers: the writes per event, ordering rules, convergence, spec conformance."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from passbridge.event import EventKind, PassEvent, Platform
from tests.sync.spec import load_spec, shared_dir
from worker.plan import (
    METRIC_NAMES,
    PROFILE_PLATFORM,
    PROFILE_STATUS,
    PROFILE_TYPE,
    PROFILE_URL,
    coalesce,
    next_state,
    plan,
    profile_body,
    record_job_body,
    record_of,
    withhold,
)
from worker.state import STATUS_OF, PassState, PassStatus

T0 = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)
SERIAL = "838b8cf60dac2bfad9"
EMAILS = ["ada@example.com", "grace@example.org"]
PHONES = ["+14155550123", "+442071838750"]
KEYS = ["points", "tier", "store", "opt_in"]

scalars = st.one_of(
    st.integers(-(10**6), 10**6),
    st.text(max_size=12),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
)


def make_event(
    i: int,
    kind: EventKind,
    seconds: int,
    *,
    email: str | None = None,
    phone: str | None = None,
    props: dict[str, Any] | None = None,
    platform: Platform = Platform.apple,
    pass_type: str = "ptk_0x216",
    url_version: int = 0,
) -> PassEvent:
    when = T0 + timedelta(seconds=seconds)
    return PassEvent(
        event_id=f"evt-{i}",
        account_id="acme",
        kind=kind,
        serial_number=SERIAL,
        pass_type=pass_type,
        platform=platform,
        occurred_at=when,
        received_at=when,
        source="api",
        email=email,
        phone_number=phone,
        pass_url=f"https://passninja.com/p/{SERIAL}?v={url_version}",
        properties=props or {},
    )


@st.composite
def event_lists(draw: st.DrawFn, *, distinct_times: bool = False, snapshots: bool = False) -> list[PassEvent]:
    """Events of one serial. ``snapshots``: same property keys in every event, one email and one phone value."""
    n = draw(st.integers(1, 8))
    if distinct_times:
        times = draw(st.lists(st.integers(0, 10_000), min_size=n, max_size=n, unique=True))
    else:
        times = draw(st.lists(st.integers(0, 20), min_size=n, max_size=n))
    keys = draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=4)) if snapshots else []
    email = draw(st.sampled_from(EMAILS))
    phone = draw(st.sampled_from(PHONES))
    events = []
    for i, t in enumerate(times):
        if snapshots:
            props = {k: draw(scalars) for k in keys}
            e = email if draw(st.booleans()) else None
            p = phone if draw(st.booleans()) else None
        else:
            props = draw(st.dictionaries(st.sampled_from(KEYS), scalars, max_size=4))
            e = draw(st.sampled_from([None, *EMAILS]))
            p = draw(st.sampled_from([None, *PHONES]))
        events.append(
            make_event(
                i,
                draw(st.sampled_from(list(EventKind))),
                t,
                email=e,
                phone=p,
                props=props,
                platform=draw(st.sampled_from(list(Platform))),
                pass_type=draw(st.sampled_from(["ptk_0x216", "ptk_gold"])),
                url_version=draw(st.integers(0, 2)),
            )
        )
    return events


def fold(events: list[PassEvent]) -> PassState | None:
    state: PassState | None = None
    for e in events:
        p = plan(state, e)
        if p.new_state is not None:
            state = p.new_state
    return state


# --- one event ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(EventKind))
def test_first_event_writes_all_three(kind: EventKind) -> None:
    e = make_event(
        1, kind, 0, email="ada@example.com", phone="+14155550123", props={"points": 120, "tier": "gold"}
    )
    p = plan(None, e)
    assert not p.stale
    assert p.new_state is not None
    assert p.new_state.status is STATUS_OF[kind]
    assert p.event == {
        "data": {
            "type": "event",
            "attributes": {
                "properties": {
                    "points": 120,
                    "tier": "gold",
                    "serial_number": SERIAL,
                    "pass_type": "ptk_0x216",
                    "platform": "apple",
                    "pass_url": e.pass_url,
                },
                "time": "2026-11-25T10:00:00Z",
                "unique_id": "evt-1",
                "metric": {"data": {"type": "metric", "attributes": {"name": METRIC_NAMES[kind]}}},
                "profile": {"data": {"type": "profile", "attributes": {"external_id": SERIAL}}},
            },
        }
    }
    assert p.profile == {
        "data": {
            "type": "profile",
            "attributes": {
                "external_id": SERIAL,
                "email": "ada@example.com",
                "phone_number": "+14155550123",
                "properties": {
                    "points": 120,
                    "tier": "gold",
                    PROFILE_STATUS: STATUS_OF[kind].value,
                    PROFILE_PLATFORM: "apple",
                    PROFILE_TYPE: "ptk_0x216",
                    PROFILE_URL: e.pass_url,
                },
            },
        }
    }
    assert p.record == {
        "serial_number": SERIAL,
        "pass_url": e.pass_url,
        "pass_type": "ptk_0x216",
        "platform": "apple",
        "status": STATUS_OF[kind].value,
        "created_at": "2026-11-25T10:00:00Z",
        "updated_at": "2026-11-25T10:00:00Z",
    }


def test_metric_names() -> None:
    assert [METRIC_NAMES[k] for k in EventKind] == [
        "Pass Created",
        "Pass Installed",
        "Pass Updated",
        "Pass Uninstalled",
        "Pass Deleted",
    ]


def test_custom_fields_never_override_passbridge_fields() -> None:
    e = make_event(
        1, EventKind.created, 0, props={"serial_number": "spoof", PROFILE_STATUS: "spoof", "platform": "x"}
    )
    p = plan(None, e)
    assert p.event["data"]["attributes"]["properties"]["serial_number"] == SERIAL
    assert p.event["data"]["attributes"]["properties"]["platform"] == "apple"
    assert p.profile is not None
    assert p.profile["data"]["attributes"]["properties"][PROFILE_STATUS] == "active"


def test_lifecycle_in_order() -> None:
    kinds = [
        EventKind.created,
        EventKind.installed,
        EventKind.updated,
        EventKind.uninstalled,
        EventKind.deleted,
    ]
    state = None
    statuses = []
    for i, kind in enumerate(kinds):
        p = plan(state, make_event(i, kind, i * 60, email="ada@example.com"))
        assert not p.stale
        assert p.new_state is not None
        assert p.record is not None
        state = p.new_state
        statuses.append(state.status.value)
    assert statuses == ["active", "active", "active", "uninstalled", "deleted"]
    assert state is not None
    assert state.created_at == T0
    assert state.updated_at == T0 + timedelta(minutes=4)


def test_installed_after_created_skips_the_unchanged_profile() -> None:
    created = plan(None, make_event(1, EventKind.created, 0, email="ada@example.com"))
    installed = plan(created.new_state, make_event(2, EventKind.installed, 10, email="ada@example.com"))
    assert installed.profile is None  # status stays active, same fields: nothing to tell Klaviyo
    assert installed.record is not None
    assert installed.record["updated_at"] == "2026-11-25T10:00:10Z"


def test_stale_event_is_metric_only() -> None:
    s1 = plan(None, make_event(1, EventKind.uninstalled, 100, email="ada@example.com")).new_state
    p = plan(s1, make_event(2, EventKind.installed, 50, email="grace@example.org", props={"points": 5}))
    assert p.stale
    # points was unknown: filled in; the email is not overwritten, the status not regressed.
    assert p.new_state is not None
    assert p.new_state.status is PassStatus.uninstalled
    assert p.new_state.email == "ada@example.com"
    assert p.new_state.properties == {"points": 5}
    assert p.new_state.created_at == T0 + timedelta(seconds=50)
    assert p.new_state.updated_at == T0 + timedelta(seconds=100)
    same = plan(
        p.new_state, make_event(3, EventKind.installed, 60, email="grace@example.org", props={"points": 7})
    )
    assert same.stale
    assert same.profile is None
    assert same.record is None
    assert same.new_state is None
    assert same.event["data"]["attributes"]["time"] == "2026-11-25T10:01:00Z"


def test_stale_deletion_still_deletes_and_deleted_is_terminal() -> None:
    s1 = plan(None, make_event(1, EventKind.installed, 100)).new_state
    p = plan(s1, make_event(2, EventKind.deleted, 50))
    assert p.stale
    assert p.new_state is not None
    assert p.new_state.status is PassStatus.deleted
    assert p.record is not None
    assert p.record["status"] == "deleted"
    later = plan(p.new_state, make_event(3, EventKind.installed, 200))
    assert later.new_state is not None
    assert later.new_state.status is PassStatus.deleted


def test_redelivered_event_is_metric_only_on_the_state_it_produced() -> None:
    e = make_event(1, EventKind.installed, 0, email="ada@example.com")
    s1 = plan(None, e).new_state
    again = plan(s1, e)
    assert not again.stale
    assert again.new_state is None
    assert again.profile is None
    assert again.record is None
    assert again.event == plan(None, e).event


def test_equal_times_are_ordered_by_arrival() -> None:
    """A replayed event keeps its first arrival's sequence: against a state applied from a later arrival with
    the same ``occurred_at`` it is stale, not newer; a later arrival with the same time still wins."""
    uninstalled = plan(None, make_event(2, EventKind.uninstalled, 0), seq=20).new_state
    assert uninstalled is not None
    assert uninstalled.seq == 20
    assert PassState.from_json(uninstalled.to_json()) == uninstalled
    replayed = plan(uninstalled, make_event(1, EventKind.installed, 0), seq=10)
    assert replayed.stale
    assert replayed.new_state is None
    assert (replayed.profile, replayed.record) == (None, None)
    later = plan(uninstalled, make_event(3, EventKind.installed, 0), seq=30)
    assert not later.stale
    assert later.new_state is not None
    assert (later.new_state.status, later.new_state.seq) == (PassStatus.active, 30)
    # Unknown sequences (a state stored before they were kept, or none given) keep the old rule: a tie applies.
    assert not plan(
        uninstalled.model_copy(update={"seq": 0}), make_event(1, EventKind.installed, 0), 10
    ).stale
    assert not plan(uninstalled, make_event(1, EventKind.installed, 0)).stale
    # coalesce folds with the same rule.
    assert coalesce(uninstalled, [make_event(1, EventKind.installed, 0)], [10]).new_state is None


def test_withheld_identifier_becomes_a_property() -> None:
    s = plan(
        None, make_event(1, EventKind.created, 0, email="ada@example.com", phone="+14155550123")
    ).new_state
    assert s is not None
    w = withhold(s, "email")
    body = profile_body(w)["data"]["attributes"]
    assert "email" not in body
    assert body["phone_number"] == "+14155550123"
    assert body["properties"]["wallet_pass_email"] == "ada@example.com"
    # The same email on the next event stays withheld; a different one is tried again.
    p = plan(w, make_event(2, EventKind.updated, 5, email="ada@example.com"))
    assert p.new_state is not None
    assert p.new_state.withheld == {"email": "ada@example.com"}
    assert p.profile is None  # nothing changed in what the profile would get
    q = plan(w, make_event(3, EventKind.updated, 5, email="grace@example.org"))
    assert q.profile is not None
    assert q.profile["data"]["attributes"]["email"] == "grace@example.org"


def test_state_json_round_trip() -> None:
    s = plan(
        None, make_event(1, EventKind.created, 0, email="ada@example.com", props={"p": 1.5, "q": None})
    ).new_state
    assert s is not None
    s = withhold(s, "email")
    assert PassState.from_json(s.to_json()) == s
    assert b"ada@example.com" in s.to_json()


def test_a_pending_record_is_written_by_the_next_plan_whatever_the_event() -> None:
    """A deletion's profile was written but its record write failed for good: the state stored with the dead
    letter has ``record_pending``. The next event is planned from it (the pass stays deleted) and writes the
    record even when nothing else changes: a redelivery (replay) of the deletion, or a stale event."""
    created = plan(None, make_event(1, EventKind.created, 0)).new_state
    assert created is not None
    deletion = make_event(2, EventKind.deleted, 10)
    deleted = plan(created, deletion).new_state
    assert deleted is not None
    pending = deleted.model_copy(update={"record_pending": True})
    assert PassState.from_json(pending.to_json()) == pending
    # A state stored before the flag existed (or without it) reads as not pending; False is not stored.
    assert b"record_pending" not in deleted.to_json()
    assert PassState.from_json(deleted.to_json()).record_pending is False
    for event, stale in ((deletion, False), (make_event(3, EventKind.updated, 5), True)):
        p = plan(pending, event)
        assert p.stale is stale
        assert p.profile is None  # the profile holds the deleted state already
        assert p.record == record_of(deleted)
        assert p.record["status"] == "deleted"
        assert p.new_state == deleted
        assert "record written again" in p.note
        # Without the flag the same events change nothing.
        assert plan(deleted, event).new_state is None
    # A newer event writes the profile as usual and the record even when it would not change.
    later = plan(pending, make_event(4, EventKind.updated, 20, props={"points": 5}))
    assert later.new_state is not None
    assert (later.new_state.status, later.new_state.record_pending) == (PassStatus.deleted, False)
    assert later.profile == profile_body(later.new_state)
    assert later.record == record_of(later.new_state)
    # coalesce folds with the same rule.
    net = coalesce(pending, [make_event(3, EventKind.updated, 5)])
    assert (net.profile, net.record, net.new_state) == (None, record_of(deleted), deleted)


# --- properties over any sequence ----------------------------------------------------------------------------


@pytest.mark.slow
@settings(max_examples=250, deadline=None)
@given(event_lists())
def test_rules_hold_for_any_order(events: list[PassEvent]) -> None:
    state: PassState | None = None
    for e in events:
        p = plan(state, e)
        attrs = p.event["data"]["attributes"]
        assert attrs["unique_id"] == e.event_id
        assert attrs["metric"]["data"]["attributes"]["name"] == METRIC_NAMES[e.kind]
        assert attrs["profile"] == {"data": {"type": "profile", "attributes": {"external_id": SERIAL}}}
        assert datetime.fromisoformat(attrs["time"].replace("Z", "+00:00")) == e.occurred_at
        assert p.stale == (state is not None and e.occurred_at < state.updated_at)
        new = p.new_state
        if new is None:
            assert p.profile is None
            assert p.record is None
            continue
        assert new != state
        assert PassState.from_json(new.to_json()) == new
        if state is not None:
            # Never backwards: the guard only grows, deleted stays deleted.
            assert new.updated_at >= state.updated_at
            assert new.created_at <= state.created_at
            if state.status is PassStatus.deleted:
                assert new.status is PassStatus.deleted
            if p.stale:
                assert new.updated_at == state.updated_at
                assert new.event_id == state.event_id
                assert new.status in (state.status, PassStatus.deleted)
                assert new.status is state.status or e.kind is EventKind.deleted
                for f in ("email", "phone_number", "pass_type", "platform", "pass_url"):
                    if getattr(state, f) is not None:
                        assert getattr(new, f) == getattr(state, f)
                assert all(new.properties[k] == v for k, v in state.properties.items())
            assert (p.profile is None) == (profile_body(new) == profile_body(state))
            assert (p.record is None) == (record_of(new) == record_of(state))
        else:
            assert p.profile is not None
            assert p.record is not None
        if p.profile is not None:
            assert p.profile == profile_body(new)
        if p.record is not None:
            assert p.record == record_of(new)
        state = new
    assert state is not None
    assert state.status is PassStatus.deleted or not any(e.kind is EventKind.deleted for e in events), (
        "a deletion anywhere deletes the pass"
    )


@pytest.mark.slow
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event_lists(distinct_times=True, snapshots=True), st.randoms(use_true_random=False))
def test_any_arrival_order_converges_to_the_sorted_state(events: list[PassEvent], rnd: Any) -> None:
    ordered = sorted(events, key=lambda e: e.occurred_at)
    shuffled = list(events)
    rnd.shuffle(shuffled)
    a, b = fold(ordered), fold(shuffled)
    assert a is not None
    assert b is not None
    assert record_of(a) == record_of(b)
    assert profile_body(a) == profile_body(b)
    newest = ordered[-1]
    deleted = any(e.kind is EventKind.deleted for e in events)
    assert a.status is (PassStatus.deleted if deleted else STATUS_OF[newest.kind])
    assert a.updated_at == newest.occurred_at
    assert a.created_at == ordered[0].occurred_at


@pytest.mark.slow
@settings(max_examples=100, deadline=None)
@given(event_lists())
def test_every_body_conforms_to_klaviyos_spec(events: list[PassEvent]) -> None:
    if shared_dir() is None:
        pytest.skip("../shared/klaviyo (Klaviyo's official OpenAPI spec) is absent: spec checks skipped")
    spec = load_spec()
    state: PassState | None = None
    for e in events:
        p = plan(state, e)
        assert spec.errors("EventCreateQueryV2", p.event) == []
        if p.profile is not None:
            assert spec.errors("ProfileUpsertQuery", p.profile) == []
        if p.record is not None:
            assert (
                spec.errors(
                    "DataSourceRecordCreateJobCreateQuery",
                    record_job_body(p.record, "01J7C23V8XWMRG13FMD7VZN6GW"),
                )
                == []
            )
        state = p.new_state or state


def test_spec_validator_rejects_a_bad_body() -> None:
    """The check above can fail: a body Klaviyo would refuse is reported."""
    if shared_dir() is None:
        pytest.skip("../shared/klaviyo (Klaviyo's official OpenAPI spec) is absent: spec checks skipped")
    spec = load_spec()
    body = plan(None, make_event(1, EventKind.created, 0)).event
    body["data"]["attributes"]["time"] = "yesterday"
    del body["data"]["attributes"]["metric"]
    errors = spec.errors("EventCreateQueryV2", body)
    assert any("metric" in e for e in errors)
    assert any("yesterday" in e for e in errors)


def test_next_state_of_nothing_is_the_event() -> None:
    e = make_event(1, EventKind.uninstalled, 0, email="ada@example.com")
    s = next_state(None, e)
    assert (s.status, s.email, s.created_at, s.updated_at, s.event_id) == (
        PassStatus.uninstalled,
        "ada@example.com",
        T0,
        T0,
        "evt-1",
    )


@settings(max_examples=150, deadline=None)
@given(event_lists())
def test_coalesce_is_the_net_of_planning_one_by_one(events: list[PassEvent]) -> None:
    """A batch of a serial's events nets to the same final writes as planning them one at a time."""
    for split in range(len(events) + 1):
        head, tail = events[:split], events[split:]
        start = fold(head)
        net = coalesce(start, tail)
        assert net.events == [plan(None, e).event for e in tail]
        assert len(net.notes) == len(tail)
        end = fold(events)
        if net.new_state is None:
            assert end == start or not tail
            assert net.profile is None
            assert net.record is None
            continue
        assert net.new_state == end
        assert (net.profile is None) == (start is not None and profile_body(start) == profile_body(end))
        assert (net.record is None) == (start is not None and record_of(start) == record_of(end))


@settings(max_examples=150, deadline=None)
@given(event_lists(), st.data())
def test_a_pending_record_is_rewritten_and_nothing_else_differs(events: list[PassEvent], data: Any) -> None:
    """From any state whose record is pending, planning (or coalescing) any events writes the same profile,
    metric events and final state as from the same state with its record written, plus the final record;
    the state to store never keeps the flag."""
    split = data.draw(st.integers(0, len(events) - 1))
    start = fold(events[: split + 1])
    assert start is not None
    pending = start.model_copy(update={"record_pending": True})
    tail = events[split + 1 :]
    for e in tail or events[:1]:
        p, q = plan(start, e), plan(pending, e)
        assert (q.event, q.stale, q.profile) == (p.event, p.stale, p.profile)
        assert q.new_state == (p.new_state or start)
        assert q.new_state is not None
        assert not q.new_state.record_pending
        assert q.record == record_of(q.new_state)
    if tail:
        net, net_pending = coalesce(start, tail), coalesce(pending, tail)
        assert (net_pending.events, net_pending.profile) == (net.events, net.profile)
        assert net_pending.new_state == (net.new_state or start)
        assert net_pending.new_state is not None
        assert not net_pending.new_state.record_pending
        assert net_pending.record == record_of(net_pending.new_state)
