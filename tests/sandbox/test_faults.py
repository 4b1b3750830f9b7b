"""Faults on demand through the control API: error statuses, latency, hung requests, dropped connections
(before and after the write), scheduled outages."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from klaviyo_sandbox.client import SandboxClient, SandboxError
from klaviyo_sandbox.config import FaultConfig, Outage
from klaviyo_sandbox.faults import FaultInjector
from tests.sandbox import payloads
from tests.sandbox.conftest import assert_klaviyo_error

#: A dropped connection reaches the client as a closed stream or, when the close races the request's last
#: bytes, as a reset: both mean "no answer".
DROPPED = (httpx.RemoteProtocolError, httpx.ReadError)


@pytest.fixture
def faults(sandbox: SandboxClient) -> Iterator[SandboxClient]:
    yield sandbox
    sandbox.clear_faults()


def test_error_rates_per_operation(api: httpx.Client, faults: SandboxClient) -> None:
    faults.set_faults(error_rates={503: 1.0}, operations=["create_event"])
    assert_klaviyo_error(api.post("/api/events", json=payloads.event()), 503, "error")
    assert api.get("/api/profiles").status_code == 200
    assert faults.count("create_event", 503) == 1
    faults.set_faults(error_rates={500: 0.5, 502: 0.5}, seed=7)
    statuses = {api.get("/api/profiles").status_code for _ in range(40)}
    assert statuses == {500, 502, 200}


def test_injected_throttle_looks_like_klaviyos(api: httpx.Client, faults: SandboxClient) -> None:
    faults.set_faults(error_rates={429: 1.0}, operations=["create_event"])
    r = api.post("/api/events", json=payloads.event())
    assert_klaviyo_error(r, 429, "throttled")
    assert float(r.headers["retry-after"]) > 0
    assert faults.count("create_event", 429) == 1


def test_latency(api: httpx.Client, faults: SandboxClient) -> None:
    faults.set_faults(latency_ms=80, jitter_ms=20)
    started = time.perf_counter()
    assert api.get("/api/profiles").status_code == 200
    assert 0.08 <= time.perf_counter() - started < 1.0


def test_hung_request_never_answers(api: httpx.Client, faults: SandboxClient) -> None:
    faults.set_faults(hang_rate=1.0)
    with pytest.raises(httpx.ReadTimeout):
        api.get("/api/profiles", timeout=0.3)
    faults.clear_faults()
    assert api.get("/api/profiles").status_code == 200


def test_dropped_connection_before_and_after_processing(api: httpx.Client, faults: SandboxClient) -> None:
    faults.set_faults(drop_rate=1.0, operations=["create_event"])
    with pytest.raises(DROPPED):
        api.post("/api/events", json=payloads.event(unique_id="lost"))
    assert faults.profiles() == []  # dropped before the write
    faults.set_faults(drop_rate=1.0, drop_after_processing=True, operations=["create_event"])
    with pytest.raises(DROPPED):
        api.post("/api/events", json=payloads.event(unique_id="written"))
    profile = faults.profile("serial-1")
    assert profile is not None
    assert [e["attributes"]["event_properties"]["$event_id"] for e in faults.events(profile["id"])] == [
        "written"
    ]
    faults.clear_faults()
    assert api.post("/api/events", json=payloads.event(unique_id="written")).status_code == 202


def test_scheduled_outage(api: httpx.Client, faults: SandboxClient) -> None:
    faults.add_outage(duration_s=0.3, start_in_s=0.0, status=504)
    assert_klaviyo_error(api.get("/api/profiles"), 504, "error")
    time.sleep(0.35)
    assert api.get("/api/profiles").status_code == 200
    faults.add_outage(duration_s=0.3, status=0)
    with pytest.raises(DROPPED):
        api.get("/api/profiles")


def test_control_api_rejects_bad_fault_config(faults: SandboxClient) -> None:
    with pytest.raises(SandboxError, match="unknown fault fields"):
        faults.set_faults(explode=True)
    with pytest.raises(SandboxError, match="bad outage"):
        faults._send("POST", "/_sandbox/outages", {"start_in_s": 0})
    assert faults.set_faults(latency_ms=5)["latency_ms"] == 5


def test_fault_policy_is_seeded_and_outages_win() -> None:
    config = FaultConfig(error_rates=((503, 0.5),), seed=3, outages=(Outage(10, 5, 502),))
    a = FaultInjector(config, now=0.0)
    b = FaultInjector(config, now=0.0)
    seq_a = [a.decide("op", 1.0) for _ in range(20)]
    assert seq_a == [b.decide("op", 1.0) for _ in range(20)]
    assert {f.status if f else 0 for f in seq_a} == {0, 503}
    outage = a.decide("op", 12.0)
    assert outage is not None
    assert outage.status == 502
    assert FaultInjector(FaultConfig(), 0.0).active is False
