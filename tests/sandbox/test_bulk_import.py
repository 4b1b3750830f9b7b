"""Profile bulk-import jobs: queued → processing → complete, import errors per item, the job's profiles."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from klaviyo_sandbox.client import SandboxClient
from klaviyo_sandbox.testing import start_sandbox
from tests.sandbox.conftest import assert_klaviyo_error, check_response, config, klaviyo_headers


def _job(profiles: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "data": {
            "type": "profile-bulk-import-job",
            "attributes": {"profiles": {"data": [{"type": "profile", "attributes": p} for p in profiles]}},
        }
    }


def test_job_lifecycle_and_import_errors(api: httpx.Client, sandbox: SandboxClient) -> None:
    api.post(
        "/api/profile-import",
        json={
            "data": {"type": "profile", "attributes": {"external_id": "owner", "email": "taken@example.com"}}
        },
    )
    profiles = [
        {"external_id": "s1", "email": "s1@example.com"},
        {"external_id": "s2", "email": "bad-email"},
        {"external_id": "s3", "email": "taken@example.com"},
        {"external_id": "s4", "phone_number": "+14155550123"},
    ]
    created = api.post("/api/profile-bulk-import-jobs", json=_job(profiles))
    assert created.status_code == 202
    job = check_response("bulk_import_profiles", created)["data"]
    assert job["attributes"]["status"] == "queued"
    assert job["attributes"]["total_count"] == 4
    statuses = {job["attributes"]["status"]}
    deadline = time.monotonic() + 5
    while "complete" not in statuses and time.monotonic() < deadline:
        got = check_response(
            "get_bulk_import_profiles_job", api.get(f"/api/profile-bulk-import-jobs/{job['id']}")
        )
        statuses.add(got["data"]["attributes"]["status"])
        time.sleep(0.01)
    assert statuses == {"queued", "processing", "complete"}
    final = api.get(f"/api/profile-bulk-import-jobs/{job['id']}/").json()["data"]["attributes"]
    assert (final["completed_count"], final["failed_count"]) == (2, 2)
    assert final["completed_at"] is not None
    errors = check_response(
        "get_errors_for_bulk_import_profiles_job",
        api.get(f"/api/profile-bulk-import-jobs/{job['id']}/import-errors"),
    )["data"]
    assert [(e["attributes"]["code"], e["attributes"]["source"]["pointer"]) for e in errors] == [
        ("invalid", "/data/attributes/profiles/data/1/attributes/email"),
        ("duplicate_profile", "/data/attributes/profiles/data/2/attributes"),
    ]
    assert errors[1]["attributes"]["original_payload"]["attributes"]["external_id"] == "s3"
    listed = check_response(
        "get_profiles_for_bulk_import_profiles_job",
        api.get(f"/api/profile-bulk-import-jobs/{job['id']}/profiles"),
    )
    assert sorted(p["attributes"]["external_id"] for p in listed["data"]) == ["s1", "s4"]
    jobs = check_response(
        "get_bulk_import_profiles_jobs",
        api.get("/api/profile-bulk-import-jobs", params={"filter": 'equals(status,"complete")'}),
    )
    assert [j["id"] for j in jobs["data"]] == [job["id"]]
    assert sandbox.profile("s4") is not None


def test_job_limits_and_unknown_job(api: httpx.Client) -> None:
    too_many = _job([{"external_id": f"s{i}"} for i in range(10_001)])
    error = assert_klaviyo_error(api.post("/api/profile-bulk-import-jobs", json=too_many), 400, "invalid")
    assert "10000" in error["detail"]
    assert_klaviyo_error(api.get("/api/profile-bulk-import-jobs/nope"), 404, "not_found")


def test_job_latency_is_rate_scaled_with_jitter() -> None:
    """``job_latency_s`` is Klaviyo time: at rate scale 100, 100 Klaviyo seconds (+ up to 50 of jitter) are
    1–1.5 wall seconds, half of it queued and half processing."""
    server = start_sandbox(
        config(unlimited=False, rate_scale=100, job_latency_s=100, job_latency_jitter_s=50)
    )
    try:
        with httpx.Client(base_url=server.url, headers=klaviyo_headers(), timeout=10) as api:
            started = time.monotonic()
            job = api.post("/api/profile-bulk-import-jobs", json=_job([{"external_id": "s1"}])).json()["data"]
            seen: list[str] = []
            while True:
                doc = api.get(f"/api/profile-bulk-import-jobs/{job['id']}").json()["data"]
                status = doc["attributes"]["status"]
                if not seen or seen[-1] != status:
                    seen.append(status)
                if status == "complete":
                    break
                assert time.monotonic() - started < 5, seen
                time.sleep(0.05)
            took = time.monotonic() - started
    finally:
        server.stop()
    assert seen == ["queued", "processing", "complete"]
    # Two job steps of 0.1 s plus 1–1.5 s of scaled latency.
    assert 1.0 <= took <= 1.7 + 0.3, took
    with pytest.raises(ValueError, match="job_latency_s"):
        config(job_latency_s=-1)
