"""The retry policy: what to do after a failed attempt. Pure — no I/O, no clock, no global randomness.

Given the failure's class, how many attempts the event has had, and its age, :func:`decide` answers:

- ``throttled`` (429) → :class:`Wait` until Retry-After; the attempt is not counted.
- ``auth`` (401/403, not provisioned, and account-wide refusals: a retired or unserved revision, the data
  source deleted in Klaviyo) → :class:`PauseAccount`; the event stays queued, nothing counted.
- ``permanent`` (other 4xx, 501, an event that does not parse) → :class:`DeadLetter` at once.
- ``transient`` (network, timeout, 5xx) and ``internal`` (a bug of ours) → :class:`Retry` after a capped
  exponential backoff with full jitter (``uniform(0, min(cap, base·2^(n-1)))``, AWS's "full jitter"), until
  ``max_attempts`` attempts or ``max_age_s`` of age are spent; then :class:`DeadLetter`.

An event's age is measured from when passbridge received it — or, for an event replayed from the DLQ, from its
replay (:attr:`RetryRecord.replayed_ms`) — minus the time its account spent paused (:func:`active_age_ms`):
events wait out an auth pause without ageing, and a replay after a long outage gets a fresh retry window.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

from worker.klaviyo.errors import ACCOUNT_FAULT_CODES


class FailureKind(StrEnum):
    """How a failed attempt is handled (see the module docstring)."""

    transient = "transient"
    throttled = "throttled"
    auth = "auth"
    permanent = "permanent"
    internal = "internal"


@dataclass(frozen=True, slots=True)
class Failure:
    """One failed attempt, as stored in retry records, the DLQ and the history (safe to show: no secrets)."""

    kind: FailureKind
    message: str
    endpoint: str = ""
    status: int | None = None
    code: str = ""
    detail: str = ""
    retry_after_s: float | None = None

    def to_record(self, at_ms: int, worker_id: str) -> dict[str, Any]:
        """JSON-able form with the attempt's time and worker."""
        doc: dict[str, Any] = {
            "at_ms": at_ms,
            "worker": worker_id,
            "kind": self.kind.value,
            "status": self.status,
            "code": self.code,
            "detail": self.detail,
            "endpoint": self.endpoint,
            "message": self.message,
        }
        if self.retry_after_s is not None:
            doc["retry_after_s"] = self.retry_after_s
        return doc


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff and limits; :meth:`with_overrides` applies an account's ``retry_policy``."""

    base_delay_s: float = 1.0
    max_delay_s: float = 300.0
    max_attempts: int = 8
    max_age_s: float = 24 * 3600.0

    def __post_init__(self) -> None:
        if self.base_delay_s <= 0 or self.max_delay_s < self.base_delay_s:
            raise ValueError("retry policy needs 0 < base_delay_s <= max_delay_s")
        if self.max_attempts < 1:
            raise ValueError("retry policy needs max_attempts >= 1")
        if self.max_age_s <= 0:
            raise ValueError("retry policy needs max_age_s > 0")

    def with_overrides(self, overrides: Mapping[str, Any]) -> RetryPolicy:
        """This policy with an account's overrides; unknown keys or bad values raise ``ValueError``."""
        known = {f.name: f.type for f in fields(self)}
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ValueError(f"unknown retry_policy keys: {', '.join(unknown)} (known: {', '.join(known)})")
        values: dict[str, Any] = {}
        for key, value in overrides.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"retry_policy.{key} must be a number")
            values[key] = int(value) if key == "max_attempts" else float(value)
        return replace(self, **values)


@dataclass(frozen=True, slots=True)
class Retry:
    """Park the serial for ``delay_s``; the attempt counted (it was attempt number ``attempt``)."""

    delay_s: float
    attempt: int


@dataclass(frozen=True, slots=True)
class Wait:
    """Park the serial for ``delay_s`` without counting an attempt (429)."""

    delay_s: float


@dataclass(frozen=True, slots=True)
class PauseAccount:
    """Stop the account's work until its credentials work again; the event stays queued."""

    reason: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Move the event to the DLQ and go on with the serial's next event."""

    reason: str


Decision = Retry | Wait | PauseAccount | DeadLetter

#: Smallest wait after a 429 (a Retry-After of 0 still means "not this instant").
MIN_THROTTLE_WAIT_S = 0.05


def backoff_s(policy: RetryPolicy, attempt: int, rand: Callable[[], float]) -> float:
    """Full-jitter backoff before attempt ``attempt + 1``: uniform in ``[0, min(cap, base·2^(attempt-1))]``.

    ``rand`` returns a float in [0, 1) (``random.random`` in production, fixed in tests).
    """
    ceiling = min(policy.max_delay_s, policy.base_delay_s * 2.0 ** min(attempt - 1, 62))
    return rand() * ceiling


def active_age_ms(received_ms: int, now_ms: int, pauses: Sequence[tuple[int, int]]) -> int:
    """Age of an event received at ``received_ms``, not counting the time its account spent paused.

    ``pauses`` are the account's closed pause intervals ``(start_ms, end_ms)``; only their overlap with the
    event's life is subtracted.
    """
    paused = 0
    for start, end in pauses:
        lo, hi = max(start, received_ms), min(end, now_ms)
        if hi > lo:
            paused += hi - lo
    return max(0, now_ms - received_ms - paused)


def decide(
    policy: RetryPolicy, failure: Failure, *, attempts: int, age_ms: int, rand: Callable[[], float]
) -> Decision:
    """What to do after ``failure``. ``attempts`` counts the counted attempts *before* this one."""
    if failure.kind is FailureKind.throttled:
        return Wait(max(MIN_THROTTLE_WAIT_S, failure.retry_after_s or 1.0))
    if failure.kind is FailureKind.auth:
        if failure.code in ACCOUNT_FAULT_CODES:
            return PauseAccount(f"Klaviyo refuses the account's integration: {failure.message}")
        return PauseAccount(f"Klaviyo rejected the credentials: {failure.message}")
    if failure.kind is FailureKind.permanent:
        return DeadLetter(f"permanent error: {failure.message}")
    attempt = attempts + 1
    if attempt >= policy.max_attempts:
        return DeadLetter(f"gave up after {attempt} attempts; last error: {failure.message}")
    if age_ms >= policy.max_age_s * 1000:
        return DeadLetter(
            f"gave up after {attempt} attempts: older than max age {policy.max_age_s:g} s; "
            f"last error: {failure.message}"
        )
    return Retry(backoff_s(policy, attempt, rand), attempt)


@dataclass(slots=True)
class RetryRecord:
    """The failure history of an event that is at its serial's head (stored in ``AccountKeys.retries``)."""

    serial: str
    attempts: int = 0
    throttled: int = 0
    first_failure_ms: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    #: How often the event came back from the DLQ.
    replays: int = 0
    #: When it last came back from the DLQ (epoch ms; 0 = never): its age counts from then, not from receipt.
    replayed_ms: int = 0
    #: Counted attempts of its runs before the last replay (``attempts`` counts only this run's).
    attempts_before: int = 0

    #: Most errors kept per event (attempts are bounded by the policy; throttles are only counted).
    MAX_ERRORS = 50

    def add(self, failure: Failure, *, at_ms: int, worker_id: str, counted: bool) -> None:
        """Record one failed attempt (``counted`` False for 429s, which only increment ``throttled``)."""
        if not self.first_failure_ms:
            self.first_failure_ms = at_ms
        if counted:
            self.attempts += 1
            self.errors.append(failure.to_record(at_ms, worker_id))
            del self.errors[: -self.MAX_ERRORS]
        else:
            self.throttled += 1

    def to_doc(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "serial": self.serial,
            "attempts": self.attempts,
            "throttled": self.throttled,
            "first_failure_ms": self.first_failure_ms,
            "errors": self.errors,
            "replays": self.replays,
            "replayed_ms": self.replayed_ms,
            "attempts_before": self.attempts_before,
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> RetryRecord:
        """Inverse of :meth:`to_doc`."""
        return cls(
            serial=str(doc["serial"]),
            attempts=int(doc.get("attempts", 0)),
            throttled=int(doc.get("throttled", 0)),
            first_failure_ms=int(doc.get("first_failure_ms", 0)),
            errors=list(doc.get("errors") or []),
            replays=int(doc.get("replays", 0)),
            replayed_ms=int(doc.get("replayed_ms", 0)),
            attempts_before=int(doc.get("attempts_before", 0)),
        )
