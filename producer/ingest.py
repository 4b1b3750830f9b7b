"""Validation and normalization shared by every route and the Python API: raw items → canonical events."""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import orjson
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

#: How many rejected lines an NDJSON answer gives the errors of when nothing says otherwise (the default of
#: ``PASSBRIDGE_NDJSON_REJECTED_DETAILS``, and of the Python API's ``publish``).
REJECTED_DETAILS = 1000
#: The most errors listed for one rejected line: a line of 256 KB can hold 25,000 bad custom properties, 3.4 MB
#: of errors (more again as Python objects) for one line; the first hundred say what is wrong as well.
MAX_LINE_ERRORS = 100
#: Line numbers written per piece of the ``{"line": n}`` tail of a rejected list.
_TAIL_PIECE = 65536


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
    details: bool = True,
) -> PassEvent:
    """Validate one raw JSON item and build its canonical event; raises :class:`ItemError`.

    With ``details=False`` the error raised has no ``errors``: for a rejected line whose errors will not be
    reported (see :class:`Rejections`), they are not worked out.
    """
    try:
        # The common shape skips pydantic's machinery (same result, see fast_event_in); the rest, errors
        # included, is validated by pydantic.
        # (fast_fields gives what the validated model would hold, without building it.)
        fields = fast_fields(raw)
        if fields is None:
            fields = _EVENT_IN.validate_python(raw, context=_context(received_at, default_region)).__dict__
        return build_event_from(
            fields,
            account_id=account.account_id,
            source=source,
            received_at=received_at,
            default_region=default_region,
            pass_url_template=account.pass_url_template,
        )
    except ValidationError as exc:
        if not details:
            raise ItemError([]) from None
        raise ItemError(_per_property(validation_errors(exc, prefix), raw, prefix)) from None
    except FieldError as exc:
        if not details:
            raise ItemError([]) from None
        # build_event_from stops at its first failed check: pydantic, given the context, reports each one.
        try:
            _EVENT_IN.validate_python(raw, context=_context(received_at, default_region))
        except ValidationError as every:
            raise ItemError(_per_property(validation_errors(every, prefix), raw, prefix)) from None
        raise ItemError(
            [{"pointer": pointer(*prefix, exc.field), "field": exc.field, "detail": exc.reason}]
        ) from None
    except OverflowError:
        if not details:
            raise ItemError([]) from None
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


def _context(received_at: datetime, default_region: str) -> dict[str, Any]:
    """What lets pydantic also check the phone number and how far ahead occurred_at is (as build_event_from
    does), so an item's 422 names every bad field at once; built off the fast path only."""
    return {"received_at": received_at, "default_region": default_region}


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


class Rejections:
    """The lines of an NDJSON upload (or items of a backfill) rejected so far, in order: every line's number, and
    the errors of the first ``details`` of them only.

    A file whose every line is rejected (a field misnamed throughout a backfill) would otherwise cost each line's
    errors in memory and in the answer: 1 MiB of ``{}`` lines, a few errors each, was answered with 131 MB. So
    past the first ``details`` lines only the number is kept, as an 8-byte int, and written as ``{"line": n}``.
    """

    def __init__(self, details: int = REJECTED_DETAILS) -> None:
        self.details = details
        self.lines: array[int] = array("q")
        #: The errors of ``lines[i]`` for each i below ``min(len(lines), details)``.
        self._errors: list[list[dict[str, Any]]] = []

    def __len__(self) -> int:
        return len(self.lines)

    @property
    def wants_details(self) -> bool:
        """Whether the errors of the next rejected line are kept: only then are they worth building."""
        return len(self.lines) < self.details

    def add(self, line: int, errors: list[dict[str, Any]]) -> None:
        """Record ``line`` as rejected with ``errors`` (ignored, and may be empty, unless :attr:`wants_details`);
        lines must come in increasing order."""
        if self.wants_details:
            if len(errors) > MAX_LINE_ERRORS:
                more = len(errors) - MAX_LINE_ERRORS
                errors = [
                    *errors[:MAX_LINE_ERRORS],
                    {"pointer": "", "field": "(line)", "detail": f"and {more} more error(s) in this line"},
                ]
            self._errors.append(errors)
        self.lines.append(line)

    def count(self, through: int | None = None) -> int:
        """How many lines up to line ``through`` (all when None) were rejected."""
        return len(self.lines) if through is None else bisect_right(self.lines, through)

    def entries(self, through: int | None = None) -> Iterator[dict[str, Any]]:
        """The rejected lines up to line ``through`` (all when None) as the answer lists them, one at a time:
        ``{"line": n, "errors": [...]}`` for the first ``details``, ``{"line": n}`` after."""
        for i in range(self.count(through)):
            if i < len(self._errors):
                yield {"line": self.lines[i], "errors": self._errors[i]}
            else:
                yield {"line": self.lines[i]}

    def report(self, through: int | None = None) -> dict[str, Any]:
        """The fields of an answer for the lines rejected up to line ``through`` (all when None): ``rejected``
        (their list, as :meth:`entries`, serialized already), ``rejected_count`` (its length) and
        ``rejected_details_omitted`` (how many of them are listed without their errors)."""
        n = self.count(through)
        full = min(n, len(self._errors))
        return {
            "rejected": orjson.Fragment(self._json(n, full)),
            "rejected_count": n,
            "rejected_details_omitted": n - full,
        }

    def _json(self, n: int, full: int) -> bytes:
        head = orjson.dumps([{"line": self.lines[i], "errors": self._errors[i]} for i in range(full)])
        if n == full:
            return head
        # Written straight from the numbers: a dict per line (about 200 bytes each) for millions of lines
        # would cost more than the answer itself.
        parts = [head[:-1]]
        for start in range(full, n, _TAIL_PIECE):
            numbers = '},{"line":'.join(map(str, self.lines[start : min(n, start + _TAIL_PIECE)]))
            parts.append(f'{"," if start else ""}{{"line":{numbers}}}'.encode())
        parts.append(b"]")
        return b"".join(parts)
