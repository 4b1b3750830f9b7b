"""Profile endpoints: import (upsert), create, list with filters and cursor paging, get, patch."""

from __future__ import annotations

import functools
from typing import Any

from klaviyo_sandbox import paging
from klaviyo_sandbox import profiles as rules
from klaviyo_sandbox.errors import not_found
from klaviyo_sandbox.filters import matches
from klaviyo_sandbox.handlers.common import Call, Reply, check_path_id, data, document, refuse_rejected
from klaviyo_sandbox.store import Profile


def _fields(call: Call) -> list[str] | None:
    fields = call.query.get("fields[profile]")
    return list(fields) if fields else None


def create_or_update_profile(call: Call) -> Reply:
    """``POST /api/profile-import``: 201 created / 200 updated."""
    d = data(call)
    refuse_rejected(call, d["attributes"].get("external_id"), "/data/attributes/external_id")
    profile, created = rules.upsert(call.state, d["attributes"], d.get("id"), d.get("meta"), call.now)
    body = document(rules.resource(profile, call.base_url, _fields(call)), call.self_url)
    return Reply(201 if created else 200, body)


def create_profile(call: Call) -> Reply:
    """``POST /api/profiles``: 201, or 409 ``duplicate_profile``."""
    profile = rules.create_strict(call.state, data(call)["attributes"], call.now)
    return Reply(201, document(rules.resource(profile, call.base_url, _fields(call)), call.self_url))


def get_profile(call: Call) -> Reply:
    """``GET /api/profiles/{id}``."""
    profile = call.state.profiles.get(call.params["id"])
    if profile is None:
        raise not_found("profile", call.params["id"])
    return Reply(200, document(rules.resource(profile, call.base_url, _fields(call)), call.self_url))


def update_profile(call: Call) -> Reply:
    """``PATCH /api/profiles/{id}``."""
    check_path_id(call)
    d = data(call)
    profile = rules.update(call.state, call.params["id"], d.get("attributes") or {}, d.get("meta"), call.now)
    return Reply(200, document(rules.resource(profile, call.base_url, _fields(call)), call.self_url))


_SORT_KEYS = {
    "id": lambda p: p.id,
    "created": lambda p: (p.created, p.id),
    "updated": lambda p: (p.updated, p.id),
    "email": lambda p: (p.attrs.get("email") or "", p.id),
}


def _field(profile: Profile, name: str) -> Any:
    if name == "id":
        return profile.id
    if name in ("created", "updated"):
        return getattr(profile, name)
    return profile.attrs.get(name)


def get_profiles(call: Call) -> Reply:
    """``GET /api/profiles`` with ``filter``, ``sort``, ``page[size]`` (≤ 100) and ``page[cursor]``."""
    conditions = call.filters()
    candidates: list[Profile]
    # An equals filter on an identifier is an index lookup, not a scan.
    indexed = next(
        (
            c
            for c in conditions
            if c.operator == "equals" and c.field in call.state.index and isinstance(c.value, str)
        ),
        None,
    )
    if indexed is not None:
        pid = call.state.index[indexed.field].get(indexed.value)
        candidates = [call.state.profiles[pid]] if pid else []
    else:
        candidates = list(call.state.profiles.values())
    found = [p for p in candidates if matches(conditions, functools.partial(_field, p))]
    sort = call.query.get("sort") or "id"
    descending = sort.startswith("-")
    key = _SORT_KEYS.get(sort.lstrip("-"), _SORT_KEYS["id"])
    found.sort(key=key, reverse=descending)
    chunk, nxt = paging.page(found, key, call.page_size(20), call.query.get("page[cursor]"), descending)
    fields = _fields(call)
    return Reply(
        200,
        {
            "data": [rules.resource(p, call.base_url, fields) for p in chunk],
            "links": paging.links(call.self_url, call.query, nxt),
        },
    )
