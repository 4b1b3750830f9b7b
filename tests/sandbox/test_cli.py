"""``passbridge sandbox`` as a user runs it: a real process, flags, clean errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from klaviyo_sandbox.config import account_id_for_key
from klaviyo_sandbox.testing import free_port
from passbridge.cli.main import app

PASSBRIDGE = [str(Path(sys.executable).parent / "passbridge")]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--error-rate", "404=1"], "--error-rate"),
        (["--rate-scale", "0"], "--rate-scale"),
        (["--outage", "soon"], "--outage"),
        (["--oauth-client", "id:secret"], "needs an account"),
        (["--api-key", "pk_a", "--api-key", "pk_a"], "once"),
    ],
)
def test_bad_flags_exit_non_zero_with_a_message(args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["sandbox", *args])
    assert result.exit_code != 0
    assert message in result.stderr


def test_serves_accounts_for_each_api_key_with_scaled_limits(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "PASSBRIDGE_STATE_DIR": str(tmp_path)}
    proc = subprocess.Popen(
        [
            *PASSBRIDGE,
            "sandbox",
            "--port",
            str(port),
            "--api-key",
            "pk_cli_one",
            "--api-key",
            "pk_cli_two",
            "--rate-scale",
            # GET /api/accounts allows 1 request a second: at ×2 the burst window is 0.5 s, which two
            # back-to-back requests stay inside even on a loaded machine (at ×10 the 0.1 s window did not).
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{base}/_sandbox/health", timeout=0.5)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail("sandbox did not start")
                time.sleep(0.1)
        for key in ("pk_cli_one", "pk_cli_two"):
            headers = {"Authorization": f"Klaviyo-API-Key {key}", "revision": "2026-10-15"}
            with httpx.Client(base_url=base, headers=headers) as http:
                first = http.get("/api/accounts/")
                assert first.json()["data"][0]["id"] == account_id_for_key(key)
                throttled = http.get("/api/accounts/")
            assert throttled.status_code == 429
            assert throttled.headers["retry-after"] == "0.5"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert b"pk_cli" not in err  # keys never printed
