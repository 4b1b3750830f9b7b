"""The ``reject_external_ids`` fault: chosen identities' writes are refused as Klaviyo refuses a bad item —
a 400 ``invalid`` whose pointer names the item (bulk requests all-or-nothing), an import error for that item
inside a profile bulk-import job while the rest of the job is imported."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from klaviyo_sandbox.client import SandboxClient, SandboxError
from klaviyo_sandbox.config import FaultConfig
from klaviyo_sandbox.faults import FaultInjector
from tests.sandbox import payloads
from tests.sandbox.conftest import assert_klaviyo_error, check_response

BAD = "bad-serial"


@pytest.fixture
def rejecting(sandbox: SandboxClient) -> Iterator[SandboxClient]:
    sandbox.set_faults(reject_external_ids=[BAD])
    yield sandbox
    sandbox.clear_faults()


def _bulk_events(external_ids: list[str]) -> dict[str, Any]:
    return {
        "data": {
            "type": "event-bulk-create-job",
            "attributes": {
                "events-bulk-create": {
                    "data": [
                        {
                            "type": "event-bulk-create",
                            "attributes": {
                                "profile": {"data": {"type": "profile", "attributes": {"external_id": x}}},
                                "events": {
                                    "data": [
                                        {
                                            "type": "event",
                                            "attributes": {
                                                "properties": {"n": 1},
                                                "unique_id": f"{x}-1",
                                                "metric": {
                                                    "data": {
                                                        "type": "metric",
                                                        "attributes": {"name": "Pass Updated"},
                                                    }
                                                },
                                            },
                                        }
                                    ]
                                },
                            },
                        }
                        for x in external_ids
                    ]
                }
            },
        }
    }


def _job(external_ids: list[str]) -> dict[str, Any]:
    return {
        "data": {
            "type": "profile-bulk-import-job",
            "attributes": {
                "profiles": {
                    "data": [{"type": "profile", "attributes": {"external_id": x}} for x in external_ids]
                }
            },
        }
    }


def test_single_profile_import_is_refused_with_a_pointer(api: httpx.Client, rejecting: SandboxClient) -> None:
    refused = api.post("/api/profile-import", json=payloads.profile_import(external_id=BAD, email="b@x.com"))
    error = assert_klaviyo_error(refused, 400, "invalid", pointer="/data/attributes/external_id")
    assert BAD in error["detail"]
    assert rejecting.profile(BAD) is None
    assert (
        api.post("/api/profile-import", json=payloads.profile_import(external_id="good")).status_code == 201
    )


def test_bulk_import_job_turns_the_item_into_an_import_error(
    api: httpx.Client, rejecting: SandboxClient
) -> None:
    created = api.post("/api/profile-bulk-import-jobs", json=_job(["good-a", BAD, "good-b"]))
    assert created.status_code == 202
    job_id = created.json()["data"]["id"]
    deadline = time.monotonic() + 5
    while True:
        attrs = api.get(f"/api/profile-bulk-import-jobs/{job_id}").json()["data"]["attributes"]
        if attrs["status"] == "complete" or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert (attrs["status"], attrs["completed_count"], attrs["failed_count"]) == ("complete", 2, 1)
    errors = check_response(
        "get_errors_for_bulk_import_profiles_job",
        api.get(f"/api/profile-bulk-import-jobs/{job_id}/import-errors"),
    )["data"]
    assert [(e["attributes"]["code"], e["attributes"]["source"]["pointer"]) for e in errors] == [
        ("invalid", "/data/attributes/profiles/data/1/attributes/external_id")
    ]
    assert errors[0]["attributes"]["original_payload"]["attributes"]["external_id"] == BAD
    assert rejecting.profile(BAD) is None
    assert rejecting.profile("good-a") is not None
    assert rejecting.profile("good-b") is not None


def _import_errors_of(api: httpx.Client, external_ids: list[str]) -> list[dict[str, Any]]:
    """Run a bulk-import job of those profiles to completion; its import errors (checked against the spec)."""
    job_id = api.post("/api/profile-bulk-import-jobs", json=_job(external_ids)).json()["data"]["id"]
    deadline = time.monotonic() + 5
    while (
        api.get(f"/api/profile-bulk-import-jobs/{job_id}").json()["data"]["attributes"]["status"]
        != "complete"
    ):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    errors: list[dict[str, Any]] = check_response(
        "get_errors_for_bulk_import_profiles_job",
        api.get(f"/api/profile-bulk-import-jobs/{job_id}/import-errors"),
    )["data"]
    return [e["attributes"] for e in errors]


@pytest.mark.parametrize(
    ("shape", "payload"),
    [("relative", {"external_id": BAD}), ("unnamed", None)],
)
def test_import_error_shape_words_import_errors_without_the_job_pointer(
    api: httpx.Client, sandbox: SandboxClient, shape: str, payload: dict[str, Any] | None
) -> None:
    assert (
        sandbox.set_faults(reject_external_ids=[BAD], import_error_shape=shape)["import_error_shape"] == shape
    )
    (error,) = _import_errors_of(api, ["good-a", BAD])
    assert error["source"] == {"pointer": "/data/attributes/external_id"}
    assert error.get("original_payload") == payload
    # A job created after the fault is cleared words its errors the default way again.
    sandbox.set_faults(reject_external_ids=[BAD])
    (error,) = _import_errors_of(api, [BAD])
    assert error["source"] == {"pointer": "/data/attributes/profiles/data/0/attributes/external_id"}
    with pytest.raises(SandboxError, match="import_error_shape"):
        sandbox.set_faults(import_error_shape="sideways")


def test_events_single_and_bulk_all_or_nothing(api: httpx.Client, rejecting: SandboxClient) -> None:
    assert_klaviyo_error(
        api.post("/api/events", json=payloads.event(external_id=BAD, unique_id="u1")),
        400,
        "invalid",
        pointer="/data/attributes/profile/data/attributes/external_id",
    )
    refused = api.post("/api/event-bulk-create-jobs", json=_bulk_events(["good-a", "good-b", BAD]))
    assert_klaviyo_error(
        refused,
        400,
        "invalid",
        pointer="/data/attributes/events-bulk-create/data/2/attributes/profile/data/attributes/external_id",
    )
    # Nothing of the refused request was stored, not even the good items.
    assert rejecting.all_events() == []
    assert api.post("/api/event-bulk-create-jobs", json=_bulk_events(["good-a", "good-b"])).status_code == 202
    rejecting.wait_idle()  # a bulk job is applied in the background, as on Klaviyo
    assert len(rejecting.all_events()) == 2


def test_records_single_and_bulk_by_serial_number(api: httpx.Client, rejecting: SandboxClient) -> None:
    ds = api.post("/api/data-sources", json=payloads.data_source()).json()["data"]["id"]
    api.post("/api/object-types", json=payloads.wallet_pass_type(ds))
    bad = {"pass_id": "p-bad", "serial_number": BAD, "status": "active"}
    good = [{"pass_id": f"p{i}", "serial_number": f"s{i}", "status": "active"} for i in range(3)]
    assert_klaviyo_error(
        api.post("/api/data-source-record-create-jobs", json=payloads.record_job(ds, bad)),
        400,
        "invalid",
        pointer="/data/attributes/data-source-record/data/attributes/record",
    )
    assert_klaviyo_error(
        api.post(
            "/api/data-source-record-bulk-create-jobs",
            json=payloads.bulk_record_job(ds, [good[0], bad, good[1]]),
        ),
        400,
        "invalid",
        pointer="/data/attributes/data-source-records/data/1/attributes/record",
    )
    # A record matched by its external_id is refused too.
    assert_klaviyo_error(
        api.post(
            "/api/data-source-record-create-jobs",
            json=payloads.record_job(ds, {"pass_id": "p9", "external_id": BAD, "status": "active"}),
        ),
        400,
        "invalid",
    )
    ok = api.post("/api/data-source-record-bulk-create-jobs", json=payloads.bulk_record_job(ds, good))
    assert ok.status_code == 204
    rejecting.wait_idle()
    ids = sorted(r["attributes"]["record_properties"]["pass_id"] for r in rejecting.object_records())
    assert ids == ["p0", "p1", "p2"]


def test_operations_filter_limits_the_rejection(api: httpx.Client, sandbox: SandboxClient) -> None:
    doc = sandbox.set_faults(reject_external_ids=[BAD, "another"], operations=["bulk_create_events"])
    assert doc["reject_external_ids"] == ["another", BAD]
    # The single endpoint accepts the identity the bulk endpoint refuses.
    assert api.post("/api/events", json=payloads.event(external_id=BAD, unique_id="u1")).status_code == 202
    assert api.post("/api/event-bulk-create-jobs", json=_bulk_events([BAD])).status_code == 400
    sandbox.clear_faults()
    assert api.post("/api/event-bulk-create-jobs", json=_bulk_events([BAD])).status_code == 202


def test_reject_operations_scope_the_rejection_apart_from_other_faults(
    api: httpx.Client, sandbox: SandboxClient
) -> None:
    # Status errors only on reads; rejections only on the bulk events endpoint.
    doc = sandbox.set_faults(
        error_rates={503: 1.0},
        operations=["get_profiles"],
        reject_external_ids=[BAD],
        reject_operations=["bulk_create_events"],
    )
    assert doc["reject_operations"] == ["bulk_create_events"]
    assert_klaviyo_error(api.get("/api/profiles"), 503, "error")
    assert api.post("/api/events", json=payloads.event(external_id=BAD, unique_id="u1")).status_code == 202
    assert_klaviyo_error(api.post("/api/event-bulk-create-jobs", json=_bulk_events([BAD])), 400, "invalid")


def test_control_api_checks_the_list(sandbox: SandboxClient) -> None:
    with pytest.raises(SandboxError, match="reject_external_ids must be a list"):
        sandbox._send("PUT", "/_sandbox/faults", {"reject_external_ids": "bad-serial"})
    with pytest.raises(SandboxError, match="reject_external_ids must be a list"):
        sandbox._send("PUT", "/_sandbox/faults", {"reject_external_ids": [1]})
    with pytest.raises(SandboxError, match="reject_operations must be a list"):
        sandbox._send("PUT", "/_sandbox/faults", {"reject_operations": "bulk_create_events"})
    assert sandbox._get("/_sandbox/faults")["reject_external_ids"] == []


def test_rejection_policy() -> None:
    injector = FaultInjector(
        FaultConfig(reject_external_ids=frozenset({BAD}), operations=frozenset({"create_event"})), now=0.0
    )
    assert injector.rejects("create_event", BAD)
    assert not injector.rejects("create_event", "other")
    assert not injector.rejects("bulk_create_events", BAD)
    assert not injector.rejects("create_event", None)
    scoped = FaultInjector(
        FaultConfig(
            reject_external_ids=frozenset({BAD}),
            operations=frozenset({"create_event"}),
            reject_operations=frozenset({"bulk_create_events"}),
        ),
        now=0.0,
    )
    assert scoped.rejects("bulk_create_events", BAD)
    assert not scoped.rejects("create_event", BAD)
    # Not a per-request fault: requests are not slowed down or drawn against.
    assert injector.active is False
