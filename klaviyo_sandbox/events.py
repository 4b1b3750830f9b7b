"""Metric events: field rules, dedup on (profile, metric, unique_id) — or the event's second when there is
no unique_id — and Klaviyo's read-back shape.

Duplicates are accepted (202) and dropped silently, as Klaviyo does; a bulk request that repeats a
``unique_id`` for the same profile and metric fails as a whole (../shared/notes/klaviyo-api.md §4).
"""

from __future__ import annotations

import time as _time
from datetime import datetime
from typing import Any

from klaviyo_sandbox import ids
from klaviyo_sandbox.errors import invalid
from klaviyo_sandbox.profiles import check_contacts, resolve_for_event
from klaviyo_sandbox.store import AccountState, Event, Metric

MIN_TIME = datetime(1990, 1, 1).timestamp()
MAX_PROPERTIES = 400
MAX_METRIC_NAME = 127
YEAR_S = 366 * 86400


def parse_time(value: str | None, pointer: str, now: float) -> int:
    """Epoch seconds (truncated) for an event ``time``; default now; after 1990 and ≤ 1 year ahead."""
    if value is None:
        return int(now)
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00")).timestamp()
    except ValueError:
        raise invalid("Datetime has wrong format.", pointer=pointer) from None
    if ts < MIN_TIME:
        raise invalid("Event time must be after 1990-01-01.", pointer=pointer)
    if ts > now + YEAR_S:
        raise invalid("Event time cannot be more than one year in the future.", pointer=pointer)
    return int(ts)


def check_event(attrs: dict[str, Any], profile: dict[str, Any] | None, pointer: str, now: float) -> int:
    """Field rules beyond the schema; returns the event's second."""
    properties = attrs.get("properties") or {}
    if len(properties) > MAX_PROPERTIES:
        raise invalid(
            f"Events may have at most {MAX_PROPERTIES} properties.", pointer=f"{pointer}/properties"
        )
    name = attrs["metric"]["data"]["attributes"]["name"]
    if not name or len(name) > MAX_METRIC_NAME:
        raise invalid(
            "Metric name must be between 1 and 127 characters.",
            pointer=f"{pointer}/metric/data/attributes/name",
        )
    if profile is not None:
        check_profile(profile, f"{pointer}/profile/data")
    return parse_time(attrs.get("time"), f"{pointer}/time", now)


def check_profile(profile: dict[str, Any], pointer: str) -> None:
    """An event's profile needs an identifier, and well-formed contacts."""
    attrs = profile.get("attributes") or {}
    check_contacts(attrs, f"{pointer}/attributes")
    if not profile.get("id") and not any(
        attrs.get(k) for k in ("email", "phone_number", "external_id", "anonymous_id", "_kx")
    ):
        raise invalid(
            "Profile must have at least one identifier (id, email, phone_number, external_id, anonymous_id).",
            pointer=f"{pointer}/attributes",
        )


def metric_for(state: AccountState, name: str, now: float) -> Metric:
    """The metric with that name, created on first use."""
    mid = state.metric_by_name.get(name)
    if mid is not None:
        return state.metrics[mid]
    metric = Metric(id=ids.short_id(6), name=name, created=now)
    state.metrics[metric.id] = metric
    state.metric_by_name[name] = metric.id
    return metric


def dedup_key(profile_id: str, metric_id: str, unique_id: str | None, ts: int) -> tuple[str, str, str]:
    """What makes two events the same event."""
    return (profile_id, metric_id, unique_id if unique_id is not None else f"@{ts}")


def record(
    state: AccountState, profile_data: dict[str, Any], attrs: dict[str, Any], ts: int, now: float
) -> Event | None:
    """Store one validated event; None when it duplicates one already stored."""
    profile = resolve_for_event(state, profile_data, now)
    metric = metric_for(state, attrs["metric"]["data"]["attributes"]["name"], now)
    unique_id = attrs.get("unique_id")
    key = dedup_key(profile.id, metric.id, unique_id, ts)
    if key in state.event_keys:
        state.duplicate_events += 1
        return None
    state.event_keys.add(key)
    props = dict(attrs.get("properties") or {})
    props["$event_id"] = unique_id if unique_id is not None else str(ts)
    if attrs.get("value") is not None:
        props["$value"] = attrs["value"]
    if attrs.get("value_currency") is not None:
        props["$value_currency"] = attrs["value_currency"]
    event = Event(
        id=ids.short_id(11),
        profile_id=profile.id,
        metric_id=metric.id,
        timestamp=ts,
        received=now,
        seq=state.next_seq(),
        uuid="",
        properties=props,
        unique_id=unique_id,
        value=attrs.get("value"),
        value_currency=attrs.get("value_currency"),
        backfill=bool(attrs.get("backfill")),
    )
    state.events[event.id] = event
    state.events_by_profile.setdefault(profile.id, []).append(event)
    if profile.last_event is None or ts > profile.last_event:
        profile.last_event = float(ts)
    return event


def time_order(events: list[Event], descending: bool = False) -> list[Event]:
    """Klaviyo's order: by event time (second), ties by event id."""
    return sorted(events, key=lambda e: (e.timestamp, e.id), reverse=descending)


def resource(event: Event, base_url: str) -> dict[str, Any]:
    """The JSON:API resource for a stored event."""
    self_link = f"{base_url}/api/events/{event.id}/"
    return {
        "type": "event",
        "id": event.id,
        "attributes": {
            "timestamp": event.timestamp,
            "event_properties": dict(event.properties),
            "datetime": ids.iso_seconds(event.timestamp),
            "uuid": event.uuid or _uuid(event),
        },
        "relationships": {
            "profile": {
                "data": {"type": "profile", "id": event.profile_id},
                "links": {"self": f"{self_link}relationships/profile/", "related": f"{self_link}profile/"},
            },
            "metric": {
                "data": {"type": "metric", "id": event.metric_id},
                "links": {"self": f"{self_link}relationships/metric/", "related": f"{self_link}metric/"},
            },
        },
        "links": {"self": self_link},
    }


def _uuid(event: Event) -> str:
    # Made on first read: a time-based UUID costs more than the rest of storing an event.
    event.uuid = ids.time_uuid(event.received, hash(event.id) & 0xFFFFFFFFFFFFFFFF)
    return event.uuid


def metric_resource(metric: Metric, base_url: str) -> dict[str, Any]:
    """The JSON:API resource for a metric."""
    return {
        "type": "metric",
        "id": metric.id,
        "attributes": {
            "name": metric.name,
            "created": ids.iso(metric.created),
            "updated": ids.iso(metric.created),
            "integration": {
                "object": "integration",
                "id": "0rG4eQ",
                "key": "api",
                "name": "API",
                "category": "API",
            },
        },
        "links": {"self": f"{base_url}/api/metrics/{metric.id}/"},
    }


def now() -> float:
    """Wall-clock seconds (events and profiles carry wall-clock times)."""
    return _time.time()
