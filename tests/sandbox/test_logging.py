"""Unexpected failures are logged without frame locals (which would hold the caller's key)."""

from __future__ import annotations

from structlog.testing import capture_logs

from klaviyo_sandbox.runtime import log_failure


def _fails(authorization: bytes) -> None:
    raise RuntimeError("boom")


def test_failure_log_has_traceback_but_no_locals() -> None:
    secret = "pk_live_" + "s3cr3t" * 3
    try:
        _fails(f"Klaviyo-API-Key {secret}".encode())
    except RuntimeError as exc:
        with capture_logs() as logs:
            log_failure("sandbox.handler_failed", exc, operation="create_event")
    (entry,) = logs
    assert entry["error"] == "RuntimeError: boom"
    assert "_fails" in entry["traceback"]
    assert secret not in str(entry)
