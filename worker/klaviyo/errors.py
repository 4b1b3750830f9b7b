"""What can go wrong talking to Klaviyo, as one exception hierarchy the retry policy switches on.

::

    KlaviyoError                 every failure of a Klaviyo call; carries ``endpoint`` (an operation id)
    ├── TransientError           network error, timeout, 5xx other than 501        → retry with backoff
    ├── ThrottledError           429, with ``retry_after_s`` from Retry-After       → pause the endpoint, retry
    ├── AuthError                401 (after one OAuth refresh) or 403               → pause the account
    │   ├── NotProvisionedError  the account has not been set up (no data source)  → pause the account
    │   └── AccountFault         revision retired (410) or not served (404 "No valid → pause the account
    │                            revisions found for method"), data source gone
    │                            (404 on a record endpoint)
    └── PermanentError           any other 4xx, and 501                             → dead-letter
        └── (code ``duplicate_profile`` is handled by the syncer and never escapes it)

This module only *classifies*; the engine's retry policy decides what to do with each class. Every message is
safe to log and store in the DLQ: it is built from the status, Klaviyo's error ``code``/``detail``/``pointer``
and the operation id — never from request headers, URLs with credentials or bodies.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any

import orjson

#: Used when a 429 carries no (or an unreadable) Retry-After: Klaviyo's windows are one second long.
DEFAULT_RETRY_AFTER_S = 1.0
#: Klaviyo's error details are short; anything longer is cut so a hostile body cannot flood logs.
MAX_DETAIL_CHARS = 500


class KlaviyoError(Exception):
    """Base class: a Klaviyo call failed. ``endpoint`` is the operation id (e.g. ``create_event``)."""

    kind = "error"

    def __init__(self, endpoint: str, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.endpoint = endpoint
        self.status = status

    def as_record(self) -> dict[str, Any]:
        """A JSON-able summary for the DLQ and the timeline (no secrets by construction)."""
        return {
            "kind": self.kind,
            "endpoint": self.endpoint,
            "status": self.status,
            "code": getattr(self, "code", None),
            "detail": str(self),
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(endpoint={self.endpoint!r}, status={self.status!r}, message={str(self)!r})"


class TransientError(KlaviyoError):
    """A failure that may well succeed if tried again: network, timeout, 5xx except 501."""

    kind = "transient"


class ThrottledError(KlaviyoError):
    """429: the account's budget for ``endpoint`` is spent until ``retry_after_s`` seconds from now."""

    kind = "throttled"

    def __init__(self, retry_after_s: float, endpoint: str, *, detail: str = "") -> None:
        super().__init__(
            endpoint,
            detail or f"{endpoint} throttled; available again in {retry_after_s:g} s",
            status=429,
        )
        self.retry_after_s = retry_after_s

    def as_record(self) -> dict[str, Any]:
        return {**super().as_record(), "retry_after_s": self.retry_after_s}


class AuthError(KlaviyoError):
    """401 that survived an OAuth refresh, or 403: the credentials (or the account's plan) do not allow it."""

    kind = "auth"

    def __init__(self, status: int, endpoint: str, *, code: str = "", detail: str = "") -> None:
        super().__init__(endpoint, _message(status, code, detail), status=status)
        self.code = code
        self.detail = detail


class NotProvisionedError(AuthError):
    """The account has no provisioned data source: ``passbridge klaviyo setup`` has not been run for it.

    An :class:`AuthError` because the cure is the same: pause the account until an operator acts.
    """

    def __init__(self, account_id: str, endpoint: str) -> None:
        super().__init__(
            403,
            endpoint,
            code="not_provisioned",
            detail=f"account {account_id} is not set up in Klaviyo: "
            f"run `passbridge klaviyo setup --account {account_id}`",
        )


#: Klaviyo's detail for a revision that does not serve the method asked for (../shared/notes §1.3).
NO_VALID_REVISIONS = "no valid revisions found for method"
#: The record endpoints: their only path-free reference is the data source, so their 404 means it is gone.
RECORD_ENDPOINTS = frozenset({"create_data_source_record", "bulk_create_data_source_records"})
#: :class:`AccountFault` codes.
REVISION_RETIRED = "revision_retired"
REVISION_NOT_SERVED = "revision_not_served"
DATA_SOURCE_MISSING = "data_source_missing"
ACCOUNT_FAULT_CODES = frozenset({REVISION_RETIRED, REVISION_NOT_SERVED, DATA_SOURCE_MISSING})


class AccountFault(AuthError):
    """Klaviyo refuses the integration as a whole, not the item: the API revision passbridge sends is retired
    (410) or does not serve the operation (404 "No valid revisions found for method"), or the account's
    provisioned data source is gone (a 404 from a record endpoint: deleted in Klaviyo).

    Every event of the account would fail the same way, so it is an :class:`AuthError`: the account is paused
    (its events wait, nothing is dead-lettered) until the sweep's probe finds it working again or an operator
    resumes it — after changing ``PASSBRIDGE_KLAVIYO_REVISION`` or running ``passbridge klaviyo setup`` again.
    """


def _account_fault(status: int, endpoint: str, detail: str) -> AccountFault | None:
    """The :class:`AccountFault` a 404/410 answer of ``endpoint`` means, if any."""
    said = f" (Klaviyo: {detail})" if detail else ""
    if status == 410:
        return AccountFault(
            410,
            endpoint,
            code=REVISION_RETIRED,
            detail="Klaviyo has retired the API revision passbridge sends; set PASSBRIDGE_KLAVIYO_REVISION "
            f"to a current one{said}",
        )
    if status != 404:
        return None
    if NO_VALID_REVISIONS in detail.lower():
        return AccountFault(
            404,
            endpoint,
            code=REVISION_NOT_SERVED,
            detail=f"the API revision passbridge sends does not serve {endpoint}; set "
            f"PASSBRIDGE_KLAVIYO_REVISION to a current one{said}",
        )
    if endpoint in RECORD_ENDPOINTS:
        return AccountFault(
            404,
            endpoint,
            code=DATA_SOURCE_MISSING,
            detail="the account's provisioned data source no longer exists in Klaviyo; run "
            f"`passbridge klaviyo setup` again{said}",
        )
    return None


class Abandoned(Exception):
    """The caller's ``alive`` check said the write is no longer wanted (its serial's lease was lost or released),
    so the request was not sent. Not a :class:`KlaviyoError`: Klaviyo never saw it, and no retry policy applies.
    """

    def __init__(self, endpoint: str) -> None:
        super().__init__(f"{endpoint}: not sent, the caller no longer holds the work")
        self.endpoint = endpoint


class PermanentError(KlaviyoError):
    """Any other 4xx (and 501): sending the same request again will fail the same way."""

    kind = "permanent"

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        pointer: str | None,
        *,
        endpoint: str,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(endpoint, _message(status, code, detail, pointer), status=status)
        self.code = code
        self.detail = detail
        self.pointer = pointer
        #: Klaviyo's ``meta`` of the first error (e.g. ``duplicate_profile_id`` on a 409).
        self.meta: dict[str, Any] = dict(meta or {})

    def as_record(self) -> dict[str, Any]:
        return {**super().as_record(), "pointer": self.pointer}


def _message(status: int, code: str, detail: str, pointer: str | None = None) -> str:
    parts = [f"HTTP {status}"]
    if code:
        parts.append(code)
    text = " ".join(parts)
    if detail:
        text += f": {detail}"
    if pointer:
        text += f" (at {pointer})"
    return text


def first_error(body: bytes) -> dict[str, Any]:
    """The first JSON:API error object of a response body, or ``{}`` when the body is not one."""
    try:
        doc = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return {}
    if isinstance(doc, dict):
        errors = doc.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            return errors[0]
    return {}


def parse_retry_after(value: str | None, *, now: float | None = None) -> float:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds (fractional allowed) or an HTTP date."""
    if not value:
        return DEFAULT_RETRY_AFTER_S
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return DEFAULT_RETRY_AFTER_S
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds or seconds < 0:  # NaN or in the past
        return 0.0
    return min(seconds, 3600.0)


def error_from_response(endpoint: str, status: int, body: bytes, headers: Mapping[str, str]) -> KlaviyoError:
    """Classify a non-2xx Klaviyo answer. Pure: the status decides the class, the body fills in details.

    - 429 → :class:`ThrottledError` (Retry-After, default 1 s)
    - 401, 403 → :class:`AuthError`
    - 410, a 404 "No valid revisions found for method", a 404 of a record endpoint → :class:`AccountFault`
    - 5xx except 501 → :class:`TransientError`
    - other 4xx, 501 (and any other non-2xx status) → :class:`PermanentError`
    """
    err = first_error(body)
    code = _text(err.get("code"))
    detail = _text(err.get("detail")) or _text(err.get("title"))
    source = err.get("source")
    pointer = _text(source.get("pointer")) if isinstance(source, dict) else ""
    if status == 429:
        return ThrottledError(parse_retry_after(headers.get("retry-after")), endpoint, detail=detail)
    if status in (401, 403):
        return AuthError(status, endpoint, code=code, detail=detail)
    if 500 <= status <= 599 and status != 501:
        return TransientError(endpoint, _message(status, code, detail), status=status)
    if status in (404, 410) and (fault := _account_fault(status, endpoint, detail)) is not None:
        return fault
    meta = err.get("meta")
    return PermanentError(
        status,
        code,
        detail,
        pointer or None,
        endpoint=endpoint,
        meta=meta if isinstance(meta, dict) else None,
    )


def _text(value: Any) -> str:
    return value[:MAX_DETAIL_CHARS] if isinstance(value, str) else ""
