"""structlog set-up, done once per entry point: JSON when not a TTY, pretty console output on one."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import structlog
from structlog.tracebacks import ExceptionDictTransformer

_SECRET_KEYS = frozenset(
    {
        "api_key",
        "token",
        "access_token",
        "refresh_token",
        "secret",
        "password",
        "authorization",
        "ingest_token",
        "client_secret",
        "webhook_secret",
        "code_verifier",
        "verifier",
        "apple_token_secret",
        "klaviyo_api_key",
    }
)


#: Secret-shaped text: Klaviyo private keys, webhook secrets, ingest tokens, Authorization header values.
_SECRET_TEXT = re.compile(
    r"(?P<keep>Bearer\s+|Klaviyo-API-Key\s+|ApplePass\s+)[^\s,;\"']+"
    r"|\bpk_[A-Za-z0-9]{6,}|\bwhsec_[A-Za-z0-9+/=]{8,}|\bpbi_[A-Za-z0-9_\-]{8,}"
)


def redact_text(text: str) -> str:
    """``text`` with every secret-shaped token replaced by ``***``."""
    return _SECRET_TEXT.sub(lambda m: (m.group("keep") or "") + "***", text)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: "***" if str(k).lower() in _SECRET_KEYS else _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def _redact(_: Any, __: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Last line of defence: a secret-named key or a secret-shaped value never reaches the output, whatever
    a caller bound (an exception text quoting a header, a dict of credentials)."""
    for key, value in event_dict.items():
        event_dict[key] = "***" if key.lower() in _SECRET_KEYS else _scrub(value)
    return event_dict


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time of the write.

    Loggers are cached on first use; bound to the stream object of configure time they would keep writing to it
    after it was replaced and closed (a test runner's capture, a CLI runner), which raises on every log line.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog and the stdlib root logger for this process."""
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # The exception is rendered to text before _redact runs, so a secret in its message (a header quoted by
    # a library, a key in a parse error) is masked like any other value.
    if as_json:
        # Tracebacks as data, but never with frame locals: a local may hold a credential.
        processors += [
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
            _redact,
            structlog.processors.JSONRenderer(),
        ]
    else:
        processors += [
            structlog.processors.format_exc_info,
            _redact,
            structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter("%(message)s"))
    logging.basicConfig(level=max(numeric, logging.WARNING), handlers=[handler])


class _RedactingFormatter(logging.Formatter):
    """Stdlib records (libraries logging through the root logger) get the same masking, traceback included."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))
