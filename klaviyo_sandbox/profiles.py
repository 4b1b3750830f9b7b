"""Profile rules: contact validation, identity matching, upsert (null clears, omitted keeps), conflicts.

Identity: a profile is found by ``id``, then ``external_id``, ``email``, ``phone_number``, ``anonymous_id``.
A write whose identifiers point at two different existing profiles, or whose email/phone belongs to a
profile carrying a different external_id than the body's, is a 409 ``duplicate_profile`` whose
``meta.duplicate_profile_id`` names the existing profile in the way (../shared/notes/klaviyo-api.md §2.1-2.2).
"""

from __future__ import annotations

import functools
import re
from typing import Any

import phonenumbers
from email_validator import EmailNotValidError, validate_email

from klaviyo_sandbox import ids
from klaviyo_sandbox.errors import ApiError, invalid, not_found
from klaviyo_sandbox.store import IDENTIFIERS, LOCATION_FIELDS, PROFILE_FIELDS, AccountState, Profile

PHONE_DETAIL = "Invalid phone number format (Example of a valid format: +12345678901)"
EMAIL_DETAIL = "Invalid email address"
# ASCII digits only, the whole value: Klaviyo's format is "+12345678901" (a str pattern's \d would take any
# Unicode digit, and "$" a final newline).
_E164 = re.compile(r"\+[1-9]\d{6,14}", re.ASCII)
_SIMPLE_EMAIL = re.compile(r"^[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}$")


@functools.lru_cache(maxsize=65536)
def phone_ok(value: str) -> bool:
    """E.164 and a number libphonenumber considers valid."""
    if not _E164.fullmatch(value):
        return False
    try:
        return bool(phonenumbers.is_valid_number(phonenumbers.parse(value, None)))
    except phonenumbers.NumberParseException:
        return False


@functools.lru_cache(maxsize=65536)
def email_ok(value: str) -> bool:
    """A syntactically valid address (common shapes take a regex; the rest the full parser)."""
    if _SIMPLE_EMAIL.match(value) and ".." not in value and not value.startswith("."):
        return True
    try:
        validate_email(value, check_deliverability=False)
    except EmailNotValidError:
        return False
    return True


def check_contacts(attrs: dict[str, Any], pointer: str) -> None:
    """400 with Klaviyo's wording when an email or phone number is malformed."""
    email = attrs.get("email")
    if email is not None and not email_ok(email):
        raise invalid(EMAIL_DETAIL, pointer=f"{pointer}/email")
    phone = attrs.get("phone_number")
    if phone is not None and not phone_ok(phone):
        raise invalid(PHONE_DETAIL, pointer=f"{pointer}/phone_number")


def duplicate(profile_id: str) -> ApiError:
    """409 ``duplicate_profile``, as Klaviyo answers it."""
    return ApiError(
        409,
        "duplicate_profile",
        "A profile already exists with one of these identifiers.",
        pointer="/data/attributes",
        meta={"duplicate_profile_id": profile_id},
    )


def _matches(state: AccountState, attrs: dict[str, Any], profile_id: str | None) -> list[str]:
    """Existing profiles the identifiers point at, in precedence order, without repeats."""
    found: list[str] = []
    if profile_id:
        if profile_id not in state.profiles:
            raise not_found("profile", profile_id)
        found.append(profile_id)
    for key in IDENTIFIERS:
        value = attrs.get(key)
        if value is not None:
            pid = state.index[key].get(value)
            if pid is not None and pid not in found:
                found.append(pid)
    return found


def find_conflict(
    state: AccountState, attrs: dict[str, Any], profile_id: str | None
) -> tuple[str | None, str | None]:
    """(the profile to write, a conflicting profile id or None) for an upsert's identifiers."""
    found = _matches(state, attrs, profile_id)
    if not found:
        return None, None
    target = found[0]
    if len(found) > 1:
        return target, found[1]
    ext = attrs.get("external_id")
    current = state.profiles[target].attrs.get("external_id")
    if ext is not None and current is not None and current != ext:
        # Matched through email/phone, but that profile belongs to another external id.
        return target, target
    return target, None


def _has_identifier(attrs: dict[str, Any]) -> bool:
    return any(attrs.get(k) for k in (*IDENTIFIERS, "_kx"))


def _index_set(state: AccountState, profile: Profile, key: str, value: Any) -> None:
    old = profile.attrs.get(key)
    if old == value:
        return
    if old is not None and state.index[key].get(old) == profile.id:
        del state.index[key][old]
    if value is not None:
        state.index[key][value] = profile.id


def apply_attributes(
    state: AccountState,
    profile: Profile,
    attrs: dict[str, Any],
    meta: dict[str, Any] | None,
    now: float,
    *,
    skip_identifiers: frozenset[str] = frozenset(),
) -> None:
    """Write ``attrs`` into ``profile``: a present key is set (``null`` clears), an absent key is kept;
    ``location`` and ``properties`` merge key by key; ``meta.patch_properties`` appends/unappends/unsets."""
    for key in PROFILE_FIELDS:
        if key in attrs and key not in skip_identifiers:
            value = attrs[key]
            if key in state.index:
                _index_set(state, profile, key, value)
            profile.attrs[key] = value
    if "location" in attrs:
        location = attrs["location"]
        if location is None:
            profile.location = {}
        else:
            for key in LOCATION_FIELDS:
                if key in location:
                    profile.location[key] = location[key]
    if "properties" in attrs:
        props = attrs["properties"]
        if props is None:
            profile.properties = {}
        else:
            profile.properties.update(props)
    patch = (meta or {}).get("patch_properties") or {}
    _patch_properties(profile.properties, patch)
    profile.updated = now


def _patch_properties(props: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in (patch.get("append") or {}).items():
        current = props.get(key)
        items = current if isinstance(current, list) else ([] if current is None else [current])
        props[key] = [*items, *(value if isinstance(value, list) else [value])]
    for key, value in (patch.get("unappend") or {}).items():
        current = props.get(key)
        if isinstance(current, list):
            drop = value if isinstance(value, list) else [value]
            props[key] = [item for item in current if item not in drop]
    unset = patch.get("unset")
    for key in [unset] if isinstance(unset, str) else (unset or []):
        props.pop(key, None)


def create(state: AccountState, attrs: dict[str, Any], meta: dict[str, Any] | None, now: float) -> Profile:
    """A new profile from ``attrs`` (identifiers must be free; callers check)."""
    profile = Profile(
        id=ids.ulid(now),
        attrs=dict.fromkeys(PROFILE_FIELDS),
        location={},
        properties={},
        created=now,
        updated=now,
    )
    state.profiles[profile.id] = profile
    apply_attributes(state, profile, attrs, meta, now)
    return profile


def upsert(
    state: AccountState,
    attrs: dict[str, Any],
    profile_id: str | None,
    meta: dict[str, Any] | None,
    now: float,
) -> tuple[Profile, bool]:
    """``POST /api/profile-import``: (profile, created?) or a 409/404/400 ``ApiError``."""
    check_contacts(attrs, "/data/attributes")
    target, conflict = find_conflict(state, attrs, profile_id)
    if conflict is not None:
        raise duplicate(conflict)
    if target is None:
        if not _has_identifier(attrs):
            raise invalid(
                "A profile requires at least one of: email, phone_number, external_id, anonymous_id, _kx.",
                pointer="/data/attributes",
            )
        return create(state, attrs, meta, now), True
    profile = state.profiles[target]
    apply_attributes(state, profile, attrs, meta, now)
    return profile, False


def create_strict(state: AccountState, attrs: dict[str, Any], now: float) -> Profile:
    """``POST /api/profiles``: 409 ``duplicate_profile`` if any identifier is taken."""
    check_contacts(attrs, "/data/attributes")
    found = _matches(state, attrs, None)
    if found:
        raise duplicate(found[0])
    if not _has_identifier(attrs):
        raise invalid(
            "A profile requires at least one of: email, phone_number, external_id, anonymous_id, _kx.",
            pointer="/data/attributes",
        )
    return create(state, attrs, None, now)


def update(
    state: AccountState, profile_id: str, attrs: dict[str, Any], meta: dict[str, Any] | None, now: float
) -> Profile:
    """``PATCH /api/profiles/{id}``: 409 if a new identifier belongs to another profile."""
    profile = state.profiles.get(profile_id)
    if profile is None:
        raise not_found("profile", profile_id)
    check_contacts(attrs, "/data/attributes")
    for key in IDENTIFIERS:
        value = attrs.get(key)
        if value is not None:
            owner = state.index[key].get(value)
            if owner is not None and owner != profile_id:
                raise duplicate(owner)
    apply_attributes(state, profile, attrs, meta, now)
    return profile


def resolve_for_event(state: AccountState, data: dict[str, Any], now: float) -> Profile:
    """The profile an event belongs to: matched by id/identifiers (found or created), its other attributes
    written as Klaviyo does for event profiles; identifiers that belong to another profile are not moved."""
    attrs = data.get("attributes") or {}
    found = _matches(state, attrs, data.get("id"))
    if not found:
        return create(state, attrs, attrs.get("meta"), now)
    profile = state.profiles[found[0]]
    taken = frozenset(
        key
        for key in IDENTIFIERS
        if attrs.get(key) is not None and state.index[key].get(attrs[key], profile.id) != profile.id
    )
    if len(attrs) > 1 or taken:
        apply_attributes(state, profile, attrs, None, now, skip_identifiers=taken)
    return profile


def resource(profile: Profile, base_url: str, fields: list[str] | None = None) -> dict[str, Any]:
    """The JSON:API resource for a profile (``fields`` is the sparse fieldset, if any)."""
    location = dict.fromkeys(LOCATION_FIELDS)
    location.update(profile.location)
    attributes: dict[str, Any] = {
        "email": profile.attrs.get("email"),
        "phone_number": profile.attrs.get("phone_number"),
        "external_id": profile.attrs.get("external_id"),
        "anonymous_id": profile.attrs.get("anonymous_id"),
        "first_name": profile.attrs.get("first_name"),
        "last_name": profile.attrs.get("last_name"),
        "organization": profile.attrs.get("organization"),
        "locale": profile.attrs.get("locale"),
        "title": profile.attrs.get("title"),
        "image": profile.attrs.get("image"),
        "created": ids.iso(profile.created),
        "updated": ids.iso(profile.updated),
        "last_event_date": ids.iso(profile.last_event) if profile.last_event is not None else None,
        "location": location,
        "properties": dict(profile.properties),
    }
    if fields:
        attributes = sparse(attributes, fields)
    self_link = f"{base_url}/api/profiles/{profile.id}/"
    rel = {
        name: {"links": {"self": f"{self_link}relationships/{name}/", "related": f"{self_link}{name}/"}}
        for name in ("lists", "segments", "push-tokens", "conversation")
    }
    return {
        "type": "profile",
        "id": profile.id,
        "attributes": attributes,
        "relationships": rel,
        "links": {"self": self_link},
    }


def sparse(attributes: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    """Keep only the requested attributes (``location.city`` keeps one sub-field)."""
    out: dict[str, Any] = {}
    for name in fields:
        head, _, sub = name.partition(".")
        if head not in attributes:
            continue
        if sub and isinstance(attributes[head], dict):
            out.setdefault(head, {})
            if sub in attributes[head]:
                out[head][sub] = attributes[head][sub]
        else:
            out[head] = attributes[head]
    return out
