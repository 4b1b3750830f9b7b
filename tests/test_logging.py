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
