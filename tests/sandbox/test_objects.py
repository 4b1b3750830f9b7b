"""Custom Objects: data sources, object types (403 without the entitlement), schemas, source mappings, the
profile relationship, asynchronous record ingestion (single and bulk), records, ingestion logs."""

from __future__ import annotations

from typing import Any

import httpx

from klaviyo_sandbox.client import SandboxClient
from klaviyo_sandbox.testing import start_sandbox
from tests.sandbox import payloads
from tests.sandbox.conftest import (
    NO_OBJECTS_KEY,
    assert_klaviyo_error,
    check_response,
    config,
    klaviyo_headers,
)


def _setup(api: httpx.Client, status: str = "active") -> tuple[str, str]:
    ds = check_response("create_data_source", api.post("/api/data-sources", json=payloads.data_source()))[
        "data"
    ]["id"]
    type_id = api.post("/api/object-types", json=payloads.wallet_pass_type(ds, status=status)).json()["data"][
        "id"
    ]
    return ds, type_id


def _records(api: httpx.Client, type_id: str) -> dict[str, dict[str, Any]]:
    body = check_response(
        "get_records_for_object_type", api.get(f"/api/object-types/{type_id}/object-records")
    )
    return {r["id"].split(":::")[1]: r["attributes"]["record_properties"] for r in body["data"]}


def test_data_sources(api: httpx.Client) -> None:
    created = api.post("/api/data-sources", json=payloads.data_source("passes"))
    assert created.status_code == 201
    ds = check_response("create_data_source", created)["data"]
    assert len(ds["id"]) == 26
    assert ds["attributes"] == {
        "title": "passes",
        "visibility": "private",
        "description": "",
        "namespace": "custom-objects",
    }
    assert_klaviyo_error(api.post("/api/data-sources", json=payloads.data_source("passes")), 409, "conflict")
    assert_klaviyo_error(
        api.post("/api/data-sources", json={"data": {"type": "data-source", "attributes": {}}}),
        400,
        "invalid",
        "/data/attributes/title",
    )
    check_response("get_data_source", api.get(f"/api/data-sources/{ds['id']}"))
    assert [d["id"] for d in check_response("get_data_sources", api.get("/api/data-sources"))["data"]] == [
        ds["id"]
    ]
    check_response("delete_data_source", api.delete(f"/api/data-sources/{ds['id']}"))
    assert_klaviyo_error(api.get(f"/api/data-sources/{ds['id']}"), 404, "not_found")


def test_object_type_needs_the_entitlement(api: httpx.Client) -> None:
    headers = klaviyo_headers(NO_OBJECTS_KEY)
    ds = api.post("/api/data-sources", json=payloads.data_source(), headers=headers)
    assert ds.status_code == 201  # data sources work without the entitlement (observed)
    denied = api.post(
        "/api/object-types", json=payloads.wallet_pass_type(ds.json()["data"]["id"]), headers=headers
    )
    error = assert_klaviyo_error(denied, 403, "forbidden")
    assert error["detail"] == "Entitlement to create object type not found."


def test_object_type_with_inline_schema_and_mapping(api: httpx.Client) -> None:
    ds, type_id = _setup(api)
    t = check_response("get_object_type", api.get(f"/api/object-types/{type_id}"))["data"]
    assert t["attributes"]["status"] == "active"
    schema_id = t["relationships"]["current-schema"]["data"]["id"]
    schema = check_response(
        "get_current_schema_for_object_type", api.get(f"/api/object-types/{type_id}/current-schema")
    )
    assert schema["data"]["id"] == schema_id
    assert [p["name"] for p in schema["data"]["attributes"]["properties"]] == [
        "pass_id",
        "status",
        "points",
        "updated_at",
    ]
    assert_klaviyo_error(api.get(f"/api/object-types/{type_id}/draft-schema"), 404, "not_found")
    mapping = check_response(
        "get_source_mapping_for_object_schema", api.get(f"/api/object-schemas/{schema_id}/source-mapping")
    )
    assert len(mapping["data"]["attributes"]["property_mappings"]) == 4
    check_response("get_source_mapping", api.get(f"/api/source-mappings/{mapping['data']['id']}"))
    listed = check_response(
        "get_object_types",
        api.get("/api/object-types", params={"filter": 'equals(namespace,"custom-objects")'}),
    )
    assert [x["id"] for x in listed["data"]] == [type_id]
    assert_klaviyo_error(api.post("/api/object-types", json=payloads.wallet_pass_type(ds)), 409, "conflict")
    bad_source = payloads.wallet_pass_type("no-such-source", title="Other")
    assert_klaviyo_error(api.post("/api/object-types", json=bad_source), 400, "invalid")


def test_publish_delay_keeps_a_published_schema_publishing_before_it_is_active() -> None:
    server = start_sandbox(config(publish_delay_s=0.5))
    try:
        with (
            httpx.Client(base_url=server.url, headers=klaviyo_headers(), timeout=10) as api,
            SandboxClient(server.url, account="main") as sandbox,
        ):
            ds, type_id = _setup(api, status="draft")
            schema_id = api.get(f"/api/object-types/{type_id}/draft-schema").json()["data"]["id"]
            patch = {"data": {"type": "object-schema", "id": schema_id, "attributes": {"status": "active"}}}
            published = check_response(
                "update_object_schema", api.patch(f"/api/object-schemas/{schema_id}", json=patch)
            )
            assert published["data"]["attributes"]["status"] == "publishing"
            object_type = check_response("get_object_type", api.get(f"/api/object-types/{type_id}"))
            assert object_type["data"]["attributes"]["status"] == "publishing"
            # While it is publishing it cannot be edited, and records are not processed through it.
            assert_klaviyo_error(api.patch(f"/api/object-schemas/{schema_id}", json=patch), 400, "invalid")
            record = {"pass_id": "p0", "status": "x"}
            api.post("/api/data-source-record-create-jobs", json=payloads.record_job(ds, record))
            sandbox.wait_idle()  # the publishing delay is background work too
            assert _records(api, type_id) == {}
            schema = check_response("get_object_schema", api.get(f"/api/object-schemas/{schema_id}"))
            assert schema["data"]["attributes"]["status"] == "active"
            api.post("/api/data-source-record-create-jobs", json=payloads.record_job(ds, record))
            sandbox.wait_idle()
            assert list(_records(api, type_id)) == ["p0"]
    finally:
        server.stop()


def test_relationship_linkage_without_meta_has_the_specs_shape() -> None:
    server = start_sandbox(config(relationship_linkage_meta=False))
    try:
        with httpx.Client(base_url=server.url, headers=klaviyo_headers(), timeout=10) as api:
            _, type_id = _setup(api)
            schema_id = api.get(f"/api/object-types/{type_id}/current-schema").json()["data"]["id"]
            rel_path = f"/api/object-schemas/{schema_id}/relationships/profile-object-schemas"
            body = {"data": [{"type": "profile-object-schema", "id": "profile", "meta": {"name": "owner"}}]}
            assert api.post(rel_path, json=body).status_code == 204
            listed = check_response("get_profile_schema_relationships", api.get(rel_path))
            assert listed["data"] == [{"type": "profile-object-schema", "id": "profile"}]
            included = api.get(
                f"/api/object-schemas/{schema_id}", params={"include": "profile-object-schemas"}
            )
            assert included.json()["included"][0]["attributes"]["meta"]["relationship_id"]
    finally:
        server.stop()


def test_draft_schema_is_edited_then_published(api: httpx.Client, sandbox: SandboxClient) -> None:
    ds, type_id = _setup(api, status="draft")
    schema_id = check_response(
        "get_draft_schema_for_object_type", api.get(f"/api/object-types/{type_id}/draft-schema")
    )["data"]["id"]
    api.post(
        "/api/data-source-record-create-jobs", json=payloads.record_job(ds, {"pass_id": "p0", "status": "x"})
    )
    sandbox.wait_idle()
    assert _records(api, type_id) == {}  # a draft schema ingests nothing
    patch = {
        "data": {
            "type": "object-schema",
            "id": schema_id,
            "attributes": {"required": ["pass_id"], "status": "active"},
        }
    }
    published = check_response(
        "update_object_schema", api.patch(f"/api/object-schemas/{schema_id}", json=patch)
    )
    assert published["data"]["attributes"]["status"] == "active"
    again = api.patch(f"/api/object-schemas/{schema_id}", json=patch)
    assert "draft" in assert_klaviyo_error(again, 400, "invalid")["detail"]
    check_response("get_object_schema", api.get(f"/api/object-schemas/{schema_id}"))
    new = {
        "data": {
            "type": "object-schema",
            "attributes": {
                "title": "WalletPass v2",
                "properties": [{"id": 1, "name": "pass_id", "type": "string"}],
            },
            "relationships": {"object-type": {"data": {"type": "object-type", "id": type_id}}},
        }
    }
    created = api.post("/api/object-schemas", json=new)
    assert check_response("create_object_schema", created)["data"]["attributes"]["status"] == "draft"
    dup = {
        "data": {
            "type": "object-schema",
            "attributes": {
                "title": "t",
                "properties": [
                    {"id": 1, "name": "a", "type": "string"},
                    {"id": 1, "name": "b", "type": "int"},
                ],
            },
            "relationships": {"object-type": {"data": {"type": "object-type", "id": type_id}}},
        }
    }
    assert_klaviyo_error(api.post("/api/object-schemas", json=dup), 400, "invalid")


def test_records_ingest_asynchronously_replace_and_log_failures(
    api: httpx.Client, sandbox: SandboxClient
) -> None:
    ds, type_id = _setup(api)
    first = api.post(
        "/api/data-source-record-create-jobs",
        json=payloads.record_job(
            ds, {"pass_id": "p1", "status": "active", "points": 1, "updated_at": "2026-07-01T00:00:00Z"}
        ),
    )
    assert first.status_code == 204
    check_response("create_data_source_record", first)
    sandbox.wait_idle()
    api.post(
        "/api/data-source-record-create-jobs",
        json=payloads.record_job(ds, {"pass_id": "p1", "status": "deleted"}),
    )
    api.post(
        "/api/data-source-record-create-jobs", json=payloads.record_job(ds, {"pass_id": "p2", "status": 7})
    )
    api.post("/api/data-source-record-create-jobs", json=payloads.record_job(ds, {"status": "active"}))
    sandbox.wait_idle()
    assert _records(api, type_id) == {"p1": {"pass_id": "p1", "status": "deleted"}}  # a full replace
    logs = check_response(
        "get_ingestion_logs_for_object_type", api.get(f"/api/object-types/{type_id}/object-ingestion-logs")
    )
    assert len(logs["data"]) == 2
    newest = logs["data"][0]["attributes"]
    assert newest["status"] == "error"
    assert newest["event_type"] == "validation_error"
    assert {e["property"] for e in newest["errors"]} == {"id", "pass_id"}
    assert [e["property"] for e in logs["data"][1]["attributes"]["errors"]] == ["status"]
    assert sandbox.ingestion_logs()[0]["record"] == {"pass_id": "p2", "status": 7}


def test_bulk_records(api: httpx.Client, sandbox: SandboxClient) -> None:
    ds, type_id = _setup(api)
    records = [{"pass_id": f"p{i}", "status": "active", "points": i} for i in range(500)]
    response = api.post(
        "/api/data-source-record-bulk-create-jobs", json=payloads.bulk_record_job(ds, records)
    )
    assert response.status_code == 204
    check_response("bulk_create_data_source_records", response)
    too_many = payloads.bulk_record_job(ds, [*records, {"pass_id": "x"}])
    assert_klaviyo_error(api.post("/api/data-source-record-bulk-create-jobs", json=too_many), 400, "invalid")
    unknown = api.post(
        "/api/data-source-record-bulk-create-jobs",
        json=payloads.bulk_record_job("01J0000000000000000000000X", records[:1]),
    )
    assert_klaviyo_error(unknown, 404, "not_found")
    no_rel = payloads.bulk_record_job(ds, records[:1])
    del no_rel["data"]["relationships"]
    assert_klaviyo_error(api.post("/api/data-source-record-bulk-create-jobs", json=no_rel), 400, "invalid")
    sandbox.wait_idle()
    page = check_response(
        "get_records_for_object_type",
        api.get(f"/api/object-types/{type_id}/object-records", params={"page[size]": "100"}),
    )
    assert len(page["data"]) == 100
    assert page["links"]["next"]
    assert len(sandbox.object_records(object_type="WalletPass")) == 500
    one = check_response("get_object_record", api.get(f"/api/object-records/{type_id}:::p7"))
    assert one["data"]["attributes"]["record_properties"]["points"] == 7
    assert_klaviyo_error(api.get(f"/api/object-records/{type_id}:::nope"), 404, "not_found")
    assert_klaviyo_error(api.get("/api/object-records/no-separator"), 400, "invalid")
    delete = {
        "data": {
            "type": "object-record-bulk-delete-job",
            "relationships": {
                "object-records": {"data": [{"type": "object-record", "id": f"{type_id}:::p7"}]}
            },
        }
    }
    deleted = api.post("/api/object-record-bulk-delete-jobs", json=delete)
    assert deleted.status_code == 202, deleted.text
    check_response("bulk_delete_object_records", deleted)
    sandbox.wait_idle()
    assert_klaviyo_error(api.get(f"/api/object-records/{type_id}:::p7"), 404, "not_found")


def test_profile_relationship_links_records_to_profiles(api: httpx.Client, sandbox: SandboxClient) -> None:
    ds, type_id = _setup(api)
    schema_id = api.get(f"/api/object-types/{type_id}").json()["data"]["relationships"]["current-schema"][
        "data"
    ]["id"]
    rel_path = f"/api/object-schemas/{schema_id}/relationships/profile-object-schemas"
    body = {"data": [{"type": "profile-object-schema", "id": "profile", "meta": {"name": "owner"}}]}
    created = api.post(rel_path, json=body)
    assert created.status_code == 204
    check_response("create_profile_schema_relationship", created)
    listed = check_response("get_profile_schema_relationships", api.get(rel_path))
    rel_id = listed["data"][0]["meta"]["relationship_id"]
    # The spec documents the id in the schema's included profile relationships.
    plain = check_response("get_object_schema", api.get(f"/api/object-schemas/{schema_id}"))
    assert "included" not in plain
    with_included = check_response(
        "get_object_schema",
        api.get(f"/api/object-schemas/{schema_id}", params={"include": "profile-object-schemas"}),
    )
    assert [(i["type"], i["id"], i["attributes"]["meta"]) for i in with_included["included"]] == [
        ("profile-object-schema", "profile", {"relationship_id": rel_id, "name": "owner", "description": ""})
    ]
    mapping_id = api.get(f"/api/object-schemas/{schema_id}/source-mapping").json()["data"]["id"]
    patch = {
        "data": {
            "type": "source-mapping",
            "id": mapping_id,
            "attributes": {
                "relationship_mappings": [
                    {
                        "relationship_id": rel_id,
                        "type": "simple",
                        "source": {
                            "source_id": ds,
                            "type": "profile",
                            "id_path": "$['pass_id']",
                            "related_id_paths": [{"identifier_type": "external-id", "path": "$['serial']"}],
                        },
                    }
                ]
            },
        }
    }
    check_response("update_source_mapping", api.patch(f"/api/source-mappings/{mapping_id}", json=patch))
    pid = api.post("/api/profile-import", json=payloads.profile_import(external_id="serial-1")).json()[
        "data"
    ]["id"]
    api.post(
        "/api/data-source-record-create-jobs",
        json=payloads.record_job(ds, {"pass_id": "p1", "status": "active", "serial": "serial-1"}),
    )
    sandbox.wait_idle()
    record = sandbox.object_records()[0]
    assert record["relationships"] == {
        rel_id: {"identifier_type": "external-id", "value": "serial-1", "profile_id": pid}
    }
    rename = {
        "data": {
            "type": "profile-object-schema",
            "id": "profile",
            "meta": {"relationship_id": rel_id, "name": "holder"},
        }
    }
    check_response("update_profile_schema_relationship", api.patch(rel_path, json=rename))
    assert api.get(rel_path).json()["data"][0]["meta"]["name"] == "holder"
    bad = {
        "data": {
            **patch["data"],
            "attributes": {
                "relationship_mappings": [
                    {**patch["data"]["attributes"]["relationship_mappings"][0], "relationship_id": "nope"}
                ]
            },
        }
    }
    assert_klaviyo_error(api.patch(f"/api/source-mappings/{mapping_id}", json=bad), 400, "invalid")
    remove = {
        "data": [{"type": "profile-object-schema", "id": "profile", "meta": {"relationship_id": rel_id}}]
    }
    check_response("delete_profile_schema_relationship", api.request("DELETE", rel_path, json=remove))
    assert api.get(rel_path).json()["data"] == []


def test_delete_object_type(api: httpx.Client) -> None:
    _, type_id = _setup(api)
    check_response("delete_object_type", api.delete(f"/api/object-types/{type_id}"))
    error = assert_klaviyo_error(api.get(f"/api/object-types/{type_id}"), 404, "not_found")
    assert error["detail"] == f"object-type with id `{type_id}` does not exist."
