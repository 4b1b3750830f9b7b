"""Wire rules every operation shares: auth, scopes, the revision header, paths with and without a trailing
slash, media types, malformed bodies, unknown routes and methods, payload caps."""

from __future__ import annotations

import httpx
import pytest

from klaviyo_sandbox.client import SandboxClient, SandboxError
from tests.sandbox import payloads
from tests.sandbox.conftest import READONLY_KEY, assert_klaviyo_error, check_response, klaviyo_headers


def test_wrong_scheme_and_unknown_key_are_authentication_failed(api: httpx.Client) -> None:
    for header in ("Klaviyo-API-Key nope", "Bearer not-a-token", "Basic abc", "pk_conformance_main"):
        response = api.get("/api/accounts", headers={"Authorization": header})
        error = assert_klaviyo_error(response, 401, "authentication_failed")
        assert error["title"] == "Incorrect authentication credentials."


def test_missing_authorization_is_401(api: httpx.Client) -> None:
    headers = klaviyo_headers()
    del headers["Authorization"]
    assert_klaviyo_error(httpx.get(f"{api.base_url}/api/profiles", headers=headers), 401, "not_authenticated")


def test_key_scopes_are_enforced_per_endpoint(api: httpx.Client) -> None:
    readonly = klaviyo_headers(READONLY_KEY)
    assert api.get("/api/profiles", headers=readonly).status_code == 200
    write = api.post("/api/profile-import", headers=readonly, json=payloads.profile_import(external_id="x"))
    assert_klaviyo_error(write, 403, "permission_denied")
    assert_klaviyo_error(api.get("/api/events", headers=readonly), 403, "permission_denied")


@pytest.mark.parametrize("revision", ["2026-07-15", "2026-10-15"])
def test_published_revisions_are_served(api: httpx.Client, revision: str) -> None:
    response = api.get("/api/accounts", headers={"revision": revision})
    check_response("get_accounts", response)


@pytest.mark.parametrize(
    "revision", ["", "latest", "2026-7-15", "2026-07-15-", "2026-02-30", "15-07-2026", "2026-07-15.beta!"]
)
def test_malformed_revision_is_400(api: httpx.Client, revision: str) -> None:
    error = assert_klaviyo_error(api.get("/api/profiles", headers={"revision": revision}), 400, "invalid")
    assert error["source"] == {"parameter": "revision"}


@pytest.mark.parametrize(
    ("path", "revision"),
    [
        ("/api/object-types", "2026-04-15"),  # object types GA in 2026-07-15
        ("/api/object-types", "2025-10-15"),
        ("/api/data-sources", "2025-04-15"),  # data sources since 2025-07-15
    ],
)
def test_revision_before_an_endpoint_existed_is_404(api: httpx.Client, path: str, revision: str) -> None:
    error = assert_klaviyo_error(api.get(path, headers={"revision": revision}), 404, "not_found")
    assert error["detail"] == "No valid revisions found for method"


def test_retired_revisions_fault_answers_as_klaviyo_does_once_it_stops_serving_one(
    api: httpx.Client, sandbox: SandboxClient
) -> None:
    doc = sandbox.set_faults(retired_revisions={"2026-10-15": 410, "2026-07-15": 404})
    assert doc["retired_revisions"] == {"2026-10-15": 410, "2026-07-15": 404}
    gone = assert_klaviyo_error(api.get("/api/accounts", headers={"revision": "2026-10-15"}), 410, "gone")
    assert gone["source"] == {"parameter": "revision"}
    unserved = assert_klaviyo_error(
        api.post("/api/events", json=payloads.event(), headers={"revision": "2026-07-15"}), 404, "not_found"
    )
    assert unserved["detail"] == "No valid revisions found for method"
    sandbox.clear_faults()
    assert api.get("/api/accounts", headers={"revision": "2026-10-15"}).status_code == 200
    with pytest.raises(SandboxError, match="retired_revisions"):
        sandbox.set_faults(retired_revisions={"2026-10-15": 500})


def test_record_job_revisions_follow_their_own_timeline(api: httpx.Client) -> None:
    body = payloads.record_job("01J7C23V8XWMRG13FMD7VZN6GW", {"pass_id": "p"})
    too_old = api.post("/api/data-source-record-create-jobs", json=body, headers={"revision": "2026-01-15"})
    assert_klaviyo_error(too_old, 404, "not_found")
    older = api.post("/api/data-source-record-create-jobs", json=body, headers={"revision": "2026-04-15"})
    assert "older than the sandbox emulates" in assert_klaviyo_error(older, 400, "invalid")["detail"]


@pytest.mark.parametrize("revision", ["2024-10-15", "2026-04-15", "2026-01-15.pre"])
def test_older_revisions_of_long_standing_endpoints_are_outside_emulation(
    api: httpx.Client, revision: str
) -> None:
    error = assert_klaviyo_error(api.get("/api/profiles", headers={"revision": revision}), 400, "invalid")
    assert "older than the sandbox emulates" in error["detail"]


@pytest.mark.parametrize("revision", ["2026-08-01", "2027-01-15", "2026-07-15.pre"])
def test_unpublished_or_future_revisions_are_400(api: httpx.Client, revision: str) -> None:
    error = assert_klaviyo_error(api.get("/api/profiles", headers={"revision": revision}), 400, "invalid")
    assert "not a published revision" in error["detail"]


def test_trailing_slash_and_both_json_media_types(api: httpx.Client) -> None:
    for path in ("/api/profile-import", "/api/profile-import/"):
        for media in ("application/vnd.api+json", "application/json", "application/json; charset=utf-8"):
            response = api.post(
                path, json=payloads.profile_import(external_id="a"), headers={"content-type": media}
            )
            assert response.status_code in (200, 201), response.text
    assert api.get("/api/profiles/").status_code == 200


def test_other_media_type_is_415(api: httpx.Client) -> None:
    response = api.post(
        "/api/profile-import", content=b'{"data": {}}', headers={"content-type": "text/plain"}
    )
    assert_klaviyo_error(response, 415, "unsupported_media_type")


def test_malformed_json_is_400_parse_error(api: httpx.Client) -> None:
    assert_klaviyo_error(api.post("/api/events", content=b'{"data": '), 400, "parse_error")
    # A bulk-sized body is parsed and checked off the event loop: the same answers.
    big = b'{"data": {"attributes": {"pad": "' + b"x" * 100_000 + b'"}'
    assert_klaviyo_error(api.post("/api/event-bulk-create-jobs", content=big), 400, "parse_error")
    missing = {"data": {"type": "event-bulk-create-job", "attributes": {"pad": "x" * 100_000}}}
    response = api.post("/api/event-bulk-create-jobs", json=missing)
    assert_klaviyo_error(response, 400, "invalid", "/data/attributes/events-bulk-create")


def test_unknown_route_is_404_and_wrong_method_is_405(api: httpx.Client) -> None:
    assert_klaviyo_error(api.get("/api/nothing-here"), 404, "not_found")
    response = api.delete("/api/profiles")
    assert_klaviyo_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "GET, POST"


def test_payload_cap_is_413(api: httpx.Client) -> None:
    big = payloads.profile_import(external_id="x", properties={"blob": "x" * (101 * 1024)})
    assert_klaviyo_error(api.post("/api/profile-import", json=big), 413, "request_too_large")


def test_schema_violations_name_the_field(api: httpx.Client) -> None:
    wrong_type = api.post("/api/profile-import", json=payloads.profile_import(email=5))
    error = assert_klaviyo_error(wrong_type, 400, "invalid", "/data/attributes/email")
    assert error["title"] == "Invalid input."
    missing = api.post("/api/events", json={"data": {"type": "event", "attributes": {"properties": {}}}})
    assert_klaviyo_error(missing, 400, "invalid", "/data/attributes/metric")
    wrong_enum = api.post("/api/profile-import", json={"data": {"type": "profiles", "attributes": {}}})
    assert_klaviyo_error(wrong_enum, 400, "invalid", "/data/type")
    assert_klaviyo_error(api.post("/api/events", json=[]), 400, "invalid")


def test_query_parameters_are_validated(api: httpx.Client) -> None:
    too_big = api.get("/api/profiles", params={"page[size]": "101"})
    assert assert_klaviyo_error(too_big, 400, "invalid")["source"] == {"parameter": "page[size]"}
    not_int = api.get("/api/profiles", params={"page[size]": "ten"})
    assert assert_klaviyo_error(not_int, 400, "invalid")["source"] == {"parameter": "page[size]"}
    bad_field = api.get("/api/profiles", params={"fields[profile]": "email,shoe_size"})
    assert '"shoe_size"' in assert_klaviyo_error(bad_field, 400, "invalid")["detail"]
    bad_sort = api.get("/api/events", params={"sort": "random"})
    assert_klaviyo_error(bad_sort, 400, "invalid")


def test_every_request_is_in_the_request_log(api: httpx.Client, sandbox: SandboxClient) -> None:
    api.get("/api/profiles")
    api.get("/api/profiles", headers={"Authorization": "Klaviyo-API-Key wrong"})
    api.get("/api/nope")
    summary = sandbox.requests()
    assert summary["counts"]["get_profiles"] == {"200": 1, "401": 1}
    assert summary["counts"]["unknown"] == {"404": 1}
    assert all("Klaviyo-API-Key" not in str(entry) for entry in summary["recent"])


def test_accounts_for_connection_checks(api: httpx.Client) -> None:
    listed = check_response("get_accounts", api.get("/api/accounts"))
    assert [a["id"] for a in listed["data"]] == ["main"]
    check_response("get_account", api.get("/api/accounts/main/"))
    assert_klaviyo_error(api.get("/api/accounts/basic"), 404, "not_found")  # another account is not visible
