"""Translate whatever an attempt raised into a :class:`worker.retry.Failure` for the retry policy.

The Klaviyo client already classifies every HTTP outcome (:mod:`worker.klaviyo.errors`); this maps those
classes one to one, and everything else to ``permanent`` (an event we cannot even read) or ``internal``
(an unexpected exception in our own code: retried like a transient error, so a bug fixed by a deploy does not
cost events, and dead-lettered when the attempts run out). Messages are capped so a hostile body cannot bloat
the DLQ; none of them carries credentials (the client never puts headers or keys into its errors).
"""

from __future__ import annotations

from worker.klaviyo.errors import (
    AuthError,
    KlaviyoError,
    PermanentError,
    ThrottledError,
)
from worker.retry import Failure, FailureKind

MAX_MESSAGE_CHARS = 500


class UnreadableEvent(Exception):
    """A mailbox entry that does not parse as a :class:`~passbridge.event.PassEvent` (never retried)."""


def classify(exc: BaseException) -> Failure:
    """The :class:`Failure` for an exception raised while syncing one event."""
    message = str(exc)[:MAX_MESSAGE_CHARS] or type(exc).__name__
    if isinstance(exc, KlaviyoError):
        code = str(getattr(exc, "code", "") or "")
        detail = str(getattr(exc, "detail", "") or "")
        if isinstance(exc, ThrottledError):
            return Failure(FailureKind.throttled, message, exc.endpoint, 429, retry_after_s=exc.retry_after_s)
        if isinstance(exc, AuthError):
            return Failure(FailureKind.auth, message, exc.endpoint, exc.status, code, detail)
        if isinstance(exc, PermanentError):
            return Failure(FailureKind.permanent, message, exc.endpoint, exc.status, code, detail)
        # TransientError, and any KlaviyoError subclass added later: retrying is the safe default.
        return Failure(FailureKind.transient, message, exc.endpoint, exc.status, code, detail)
    if isinstance(exc, UnreadableEvent):
        return Failure(FailureKind.permanent, message, code="unreadable_event")
    return Failure(
        FailureKind.internal, f"{type(exc).__name__}: {message}"[:MAX_MESSAGE_CHARS], code="internal"
    )
