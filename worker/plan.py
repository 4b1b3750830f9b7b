"""PURE: what one pass event writes to Klaviyo, given what was already applied for its serial.

:func:`plan` maps (applied state, event) to at most three writes and the state to store afterwards:

- the **metric event** (``POST /api/events``) — always, even for a stale event: metric
  ``Pass Created|Installed|Updated|Uninstalled|Deleted``, ``time`` = occurred_at, ``unique_id`` = event_id,
  the profile identified by ``external_id`` only (contact details travel only through profile writes);
  ``backfill: true`` (recorded, no flow triggered) for a historical event: one from an NDJSON backfill, or one
  that happened before the caller's ``old_before`` (see :func:`is_backfill`);
- the **profile upsert** (``POST /api/profile-import``) — external_id = serial, email, E.164 phone and the
  marketer-facing properties (custom fields + ``wallet_pass_*``) of the new state; left out when it would not
  change anything Klaviyo holds;
- the **WalletPass record** (``POST /api/data-source-record-create-jobs``) — the full record of the new state,
  keyed by serial (Klaviyo replaces the object record with the same id).

Ordering rules (DESIGN §2.4, "state never goes backwards"):

- an event not older than the applied state (``occurred_at >= updated_at``; on a tie, not older by arrival
  sequence either, which only a DLQ replay can make happen) is applied: the status follows
  :data:`worker.state.STATUS_OF`, fields come from the event (a field it does not carry keeps its value);
- ``deleted`` is terminal: a deleted pass stays deleted whatever comes later, and a ``deleted`` event applies
  even when it is stale;
- any other stale event sends its metric and changes no value the pass already has. It may only *fill in*
  what the state lacks — an earlier ``created_at``, a contact or custom field the pass has no value for — so a
  late backfill still lands its data. With events that carry the pass's fields (as every source sends them),
  any arrival order converges to the state of the sorted order.

A state with ``record_pending`` (its profile was written but its record write failed for good) gets its record
written by the next plan, whatever the event changes (even a redelivery or a stale event); the state the plan
stores has the flag cleared.

Nothing here does I/O; ``tests/sync/test_plan.py`` checks these rules with hypothesis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from passbridge.event import EventKind, PassEvent, Scalar
from worker.state import STATUS_OF, PassState, PassStatus

METRIC_NAMES: dict[EventKind, str] = {
    EventKind.created: "Pass Created",
    EventKind.installed: "Pass Installed",
    EventKind.updated: "Pass Updated",
    EventKind.uninstalled: "Pass Uninstalled",
    EventKind.deleted: "Pass Deleted",
}

#: Profile properties passbridge owns (custom fields of the same name are overridden by them).
PROFILE_STATUS = "wallet_pass_status"
PROFILE_PLATFORM = "wallet_pass_platform"
PROFILE_TYPE = "wallet_pass_type"
PROFILE_URL = "wallet_pass_url"
#: Where a contact identifier owned by another profile goes instead (see DESIGN §4, identity conflicts).
WITHHELD_PROPERTY: dict[Literal["email", "phone_number"], str] = {
    "email": "wallet_pass_email",
    "phone_number": "wallet_pass_phone_number",
}

Identifier = Literal["email", "phone_number"]


@dataclass(frozen=True, slots=True)
class Plan:
    """The Klaviyo writes for one event, and the serial's state once they are all accepted."""

    #: ``EventCreateQueryV2`` body for ``POST /api/events``; always sent.
    event: dict[str, Any]
    #: ``ProfileUpsertQuery`` body for ``POST /api/profile-import``, or ``None`` when nothing would change.
    profile: dict[str, Any] | None
    #: The WalletPass record (the raw JSON a data-source record carries), or ``None``.
    record: dict[str, Any] | None
    #: The state to store once the writes are accepted; ``None`` when it does not change.
    new_state: PassState | None
    #: The event is older than the applied state.
    stale: bool
    #: Why the event did (not) change the pass, for the serial's timeline.
    note: str


def plan(state: PassState | None, event: PassEvent, seq: int = 0, old_before: datetime | None = None) -> Plan:
    """The writes for ``event`` given the serial's applied ``state`` (``None``: nothing applied yet); ``seq``
    is the event's arrival sequence (0 = unknown); ``old_before``: see :func:`is_backfill`."""
    stale = is_stale(state, event, seq)
    new = next_state(state, event, seq)
    pending = state is not None and state.record_pending
    if state is not None and new == state:
        if stale:
            note = f"stale (older than {_iso(state.updated_at)}): metric only"
        else:
            note = "already applied: metric only"
        if not pending:
            return Plan(event_body(event, old_before), None, None, None, stale, note)
        # The profile holds this state already; only the record a failed write left out is written.
        new = new.model_copy(update={"record_pending": False})
        note = note.replace("metric only", "record written again (an earlier record write failed)")
        return Plan(event_body(event, old_before), None, record_of(new), new, stale, note)
    if pending:
        new = new.model_copy(update={"record_pending": False})
    profile = profile_body(new)
    record = record_of(new)
    if state is None:
        note = f"applied: {new.status.value}"
    elif stale:
        became_deleted = new.status is not state.status
        note = "stale deletion: deleted (terminal)" if became_deleted else "stale: filled in missing fields"
    else:
        note = f"applied: {new.status.value}"
    return Plan(
        event=event_body(event, old_before),
        profile=None if state is not None and profile == profile_body(state) else profile,
        record=None if state is not None and not pending and record == record_of(state) else record,
        new_state=new,
        stale=stale,
        note=note,
    )


@dataclass(frozen=True, slots=True)
class SerialPlan:
    """The net writes of several queued events of one serial (what a batch sends through bulk endpoints)."""

    #: One metric event body per event, in order (every event keeps its own metric event).
    events: list[dict[str, Any]]
    #: The final profile body, or ``None`` when the profile ends where it started.
    profile: dict[str, Any] | None
    #: The final WalletPass record, or ``None`` when it ends where it started.
    record: dict[str, Any] | None
    new_state: PassState | None
    notes: list[str]


def coalesce(
    state: PassState | None,
    events: list[PassEvent],
    seqs: Sequence[int] | None = None,
    old_before: datetime | None = None,
) -> SerialPlan:
    """Fold a serial's queued events (in order; ``seqs``: their arrival sequences) into their net writes: each
    metric event, and only the last profile and record state — the intermediate ones would be overwritten anyway
    (upserts keyed by serial). ``old_before``: see :func:`is_backfill`."""
    current = state
    bodies: list[dict[str, Any]] = []
    notes: list[str] = []
    for event, seq in zip(events, seqs if seqs is not None else [0] * len(events), strict=True):
        p = plan(current, event, seq, old_before)
        bodies.append(p.event)
        notes.append(p.note)
        if p.new_state is not None:
            current = p.new_state
    if current is None or current == state:
        return SerialPlan(bodies, None, None, None, notes)
    profile = profile_body(current)
    record = record_of(current)
    pending = state is not None and state.record_pending
    return SerialPlan(
        events=bodies,
        profile=None if state is not None and profile == profile_body(state) else profile,
        record=None if state is not None and not pending and record == record_of(state) else record,
        new_state=current,
        notes=notes,
    )


def is_stale(state: PassState | None, event: PassEvent, seq: int = 0) -> bool:
    """Whether ``event`` (arrival sequence ``seq``, 0 = unknown) is older than the applied ``state``.

    Equal times are ordered by arrival: the mailbox already applies them in arrival order, but a replayed
    event keeps its first arrival's place and may come back after a later arrival with the same time was
    applied.
    """
    if state is None:
        return False
    if event.occurred_at != state.updated_at:
        return event.occurred_at < state.updated_at
    return 0 < seq < state.seq


def next_state(state: PassState | None, event: PassEvent, seq: int = 0) -> PassState:
    """The pass's state after ``event`` (arrival sequence ``seq``; equal to ``state`` when the event changes
    nothing)."""
    if state is None:
        return PassState(
            serial_number=event.serial_number,
            pass_type=event.pass_type,
            platform=event.platform,
            status=STATUS_OF[event.kind],
            pass_url=event.pass_url,
            email=event.email,
            phone_number=event.phone_number,
            properties=dict(event.properties),
            created_at=event.occurred_at,
            updated_at=event.occurred_at,
            event_id=event.event_id,
            seq=seq,
        )
    if not is_stale(state, event, seq):
        # Newer (or a tie the event won by arrival): the event's fields win.
        deleted = state.status is PassStatus.deleted or event.kind is EventKind.deleted
        return state.model_copy(
            update={
                "pass_type": event.pass_type,
                "platform": event.platform,
                "status": PassStatus.deleted if deleted else STATUS_OF[event.kind],
                "pass_url": event.pass_url,
                "email": event.email if event.email is not None else state.email,
                "phone_number": event.phone_number if event.phone_number is not None else state.phone_number,
                "properties": {**state.properties, **event.properties},
                "created_at": min(state.created_at, event.occurred_at),
                "updated_at": event.occurred_at,
                "event_id": event.event_id,
                "seq": seq,
            }
        )
    # Stale: never change a value the pass has; a deletion still deletes, gaps are filled in.
    return state.model_copy(
        update={
            "status": PassStatus.deleted if event.kind is EventKind.deleted else state.status,
            "email": state.email if state.email is not None else event.email,
            "phone_number": state.phone_number if state.phone_number is not None else event.phone_number,
            "properties": {**event.properties, **state.properties},
            "created_at": min(state.created_at, event.occurred_at),
        }
    )


def is_backfill(event: PassEvent, old_before: datetime | None) -> bool:
    """Whether ``event``'s metric event goes to Klaviyo with ``backfill: true`` (recorded, but it triggers no
    flow): it came from an NDJSON backfill, or it happened before ``old_before`` (``None``: no age rule) — a
    merchant's flows are for what happens now, not for history passbridge delivers late."""
    return event.source == "ndjson" or (old_before is not None and event.occurred_at < old_before)


def backfill_cutoff(max_age_s: float, now: datetime) -> datetime | None:
    """The ``old_before`` of :func:`is_backfill` for events older than ``max_age_s`` at ``now`` (0: none)."""
    return now - timedelta(seconds=max_age_s) if max_age_s > 0 else None


def _event_attributes(event: PassEvent, old_before: datetime | None) -> dict[str, Any]:
    properties: dict[str, Scalar] = {
        **event.properties,
        "serial_number": event.serial_number,
        "pass_type": event.pass_type,
        "platform": event.platform.value,
        "pass_url": event.pass_url,
    }
    attributes: dict[str, Any] = {
        "properties": properties,
        "time": _iso(event.occurred_at),
        "unique_id": event.event_id,
        "metric": {"data": {"type": "metric", "attributes": {"name": METRIC_NAMES[event.kind]}}},
    }
    if is_backfill(event, old_before):
        attributes["backfill"] = True
    return attributes


def event_body(event: PassEvent, old_before: datetime | None = None) -> dict[str, Any]:
    """``POST /api/events`` body: the metric event, its profile identified by ``external_id`` only;
    ``old_before``: see :func:`is_backfill`."""
    attributes = _event_attributes(event, old_before)
    attributes["profile"] = {"data": {"type": "profile", "attributes": {"external_id": event.serial_number}}}
    return {"data": {"type": "event", "attributes": attributes}}


def bulk_events_entry(
    serial: str, events: list[PassEvent], old_before: datetime | None = None
) -> dict[str, Any]:
    """One profile's entry of an ``event-bulk-create-jobs`` body: the serial's metric events, in order, each
    the same event :func:`event_body` sends alone (profile by ``external_id`` only; ``backfill`` per event)."""
    return {
        "type": "event-bulk-create",
        "attributes": {
            "profile": {"data": {"type": "profile", "attributes": {"external_id": serial}}},
            "events": {
                "data": [{"type": "event", "attributes": _event_attributes(e, old_before)} for e in events]
            },
        },
    }


def profile_body(state: PassState) -> dict[str, Any]:
    """``POST /api/profile-import`` body for the pass's profile (identifiers another profile owns withheld)."""
    attributes: dict[str, Any] = {"external_id": state.serial_number}
    properties: dict[str, Scalar] = dict(state.properties)
    for field in ("email", "phone_number"):
        value = state.email if field == "email" else state.phone_number
        if value is None:
            continue
        if state.withheld.get(field) == value:
            properties[WITHHELD_PROPERTY[field]] = value
        else:
            attributes[field] = value
    properties.update(
        {
            PROFILE_STATUS: state.status.value,
            PROFILE_PLATFORM: state.platform.value,
            PROFILE_TYPE: state.pass_type,
            PROFILE_URL: state.pass_url,
        }
    )
    attributes["properties"] = properties
    return {"data": {"type": "profile", "attributes": attributes}}


def record_of(state: PassState) -> dict[str, Any]:
    """The WalletPass record: the fields of the object schema, keyed by ``serial_number``."""
    return {
        "serial_number": state.serial_number,
        "pass_url": state.pass_url,
        "pass_type": state.pass_type,
        "platform": state.platform.value,
        "status": state.status.value,
        "created_at": _iso(state.created_at),
        "updated_at": _iso(state.updated_at),
    }


def record_job_body(record: dict[str, Any], data_source_id: str) -> dict[str, Any]:
    """``POST /api/data-source-record-create-jobs`` body: one record into the account's data source."""
    return {
        "data": {
            "type": "data-source-record-create-job",
            "attributes": {
                "data-source-record": {
                    "data": {"type": "data-source-record", "attributes": {"record": record}}
                }
            },
            "relationships": {"data-source": {"data": {"type": "data-source", "id": data_source_id}}},
        }
    }


def withhold(state: PassState, field: Identifier) -> PassState:
    """``state`` with its current ``field`` value marked as owned by another profile (written as a property)."""
    value = state.email if field == "email" else state.phone_number
    if value is None:
        return state
    return state.model_copy(update={"withheld": {**state.withheld, field: value}})


def contact_identifiers(state: PassState) -> list[Identifier]:
    """The contact identifiers the profile write for ``state`` would carry (not already withheld)."""
    out: list[Identifier] = []
    if state.email is not None and state.withheld.get("email") != state.email:
        out.append("email")
    if state.phone_number is not None and state.withheld.get("phone_number") != state.phone_number:
        out.append("phone_number")
    return out


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")
