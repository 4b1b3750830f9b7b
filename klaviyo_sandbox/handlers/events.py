"""Event and metric endpoints: create (202, dedup), bulk create (≤ 1,000, all-or-nothing on repeated keys),
list/get events in Klaviyo's time order, list/get metrics."""

from __future__ import annotations

import functools
from typing import Any

from klaviyo_sandbox import events as rules
from klaviyo_sandbox import paging
from klaviyo_sandbox.errors import invalid, not_found
from klaviyo_sandbox.filters import matches
from klaviyo_sandbox.handlers.common import Call, Reply, data, document, refuse_rejected
from klaviyo_sandbox.store import Event

MAX_BULK_EVENTS = 1000


def create_event(call: Call) -> Reply:
    """``POST /api/events``: 202 with an empty body; a duplicate is accepted and dropped."""
    attrs = data(call)["attributes"]
    profile = attrs["profile"]["data"]
    ts = rules.check_event(attrs, profile, "/data/attributes", call.now)
    refuse_rejected(
        call,
        (profile.get("attributes") or {}).get("external_id"),
        "/data/attributes/profile/data/attributes/external_id",
    )
    rules.record(call.state, profile, attrs, ts, call.now)
    return Reply(202)


def _identity(call: Call, profile: dict[str, Any]) -> str:
    """Who an entry's profile is, for the in-request duplicate rule: the existing profile it resolves to, or
    its first identifier."""
    attrs = profile.get("attributes") or {}
    if profile.get("id"):
        return f"id:{profile['id']}"
    for key in ("external_id", "email", "phone_number", "anonymous_id"):
        value = attrs.get(key)
        if value is not None:
            pid = call.state.index[key].get(value)
            return f"id:{pid}" if pid else f"{key}:{value}"
    return f"_kx:{attrs.get('_kx')}"


def check_bulk_events(call: Call) -> list[tuple[dict[str, Any], dict[str, Any], int]]:
    """What ``bulk_create_events`` checks before it stores anything (raises its 400s); returns the events to
    record. It reads the account's profiles and never writes: the sandbox runs it off the event loop."""
    entries = data(call)["attributes"]["events-bulk-create"]["data"]
    total = sum(len(e["attributes"]["events"]["data"]) for e in entries)
    if total > MAX_BULK_EVENTS:
        raise invalid(
            f"A bulk request may hold at most {MAX_BULK_EVENTS} events ({total} given).",
            pointer="/data/attributes/events-bulk-create/data",
        )
    seen: set[tuple[str, str, str]] = set()
    checked: list[tuple[dict[str, Any], dict[str, Any], int]] = []
    for i, entry in enumerate(entries):
        base = f"/data/attributes/events-bulk-create/data/{i}/attributes"
        profile = entry["attributes"]["profile"]["data"]
        rules.check_profile(profile, f"{base}/profile/data")
        refuse_rejected(
            call,
            (profile.get("attributes") or {}).get("external_id"),
            f"{base}/profile/data/attributes/external_id",
        )
        who = _identity(call, profile)
        for j, event in enumerate(entry["attributes"]["events"]["data"]):
            attrs = event["attributes"]
            ts = rules.check_event(attrs, None, f"{base}/events/data/{j}/attributes", call.now)
            unique_id = attrs.get("unique_id")
            if unique_id is not None:
                key = (who, attrs["metric"]["data"]["attributes"]["name"], unique_id)
                if key in seen:
                    raise invalid(
                        f"unique_id '{unique_id}' is repeated for the same profile and metric; "
                        "no events were processed.",
                        pointer=f"{base}/events/data/{j}/attributes/unique_id",
                    )
                seen.add(key)
            checked.append((profile, attrs, ts))
    return checked


def bulk_create_events(call: Call) -> Reply:
    """``POST /api/event-bulk-create-jobs``: 202; everything is checked before anything is stored."""
    checked = call.checked if call.checked is not None else check_bulk_events(call)
    # Klaviyo accepts a bulk job (202) and records its events in the background: recording a thousand at
    # once would hold up every other account's requests to the sandbox.
    call.runtime.later_in_turns(0.0, checked, lambda c: rules.record(call.state, c[0], c[1], c[2], call.now))
    return Reply(202)


def _event_field(e: Event, name: str) -> Any:
    if name == "metric_id":
        return e.metric_id
    if name == "profile_id":
        return e.profile_id
    if name in ("datetime", "timestamp"):
        return e.timestamp
    if name in ("metric", "profile"):
        return True
    return None


def get_events(call: Call) -> Reply:
    """``GET /api/events``: filter, sort by time (ties by id), cursor paging."""
    conditions = call.filters()
    profile_ids = [c.value for c in conditions if c.field == "profile_id" and c.operator == "equals"]
    pool = (
        call.state.events_by_profile.get(profile_ids[0], [])
        if profile_ids
        else list(call.state.events.values())
    )
    found = [e for e in pool if matches(conditions, functools.partial(_event_field, e))]
    sort = call.query.get("sort") or "timestamp"
    descending = sort.startswith("-")
    ordered = rules.time_order(found, descending)
    chunk, nxt = paging.page(
        ordered,
        lambda e: (e.timestamp, e.id),
        call.page_size(200),
        call.query.get("page[cursor]"),
        descending,
    )
    return Reply(
        200,
        {
            "data": [rules.resource(e, call.base_url) for e in chunk],
            "links": paging.links(call.self_url, call.query, nxt),
        },
    )


def get_event(call: Call) -> Reply:
    """``GET /api/events/{id}``."""
    event = call.state.events.get(call.params["id"])
    if event is None:
        raise not_found("event", call.params["id"])
    return Reply(200, document(rules.resource(event, call.base_url), call.self_url))


def get_metrics(call: Call) -> Reply:
    """``GET /api/metrics`` (all metrics are API metrics here)."""
    conditions = call.filters()

    def field(name: str) -> Any:
        return {"integration.name": "API", "integration.category": "API"}.get(name)

    found = list(call.state.metrics.values()) if matches(conditions, field) else []
    found.sort(key=lambda m: m.id)
    chunk, nxt = paging.page(found, lambda m: m.id, 200, call.query.get("page[cursor]"))
    return Reply(
        200,
        {
            "data": [rules.metric_resource(m, call.base_url) for m in chunk],
            "links": paging.links(call.self_url, call.query, nxt),
        },
    )


def get_metric(call: Call) -> Reply:
    """``GET /api/metrics/{id}``."""
    metric = call.state.metrics.get(call.params["id"])
    if metric is None:
        raise not_found("metric", call.params["id"])
    return Reply(200, document(rules.metric_resource(metric, call.base_url), call.self_url))
