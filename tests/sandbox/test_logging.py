"""Unexpected failures are logged without frame locals (which would hold the caller's key)."""

from __future__ import annotations

from structlog.testing import capture_logs

from klaviyo_sandbox.runtime import log_failure


def _fails(authorization: bytes) -> None:
    raise RuntimeError("boom")


def test_failure_log_has_traceback_but_no_locals() -> None:
    try:
        _fails(b"Klaviyo-API-Key pk_live_secret_value")
    except RuntimeError as exc:
        with capture_logs() as logs:
            log_failure("sandbox.handler_failed", exc, operation="create_event")
    (entry,) = logs
    assert entry["error"] == "RuntimeError: boom"
    assert "_fails" in entry["traceback"]
    assert "pk_live_secret_value" not in str(entry)
