"""Logs never carry a secret: not as a bound value, not in a traceback's frame locals."""

from __future__ import annotations

import pytest
import structlog

from passbridge.logging import configure_logging


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_secrets_stay_out_of_logs(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", fmt)
    structlog.reset_defaults()
    configure_logging("info", fmt)
    log = structlog.get_logger("t")

    def call_klaviyo(api_key: str = "pk_live_do_not_print") -> None:
        raise RuntimeError("upstream failed")

    try:
        call_klaviyo()
    except RuntimeError:
        log.exception("request failed", api_key="pk_live_do_not_print", access_token="tok_do_not_print")
    err = capsys.readouterr().err
    assert "request failed" in err
    assert "upstream failed" in err
    assert "do_not_print" not in err
    structlog.reset_defaults()


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_secrets_in_an_exception_message_are_masked(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The exception's text is rendered before redaction runs, so a key or token quoted in it is masked."""
    structlog.reset_defaults()
    configure_logging("info", fmt)
    log = structlog.get_logger("t")
    try:
        raise ValueError("bad key pk_abcdef1234567890 sent as Bearer eyJhbGciOiJIUzI1NiJ9.payload")
    except ValueError:
        log.exception("request failed")
    err = capsys.readouterr().err
    assert "bad key *** sent as Bearer ***" in err
    assert "abcdef1234567890" not in err
    assert "eyJhbGciOiJIUzI1NiJ9" not in err
    assert "ValueError" in err  # still a traceback, only masked
    structlog.reset_defaults()


def test_stdlib_records_are_masked(capsys: pytest.CaptureFixture[str]) -> None:
    import logging

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers.clear()
    try:
        configure_logging("info", "json")
        try:
            raise RuntimeError("Klaviyo-API-Key pk_stdlib0123456789 refused")
        except RuntimeError:
            logging.getLogger("some.library").exception("call failed with %s", "whsec_abcdefgh12345678")
        err = capsys.readouterr().err
    finally:
        root.handlers[:] = saved
        structlog.reset_defaults()
    assert "call failed with ***" in err
    assert "Klaviyo-API-Key ***" in err
    assert "stdlib0123456789" not in err
    assert "abcdefgh12345678" not in err
