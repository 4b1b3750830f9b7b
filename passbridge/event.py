"""The canonical pass event: the one shape every source is normalized into before it reaches Redis.

Size limits are chosen so that every accepted event fits every Klaviyo payload it produces:
a profile-import body (≤ 100 KB), a custom-object record (≤ 512 KB) and an event's properties (≤ 400 keys).
An event beyond them is rejected with the limit named, never truncated.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import lru_cache
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import quote

import orjson
from email_validator import EmailNotValidError, validate_email
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from passbridge.phones import to_e164

SCHEMA_VERSION = 1

#: Custom properties a pass may carry. Klaviyo allows 400 per event; passbridge adds its own
#: (serial, pass type, platform, pass_url, wallet_pass_*), so custom fields get 100 to stay far below it.
MAX_PROPERTIES = 100
MAX_PROPERTY_KEY_CHARS = 128
MAX_PROPERTY_STRING_CHARS = 10_000
#: Serialized custom properties. With identifiers and passbridge's own fields the largest profile-import
#: body stays under 80 KB, well inside Klaviyo's 100 KB.
MAX_PROPERTIES_BYTES = 64 * 1024
MAX_URL_CHARS = 2048
MAX_EVENT_ID_CHARS = 200


class EventKind(StrEnum):
    """A pass's lifecycle step."""

    created = "created"
    installed = "installed"
    updated = "updated"
    uninstalled = "uninstalled"
    deleted = "deleted"


class Platform(StrEnum):
    """The wallet that holds the pass."""

    apple = "apple"
    google = "google"


Scalar = str | int | float | bool | None
EventId = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_EVENT_ID_CHARS, strip_whitespace=True)
]
Serial = Annotated[str, StringConstraints(min_length=1, max_length=255)]
Identifier = Annotated[str, StringConstraints(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_.:\-]+$")]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

#: How far past its receive time an event may claim to have happened (clock skew). Klaviyo rejects event
#: times more than a year ahead, and a future time would become the serial's ordering guard in the worker,
#: making every real event after it look stale.
MAX_OCCURRED_AHEAD = timedelta(hours=24)
OCCURRED_AT_TOO_FAR_AHEAD = "must not be more than 24 hours in the future"

#: Why an ``occurred_at`` whose UTC time lies outside the years 1..9999 is refused.
OCCURRED_AT_OUT_OF_RANGE = "occurred_at is out of range (its UTC time must lie within the years 1 to 9999)"


# The common case (ASCII dot-atom local part, LDH domain labels, alphabetic TLD) is checked with one
# regex; anything else goes to email-validator, which explains what is wrong. Both paths agree on what
# they accept for ASCII addresses; email-validator is ~15x slower, so it only sees the unusual ones.
_EMAIL_FAST = re.compile(
    r"^(?=.{1,254}$)(?=[^@]{1,64}@)[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$"
)


def normalize_email(value: str) -> str:
    """Validate an email address's syntax and return its normalized form (domain lower-cased)."""
    if _EMAIL_FAST.match(value):
        local, _, domain = value.rpartition("@")
        return f"{local}@{domain.lower()}"
    return _normalize_unusual_email(value)


# Cached: email-validator takes tens of microseconds; the regex above costs less than a cache lookup would.
@lru_cache(maxsize=4096)
def _normalize_unusual_email(value: str) -> str:
    try:
        result = validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(f"not a valid email address: {exc}") from None
    return result.normalized


@lru_cache(maxsize=65536)
def normalize_phone(value: str, default_region: str) -> str:
    """Parse a phone number (E.164, or national in ``default_region``) and return it in E.164.

    Validity is libphonenumber's ``is_valid_number`` (the same rule Klaviyo applies); E.164 input takes the
    precompiled path of :mod:`passbridge.phones`.
    """
    return to_e164(value, default_region)


_INF = float("inf")


def _check_properties(props: dict[str, Any]) -> dict[str, Any]:
    if len(props) > MAX_PROPERTIES:
        raise ValueError(f"at most {MAX_PROPERTIES} custom properties are allowed, got {len(props)}")
    chars = 0
    for key, value in props.items():
        kind = type(value)
        if kind is str:
            size = len(value)
            if size > MAX_PROPERTY_STRING_CHARS:
                raise ValueError(f"property {key!r} is longer than {MAX_PROPERTY_STRING_CHARS} characters")
            chars += size
        elif kind is int:
            if not -(2**63) <= value < 2**64:  # what JSON encoders (and Klaviyo) take
                raise ValueError(f"property {key!r} is outside the 64-bit integer range")
        elif kind is float:
            if value != value or value in (_INF, -_INF):  # JSON has no NaN or Infinity
                raise ValueError(f"property {key!r} is not a finite number (JSON has no NaN or Infinity)")
        elif kind is not bool and value is not None:
            if not isinstance(value, str | int | float | bool):
                raise ValueError(f"property {key!r} must be a string, number, boolean or null (JSON scalar)")
            return _check_properties({k: _plain(v) for k, v in props.items()})  # subclasses, e.g. enums
        size = len(key)
        if not 0 < size <= MAX_PROPERTY_KEY_CHARS:
            raise ValueError(f"property names must be 1..{MAX_PROPERTY_KEY_CHARS} characters: {key[:40]!r}")
        if key[0] == "$":
            raise ValueError(f"property names starting with '$' are reserved by Klaviyo: {key!r}")
        chars += size
    # A character takes at most 6 bytes of JSON (\uXXXX) and a scalar with its punctuation at most 32, so
    # small property sets skip serializing; only ones that might be near the limit are measured exactly.
    if chars * 6 + len(props) * 32 > MAX_PROPERTIES_BYTES and len(orjson.dumps(props)) > MAX_PROPERTIES_BYTES:
        raise ValueError(f"custom properties exceed {MAX_PROPERTIES_BYTES} bytes serialized")
    return props


def property_errors(props: dict[Any, Any]) -> list[tuple[str | None, str]]:
    """Every reason the custom properties ``props`` (as the client sent them) are refused: ``(name, reason)``
    per offending property, ``(None, reason)`` for the set as a whole; empty when they are accepted.

    For error reports only (it checks each property on its own): names are checked as pydantic leaves them,
    surrounding whitespace stripped, and two names that are the same once stripped are refused, where pydantic
    would keep one of the values and silently drop the other.
    """
    out: list[tuple[str | None, str]] = []
    if len(props) > MAX_PROPERTIES:
        out.append((None, f"at most {MAX_PROPERTIES} custom properties are allowed, got {len(props)}"))
    seen: dict[str, str] = {}
    for key, value in props.items():
        name = key.strip() if type(key) is str else key
        if name in seen:
            out.append(
                (
                    key,
                    f"property {key!r} has the same name as {seen[name]!r} once surrounding whitespace is removed",
                )
            )
            continue
        seen[name] = key
        try:
            _check_properties({name: value})
        except ValueError as exc:
            out.append((key, str(exc)))
    if not out:
        try:
            _check_properties({k.strip() if type(k) is str else k: v for k, v in props.items()})
        except ValueError as exc:
            out.append((None, str(exc)))
    return out


def _plain(value: Any) -> Any:
    """A JSON scalar's plain type (a ``str``/``int`` enum member becomes its value)."""
    for kind in (bool, int, float, str):
        if isinstance(value, kind):
            return kind(value)
    return value


class EventIn(BaseModel):
    """What a client of the events routes sends: the canonical event minus what the producer stamps."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    event_id: EventId
    kind: EventKind
    serial_number: Serial
    pass_type: Identifier
    platform: Platform
    occurred_at: datetime | None = None
    email: str | None = Field(default=None, max_length=254)
    phone_number: str | None = Field(default=None, max_length=32)
    pass_url: str | None = Field(default=None, max_length=MAX_URL_CHARS)
    device_id: str | None = Field(default=None, max_length=255)
    properties: dict[str, Any] = Field(default_factory=dict)

    @field_validator("serial_number", "event_id")
    @classmethod
    def _printable(cls, v: str, info: ValidationInfo) -> str:
        # Operators read serials and event ids in terminals and pages: an escape sequence in one would act there.
        if _CONTROL.search(v):
            raise ValueError(f"{info.field_name} must not contain control characters")
        return v

    @field_validator("occurred_at")
    @classmethod
    def _aware(cls, v: datetime | None, info: ValidationInfo) -> datetime | None:
        if v is None:
            return v
        if v.tzinfo is None:
            raise ValueError("occurred_at needs a timezone (e.g. 2026-11-25T10:00:00Z)")
        try:
            v = v.astimezone(UTC)
        except OverflowError:  # e.g. 9999-12-31T23:59:59-01:00: its UTC time is past year 9999
            raise ValueError(OCCURRED_AT_OUT_OF_RANGE) from None
        if v.year < 1990:
            raise ValueError("occurred_at must be after 1990 (Klaviyo rejects older event times)")
        # With the receive time in the context (producer.ingest), the check build_event_from makes is made
        # here too: reported beside the item's other bad fields, not only once they are fixed.
        received = info.context.get("received_at") if isinstance(info.context, dict) else None
        if received is not None and v - received > MAX_OCCURRED_AHEAD:
            raise ValueError(OCCURRED_AT_TOO_FAR_AHEAD)
        return v

    @field_validator("email")
    @classmethod
    def _email(cls, v: str | None) -> str | None:
        return None if v in (None, "") else normalize_email(v)

    @field_validator("phone_number")
    @classmethod
    def _phone(cls, v: str | None, info: ValidationInfo) -> str | None:
        # As for occurred_at: with the default region in the context, a bad number is reported with the rest.
        region = info.context.get("default_region") if isinstance(info.context, dict) else None
        if v and region is not None:
            normalize_phone(v, region)  # raises ValueError; build_event_from normalizes (cached)
        return v

    @field_validator("pass_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v in (None, ""):
            return None
        assert v is not None
        if not v.startswith(("https://", "http://")):
            raise ValueError("pass_url must be an http(s) URL")
        return v

    @field_validator("properties", mode="before")
    @classmethod
    def _distinct_names(cls, v: Any) -> Any:
        # Before str_strip_whitespace, which strips the names too: " tier" and "tier" would become one.
        if type(v) is dict and any(type(k) is str and k != k.strip() for k in v):
            names = {k.strip() if type(k) is str else k for k in v}
            if len(names) < len(v):
                raise ValueError("property names must differ once surrounding whitespace is removed")
        return v

    @field_validator("properties")
    @classmethod
    def _props(cls, v: dict[str, Any]) -> dict[str, Any]:
        return _check_properties(v)


_EVENT_IN_FIELDS = frozenset(EventIn.model_fields)
_IDENTIFIER = re.compile(r"[A-Za-z0-9_.:\-]{1,255}")  # used with fullmatch: "$" would allow a final "\n"
#: RFC 3339 timestamps in the forms clients send (``Z`` or ``±HH:MM``, no fraction or 1–6 digits): the only
#: ``occurred_at`` strings the fast path parses itself; any other form goes to pydantic.
_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)")  # fullmatch
_KINDS = {k.value: k for k in EventKind}
_PLATFORMS = {p.value: p for p in Platform}


def _plain_str(value: Any, max_chars: int) -> bool:
    """A ``str`` that pydantic would take as it is: no surrounding whitespace to strip, within the limit."""
    return type(value) is str and len(value) <= max_chars and (not value or value == value.strip())


def fast_event_in(raw: Any) -> EventIn | None:
    """:class:`EventIn` for an item in the common, unambiguous shape, without pydantic's machinery; None for
    anything else (the caller then validates with pydantic, which also words the errors).

    Accepts exactly what :class:`EventIn` validation accepts and returns an equal model for those inputs (plain
    ``str`` values with nothing to strip, an RFC 3339 ``occurred_at``, a ``dict`` of properties); everything
    unusual or invalid falls through. ``tests/test_event.py`` holds it to pydantic on a fuzzed corpus.
    """
    fields = fast_fields(raw)
    if fields is None:
        return None
    return _unvalidated(EventIn, fields, set(raw))


def fast_fields(raw: Any) -> dict[str, Any] | None:
    """The field values :func:`fast_event_in`'s model would hold (``EventIn(...).__dict__``), or None; for
    :func:`build_event_from`, which needs no model in between."""
    if type(raw) is not dict or not raw.keys() <= _EVENT_IN_FIELDS:
        return None
    get = raw.get
    event_id, serial, pass_type = get("event_id"), get("serial_number"), get("pass_type")
    kind_raw, platform_raw = get("kind"), get("platform")
    if type(kind_raw) is not str or type(platform_raw) is not str:
        return None
    kind, platform = _KINDS.get(kind_raw), _PLATFORMS.get(platform_raw)
    if (
        kind is None
        or platform is None
        or not _plain_str(event_id, MAX_EVENT_ID_CHARS)
        or not event_id
        or _CONTROL.search(event_id)
        or not _plain_str(serial, 255)
        or not serial
        or _CONTROL.search(serial)
        or type(pass_type) is not str
        or not _IDENTIFIER.fullmatch(pass_type)
    ):
        return None
    occurred = get("occurred_at")
    if occurred is not None:
        if type(occurred) is not str or not _RFC3339.fullmatch(occurred):
            return None
        try:
            occurred = datetime.fromisoformat(occurred).astimezone(UTC)
        except (ValueError, OverflowError):  # pydantic words the error
            return None
        if occurred.year < 1990:
            return None
    email, phone, url, device = get("email"), get("phone_number"), get("pass_url"), get("device_id")
    if email is not None:
        if not _plain_str(email, 254):
            return None
        if email:
            try:
                email = normalize_email(email)
            except ValueError:
                return None
        else:
            email = None
    if phone is not None and not _plain_str(phone, 32):
        return None
    if url is not None:
        if not _plain_str(url, MAX_URL_CHARS):
            return None
        if not url:
            url = None
        elif not url.startswith(("https://", "http://")):
            return None
    if device is not None and not _plain_str(device, 255):
        return None
    props = get("properties", _MISSING)
    if props is _MISSING:
        props = {}
    elif type(props) is not dict or not all(type(k) is str and k == k.strip() for k in props):
        return None  # pydantic strips (and type-checks) the keys too
    else:
        try:
            props = _check_properties(dict(props))
        except ValueError:
            return None
    return {
        "event_id": event_id,
        "kind": kind,
        "serial_number": serial,
        "pass_type": pass_type,
        "platform": platform,
        "occurred_at": occurred,
        "email": email,
        "phone_number": phone,
        "pass_url": url,
        "device_id": device,
        "properties": props,
    }


_MISSING = object()


#: Where an event entered passbridge (``PassEvent.source``).
EventSource = Literal["api", "ndjson", "webhook", "apple", "google", "replay"]


class PassEvent(BaseModel):
    """The canonical, normalized pass event as stored in Redis and consumed by the workers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1
    event_id: EventId
    account_id: Identifier
    kind: EventKind
    serial_number: Serial
    pass_type: Identifier
    platform: Platform
    occurred_at: datetime
    received_at: datetime
    source: EventSource
    email: str | None = None
    phone_number: str | None = None
    pass_url: str
    device_id: str | None = None
    properties: dict[str, Scalar] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _utc(self) -> PassEvent:
        if self.occurred_at.tzinfo is None or self.received_at.tzinfo is None:
            raise ValueError("timestamps must be timezone-aware")
        return self

    @classmethod
    def trusted(cls, **fields: Any) -> PassEvent:
        """Build from values that are already valid, skipping validation (what ``model_construct`` does,
        without its per-field default handling: every field must be given). Used on the ingest hot path."""
        if len(fields) != len(_PASS_EVENT_FIELDS):
            raise TypeError(
                f"PassEvent.trusted needs every field: {sorted(_PASS_EVENT_FIELDS - set(fields))}"
            )
        return _trusted(cls, fields)

    @property
    def occurred_ms(self) -> int:
        """``occurred_at`` in epoch milliseconds: the mailbox's ordering score."""
        return int(self.occurred_at.timestamp() * 1000)

    def to_wire(self) -> bytes:
        """Compact JSON for Redis: ``None`` fields and the account (already in the key) left out.

        Built by hand rather than with ``model_dump``: this runs once per ingested event on the hot path.
        Timestamps are ISO 8601 with ``Z`` for UTC, serialized by orjson itself (``OPT_UTC_Z``: the same text
        as ``isoformat()`` with ``+00:00`` written ``Z``, which ``tests/test_event.py`` checks).
        """
        data: dict[str, Any] = {
            "v": self.schema_version,
            "id": self.event_id,
            "k": self.kind,  # orjson writes a StrEnum member as its value (``.value`` is a slow property)
            "s": self.serial_number,
            "t": self.pass_type,
            "p": self.platform,
            "o": self.occurred_at,
            "r": self.received_at,
            "src": self.source,
            "u": self.pass_url,
        }
        if self.email is not None:
            data["e"] = self.email
        if self.phone_number is not None:
            data["ph"] = self.phone_number
        if self.device_id is not None:
            data["d"] = self.device_id
        if self.properties:
            data["x"] = self.properties
        return orjson.dumps(data, option=orjson.OPT_UTC_Z)

    @classmethod
    def from_wire(cls, raw: bytes | str, account_id: str) -> PassEvent:
        """Inverse of :meth:`to_wire` (validated again: the worker trusts nothing it reads back)."""
        d = orjson.loads(raw)
        return cls.model_validate(
            {
                "schema_version": d["v"],
                "event_id": d["id"],
                "account_id": account_id,
                "kind": d["k"],
                "serial_number": d["s"],
                "pass_type": d["t"],
                "platform": d["p"],
                "occurred_at": d["o"],
                "received_at": d["r"],
                "source": d["src"],
                "pass_url": d["u"],
                "email": d.get("e"),
                "phone_number": d.get("ph"),
                "device_id": d.get("d"),
                "properties": d.get("x", {}),
            }
        )


_PASS_EVENT_FIELDS = frozenset(PassEvent.model_fields)
_new_object = object.__new__
_M = TypeVar("_M", bound=BaseModel)
_set_attr = object.__setattr__


def _trusted(cls: type[PassEvent], fields: dict[str, Any]) -> PassEvent:
    """:meth:`PassEvent.trusted` without the keyword packing and the field count (the caller gives all)."""
    return _unvalidated(cls, fields, set(_PASS_EVENT_FIELDS))


def _unvalidated(cls: type[_M], fields: dict[str, Any], fields_set: set[str]) -> _M:
    """An instance of the pydantic model ``cls`` holding ``fields`` as given (already checked by the caller):
    what ``model_construct`` does, without its per-field defaults pass."""
    obj = _new_object(cls)
    _set_attr(obj, "__dict__", fields)
    _set_attr(obj, "__pydantic_fields_set__", fields_set)
    _set_attr(obj, "__pydantic_extra__", None)
    _set_attr(obj, "__pydantic_private__", None)
    return obj


def build_event(
    item: EventIn,
    *,
    account_id: str,
    source: EventSource,
    received_at: datetime,
    default_region: str,
    pass_url_template: str,
) -> PassEvent:
    """Stamp and complete a client's event: receive time, source, E.164 phone, pass URL from the template.

    Raises :class:`FieldError` (naming the field) when the phone number does not parse in ``default_region``
    or ``occurred_at`` is more than :data:`MAX_OCCURRED_AHEAD` after ``received_at``.
    """
    return build_event_from(
        item.__dict__,
        account_id=account_id,
        source=source,
        received_at=received_at,
        default_region=default_region,
        pass_url_template=pass_url_template,
    )


def build_event_from(
    item: dict[str, Any],
    *,
    account_id: str,
    source: EventSource,
    received_at: datetime,
    default_region: str,
    pass_url_template: str,
) -> PassEvent:
    """:func:`build_event` from a validated item's field values (an :class:`EventIn`'s ``__dict__`` or what
    :func:`fast_fields` returns): the ingest hot path builds no model in between."""
    phone = item["phone_number"]
    if phone:
        try:
            phone = normalize_phone(phone, default_region)
        except ValueError as exc:
            raise FieldError("phone_number", str(exc)) from None
    else:
        phone = None
    occurred = item["occurred_at"]
    if occurred is None:
        occurred = received_at
    elif occurred - received_at > MAX_OCCURRED_AHEAD:
        raise FieldError("occurred_at", OCCURRED_AT_TOO_FAR_AHEAD)
    serial = item["serial_number"]
    return _trusted(
        PassEvent,
        {
            "schema_version": 1,
            "event_id": item["event_id"],
            "account_id": account_id,
            "kind": item["kind"],
            "serial_number": serial,
            "pass_type": item["pass_type"],
            "platform": item["platform"],
            "occurred_at": occurred,
            "received_at": received_at,
            "source": source,
            "email": item["email"],
            "phone_number": phone,
            "pass_url": item["pass_url"] or render_pass_url(pass_url_template, serial, item["pass_type"]),
            "device_id": item["device_id"],
            "properties": item["properties"],
        },
    )


_URL_SAFE = re.compile(r"^[A-Za-z0-9_.~\-]*$")


def render_pass_url(template: str, serial_number: str, pass_type: str) -> str:
    """The account's pass-URL template with ``{serial_number}`` and ``{pass_type}`` filled in (URL-quoted)."""
    serial = serial_number if _URL_SAFE.match(serial_number) else quote(serial_number, safe="")
    url = template.replace("{serial_number}", serial)
    if "{pass_type}" in url:
        url = url.replace(
            "{pass_type}", pass_type if _URL_SAFE.match(pass_type) else quote(pass_type, safe="")
        )
    return url


class FieldError(ValueError):
    """A validation failure that names the offending field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def utcnow() -> datetime:
    """Aware UTC now; one place so tests and sources agree on the clock."""
    return datetime.now(UTC)
