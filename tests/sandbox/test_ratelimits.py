"""Rate limits over real HTTP: 429 ``throttled`` with Retry-After, RateLimit-* headers, and admitted requests
within 2 % of the tier over five rate-scaled steady windows."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from klaviyo_sandbox.client import SandboxClient
from klaviyo_sandbox.testing import SandboxServer, start_sandbox
from tests.sandbox.conftest import KEY, assert_klaviyo_error, config, klaviyo_headers


@pytest.fixture
def limited() -> Iterator[SandboxServer]:
    server = start_sandbox(config(unlimited=False))
    yield server
    server.stop()


@pytest.fixture
def scaled() -> Iterator[SandboxServer]:
    server = start_sandbox(config(unlimited=False, rate_scale=60.0))
    yield server
    server.stop()


@pytest.fixture
def fast() -> Iterator[SandboxServer]:
    server = start_sandbox(config(unlimited=False, rate_scale=120.0, request_log_size=1_000_000))
    yield server
    server.stop()


def test_429_throttled_with_whole_second_retry_after(limited: SandboxServer) -> None:
    with httpx.Client(base_url=limited.url, headers=klaviyo_headers()) as api:
        ok = api.get("/api/accounts")  # XS tier: 1/s, 15/m
        assert ok.status_code == 200
        assert ok.headers["ratelimit-limit"] == "15, 1;w=1, 15;w=60"
        assert ok.headers["ratelimit-remaining"] == "0"
        throttled = api.get("/api/accounts")
        error = assert_klaviyo_error(throttled, 429, "throttled")
        assert throttled.headers["retry-after"] == "1"
        assert error["detail"] == "Request was throttled. Expected available in 1 second."
        assert "ratelimit-limit" not in throttled.headers
        # Another endpoint has its own budget.
        assert api.get("/api/profiles").status_code == 200


def test_rate_scale_divides_retry_after(scaled: SandboxServer) -> None:
    with httpx.Client(base_url=scaled.url, headers=klaviyo_headers()) as api:
        assert api.get("/api/accounts").status_code == 200
        # The scaled window is 1/60 s: on a busy machine two requests can land in different windows, so a
        # few are sent back to back; one of them must be refused.
        answers = [api.get("/api/accounts") for _ in range(5)]
        throttled = next((a for a in answers if a.status_code == 429), answers[-1])
        assert throttled.status_code == 429
        retry = float(throttled.headers["retry-after"])
        assert retry == pytest.approx(1 / 60, rel=1e-3)
        time.sleep(retry)
        assert api.get("/api/accounts").status_code == 200


def test_steady_windows_admit_within_two_percent_of_the_tier(fast: SandboxServer) -> None:
    """get_data_sources is 3/s, 60/m; at scale 120 the steady window is 0.5 s and the burst window 8.3 ms, so a
    window's 60 admissions need ~0.17 s of a client faster than 360 req/s. Hammer for > 5 windows, then read
    the server's admission times back from its request log."""
    scaled = fast
    window = 60 / 120.0
    steady = 60
    with httpx.Client(base_url=scaled.url, headers=klaviyo_headers()) as api:
        deadline = time.monotonic() + 5.3 * window
        while time.monotonic() < deadline:
            api.get("/api/data-sources")
    with SandboxClient(scaled.url, account="main") as sandbox:
        log = sandbox.requests(limit=100_000)["recent"]
    admitted = sorted(e["at"] for e in log if e["operation"] == "get_data_sources" and e["status"] == 200)
    throttled = [e for e in log if e["operation"] == "get_data_sources" and e["status"] == 429]
    assert throttled, "the client was not faster than the tier; the test proves nothing"
    t0 = admitted[0]
    in_five = [t for t in admitted if t < t0 + 5 * window]
    assert abs(len(in_five) - 5 * steady) <= 0.02 * 5 * steady, len(in_five)
    # No window of one steady period ever holds more than the tier (2 ms slack: log time vs admission time).
    for i in range(len(admitted) - steady):
        assert admitted[i + steady] - admitted[i] > window - 0.002


def test_unlimited_turns_limits_off(sandbox: SandboxClient, api: httpx.Client) -> None:
    statuses = {api.get("/api/accounts").status_code for _ in range(5)}
    assert statuses == {200}
    assert KEY
