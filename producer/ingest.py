"""Validation and normalization shared by every route and the Python API: raw items → canonical events."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import TypeAdapter, ValidationError

from passbridge.accounts import Account
from passbridge.event import (
    OCCURRED_AT_OUT_OF_RANGE,
    EventIn,
    EventSource,
    FieldError,
    PassEvent,
    build_event_from,
    fast_fields,
    property_errors,
)
from producer.problems import pointer, validation_errors

_EVENT_IN = TypeAdapter(EventIn)


class ItemError(Exception):
    """One item failed validation; ``errors`` are pointer/field/detail entries."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors[0]["detail"] if errors else "invalid")
        self.errors = errors


def to_event(
    raw: Any,
    *,
    account: Account,
    source: EventSource,
    received_at: datetime,
    default_region: str,
    prefix: tuple[str | int, ...] = (),
) -> PassEvent:
    """Validate one raw JSON item and build its canonical event; raises :class:`ItemError`."""
    try:
        # The common shape skips pydantic's machinery (same result, see fast_event_in); the rest, errors
        # included, is validated by pydantic.
        # (fast_fields gives what the validated model would hold, without building it.)
        fields = fast_fields(raw)
        if fields is None:
            fields = _EVENT_IN.validate_python(raw).__dict__
        return build_event_from(
            fields,
            account_id=account.account_id,
            source=source,
            received_at=received_at,
            default_region=default_region,
            pass_url_template=account.pass_url_template,
        )
    except ValidationError as exc:
        raise ItemError(_per_property(validation_errors(exc, prefix), raw, prefix)) from None
    except FieldError as exc:
        raise ItemError(
            [{"pointer": pointer(*prefix, exc.field), "field": exc.field, "detail": exc.reason}]
        ) from None
    except OverflowError:
        # A backstop: the validators above turn an out-of-range time into a field error, and occurred_at is
        # the only input any arithmetic is done on, so a bad item must never become a 500 (nor abort an NDJSON
        # upload) through a path they miss.
        raise ItemError(
            [
                {
                    "pointer": pointer(*prefix, "occurred_at"),
                    "field": "occurred_at",
                    "detail": OCCURRED_AT_OUT_OF_RANGE,
                }
            ]
        ) from None


def _per_property(
    errors: list[dict[str, Any]], raw: Any, prefix: tuple[str | int, ...]
) -> list[dict[str, Any]]:
    """``errors`` with the one error pydantic gives for the custom properties as a whole replaced by one per
    offending property, each pointing at it (``/properties/<name>``)."""
    whole = pointer(*prefix, "properties")
    at = next((i for i, e in enumerate(errors) if e["pointer"] == whole), None)
    props = raw.get("properties") if type(raw) is dict else None
    if at is None or type(props) is not dict:
        return errors
    found = property_errors(props)
    if not found:
        return errors
    each = [
        {"pointer": whole, "field": "properties", "detail": reason}
        if key is None
        else {"pointer": pointer(*prefix, "properties", key), "field": f"properties.{key}", "detail": reason}
        for key, reason in found
    ]
    return errors[:at] + each + errors[at + 1 :]
