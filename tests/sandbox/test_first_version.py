"""The core loop a client relies on: API-key auth, revision header, profile import, events, record ingestion,
object records, inspection and reset, against a live sandbox over HTTP."""

from __future__ import annotations

import httpx

from klaviyo_sandbox.client import SandboxClient
from tests.sandbox import payloads
from tests.sandbox.conftest import assert_klaviyo_error, check_response, klaviyo_headers


def test_profile_import_creates_then_updates_null_clears_omitted_keeps(api: httpx.Client) -> None:
    created = api.post(
        "/api/profile-import",
        json=payloads.profile_import(
            external_id="serial-1", email="ada@example.com", first_name="Ada", title="Dr"
        ),
    )
    assert created.status_code == 201
    profile = check_response("create_or_update_profile", created)["data"]
    updated = api.post(
        "/api/profile-import/",
        json=payloads.profile_import(external_id="serial-1", first_name=None, last_name="L"),
    )
    assert updated.status_code == 200
    attrs = check_response("create_or_update_profile", updated)["data"]["attributes"]
    assert updated.json()["data"]["id"] == profile["id"]
    assert attrs["first_name"] is None  # null clears
    assert attrs["title"] == "Dr"
    assert attrs["email"] == "ada@example.com"
    assert attrs["last_name"] == "L"


def test_events_by_external_id_resolve_the_profile_and_dedupe(
    api: httpx.Client, sandbox: SandboxClient
) -> None:
    api.post("/api/profile-import", json=payloads.profile_import(external_id="serial-1"))
    body = payloads.event("Pass Installed", unique_id="e-1", time="2026-07-01T12:00:00+00:00")
    first = api.post("/api/events", json=body)
    again = api.post("/api/events", json=body)
    assert first.status_code == again.status_code == 202
    assert first.content == b""
    check_response("create_event", first)
    profile = sandbox.profile("serial-1")
    assert profile is not None
    events = sandbox.events(profile["id"])
    assert [e["attributes"]["event_properties"]["$event_id"] for e in events] == ["e-1"]
    assert len(sandbox.profiles()) == 1


def test_data_source_records_are_ingested_asynchronously(api: httpx.Client, sandbox: SandboxClient) -> None:
    ds = api.post("/api/data-sources", json=payloads.data_source()).json()["data"]["id"]
    obj = api.post("/api/object-types", json=payloads.wallet_pass_type(ds))
    type_id = check_response("create_object_type", obj)["data"]["id"]
    job = api.post(
        "/api/data-source-record-create-jobs",
        json=payloads.record_job(ds, {"pass_id": "p1", "status": "active", "points": 3}),
    )
    assert job.status_code == 204
    assert job.content == b""
    bad = api.post(
        "/api/data-source-record-create-jobs", json=payloads.record_job(ds, {"pass_id": "p2", "points": "x"})
    )
    assert bad.status_code == 204  # invalid records fail only in the ingestion log
    sandbox.wait_idle()
    record = api.get(f"/api/object-records/{type_id}:::p1")
    assert check_response("get_object_record", record)["data"]["attributes"]["record_properties"] == {
        "pass_id": "p1",
        "status": "active",
        "points": 3,
    }
    listing = check_response(
        "get_records_for_object_type", api.get(f"/api/object-types/{type_id}/object-records")
    )
    assert [r["id"] for r in listing["data"]] == [f"{type_id}:::p1"]
    logs = sandbox.ingestion_logs()
    assert len(logs) == 1
    assert {e["property"] for e in logs[0]["attributes"]["errors"]} == {"points", "status"}


def test_missing_or_bad_key_is_401(api: httpx.Client) -> None:
    bad = api.get("/api/accounts", headers={"Authorization": "Klaviyo-API-Key pk_nope"})
    assert_klaviyo_error(bad, 401, "authentication_failed")
    headers = klaviyo_headers()
    del headers["Authorization"]
    missing = httpx.get(f"{api.base_url}/api/accounts", headers=headers)
    assert missing.status_code == 401


def test_revision_header_is_required(api: httpx.Client) -> None:
    headers = klaviyo_headers(revision=None)
    response = httpx.get(f"{api.base_url}/api/accounts", headers=headers)
    error = assert_klaviyo_error(response, 400, "invalid")
    assert "revision" in error["detail"]


def test_request_log_counts_and_reset(api: httpx.Client, sandbox: SandboxClient) -> None:
    api.get("/api/accounts")
    api.get("/api/accounts", headers={"revision": "nope"})
    assert sandbox.count("get_accounts", 200) == 1
    assert sandbox.count("get_accounts", 400) == 1
    sandbox.reset()
    assert sandbox.count("get_accounts") == 0
