"""Custom Objects endpoints: data sources, record jobs (204, processed later), object types, schemas,
source mappings, the profile relationship, object records and ingestion logs."""

from __future__ import annotations

import functools
import time
from typing import Any

import orjson

from klaviyo_sandbox import ids, paging
from klaviyo_sandbox import objects as rules
from klaviyo_sandbox.errors import ApiError, invalid, not_found
from klaviyo_sandbox.filters import matches
from klaviyo_sandbox.handlers.common import (
    Call,
    Reply,
    check_path_id,
    data,
    document,
    record_identity,
    refuse_rejected,
)
from klaviyo_sandbox.store import AccountState, IngestionLog, ObjectSchema, ObjectType

MAX_RECORD_BYTES = 512 * 1024
MAX_BULK_RECORDS = 500
#: Revisions from which the data-source relationship (and the bulk records list) became required.
STRICT_RECORD_JOBS_FROM = "2026-10-15"


def _entitled(call: Call) -> None:
    if not call.account.custom_objects:
        raise rules.entitlement_error()


# -- data sources ---------------------------------------------------------------------------------------------


def create_data_source(call: Call) -> Reply:
    """``POST /api/data-sources``: 201."""
    ds = rules.create_data_source(call.state, data(call)["attributes"], call.now)
    return Reply(201, document(rules.data_source_resource(ds, call.base_url), call.self_url))


def get_data_sources(call: Call) -> Reply:
    """``GET /api/data-sources``."""
    items = sorted(call.state.data_sources.values(), key=lambda d: d.id)
    chunk, nxt = paging.page(items, lambda d: d.id, call.page_size(20), call.query.get("page[cursor]"))
    return Reply(
        200,
        {
            "data": [rules.data_source_resource(d, call.base_url) for d in chunk],
            "links": paging.links(call.self_url, call.query, nxt),
        },
    )


def get_data_source(call: Call) -> Reply:
    """``GET /api/data-sources/{id}``."""
    ds = call.state.data_sources.get(call.params["id"])
    if ds is None:
        raise not_found("data-source", call.params["id"])
    return Reply(200, document(rules.data_source_resource(ds, call.base_url), call.self_url))


def delete_data_source(call: Call) -> Reply:
    """``DELETE /api/data-sources/{id}``: 204."""
    if call.state.data_sources.pop(call.params["id"], None) is None:
        raise not_found("data-source", call.params["id"])
    return Reply(204)


# -- record jobs ----------------------------------------------------------------------------------------------


def _data_source_id(call: Call) -> str:
    rel = (data(call).get("relationships") or {}).get("data-source") or {}
    ds_id = (rel.get("data") or {}).get("id")
    if not ds_id:
        # 2026-07-15 lets the relationship be omitted in the schema, but a record without a data source cannot
        # be ingested anywhere; 2026-10-15 makes it required. Reject either way (see the README's limits).
        raise invalid("'data-source' is a required relationship.", pointer="/data/relationships/data-source")
    if ds_id not in call.state.data_sources:
        raise not_found("data-source", ds_id)
    return str(ds_id)


def _schedule(call: Call, ds_id: str, records: list[Any]) -> None:
    # Klaviyo ingests records in the background: a bulk job of 500 must not hold up the requests of every
    # other account the sandbox serves.
    state = call.state
    call.runtime.later_in_turns(
        call.runtime.config.ingest_delay_s,
        records,
        lambda record: rules.ingest(state, ds_id, record, time.time()),
    )


def _record_size(record: Any) -> int:
    return len(orjson.dumps(record))


def create_data_source_record(call: Call) -> Reply:
    """``POST /api/data-source-record-create-jobs``: 204; the record is ingested asynchronously."""
    ds_id = _data_source_id(call)
    record = data(call)["attributes"]["data-source-record"]["data"]["attributes"]["record"]
    if _record_size(record) > MAX_RECORD_BYTES:
        raise invalid(
            "A record may be at most 512 KB.",
            pointer="/data/attributes/data-source-record/data/attributes/record",
        )
    refuse_rejected(
        call,
        record_identity(record),
        "/data/attributes/data-source-record/data/attributes/record",
    )
    _schedule(call, ds_id, [record])
    return Reply(204)


def bulk_create_data_source_records(call: Call) -> Reply:
    """``POST /api/data-source-record-bulk-create-jobs``: 204; ≤ 500 records, each ≤ 512 KB."""
    ds_id = _data_source_id(call)
    wrapper = data(call)["attributes"].get("data-source-records")
    if wrapper is None:
        raise invalid(
            "'data-source-records' is a required field.", pointer="/data/attributes/data-source-records"
        )
    items = wrapper["data"]
    if len(items) > MAX_BULK_RECORDS:
        raise invalid(
            f"A bulk request may hold at most {MAX_BULK_RECORDS} records ({len(items)} given).",
            pointer="/data/attributes/data-source-records/data",
        )
    records = []
    for i, item in enumerate(items):
        record = item["attributes"]["record"]
        if _record_size(record) > MAX_RECORD_BYTES:
            raise invalid(
                "A record may be at most 512 KB.",
                pointer=f"/data/attributes/data-source-records/data/{i}/attributes/record",
            )
        refuse_rejected(
            call, record_identity(record), f"/data/attributes/data-source-records/data/{i}/attributes/record"
        )
        records.append(record)
    _schedule(call, ds_id, records)
    return Reply(204)


# -- object types ---------------------------------------------------------------------------------------------


def _object_type(state: AccountState, type_id: str) -> ObjectType:
    t = state.object_types.get(type_id)
    if t is None:
        raise not_found("object-type", type_id)
    return t


def _schema(state: AccountState, schema_id: str) -> ObjectSchema:
    s = state.schemas.get(schema_id)
    if s is None:
        raise not_found("object-schema", schema_id)
    return s


def create_object_type(call: Call) -> Reply:
    """``POST /api/object-types``: 201, or 403 without the Custom Objects entitlement."""
    if not call.account.custom_objects:
        raise rules.entitlement_error()
    t = rules.create_object_type(call.state, data(call)["attributes"], call.now)
    return Reply(201, document(rules.object_type_resource(call.state, t, call.base_url), call.self_url))


def _type_field(t: ObjectType, name: str) -> Any:
    return t.namespace if name == "namespace" else None


def get_object_types(call: Call) -> Reply:
    """``GET /api/object-types`` (only ``filter=equals(namespace,...)``; no paging, as observed)."""
    conditions = call.filters()
    found = [
        t
        for t in sorted(call.state.object_types.values(), key=lambda t: t.id)
        if matches(conditions, functools.partial(_type_field, t))
    ]
    return Reply(
        200,
        {
            "data": [rules.object_type_resource(call.state, t, call.base_url) for t in found],
            "links": {"self": call.self_url, "next": None, "prev": None},
        },
    )


def get_object_type(call: Call) -> Reply:
    """``GET /api/object-types/{id}``."""
    t = _object_type(call.state, call.params["id"])
    return Reply(200, document(rules.object_type_resource(call.state, t, call.base_url), call.self_url))


def delete_object_type(call: Call) -> Reply:
    """``DELETE /api/object-types/{id}``: 204; its schemas, mapping, records and logs go with it."""
    t = _object_type(call.state, call.params["id"])
    for sid in [s.id for s in call.state.schemas.values() if s.object_type_id == t.id]:
        call.state.mappings.pop(call.state.schemas[sid].mapping_id, None)
        del call.state.schemas[sid]
    del call.state.object_types[t.id]
    call.state.records.pop(t.id, None)
    call.state.ingestion_logs.pop(t.id, None)
    return Reply(204)


# -- schemas and mappings -------------------------------------------------------------------------------------


def create_object_schema(call: Call) -> Reply:
    """``POST /api/object-schemas``: 201."""
    _entitled(call)
    d = data(call)
    rel = ((d.get("relationships") or {}).get("object-type") or {}).get("data") or {}
    s = rules.create_object_schema(call.state, d["attributes"], rel.get("id"), call.now)
    return Reply(201, document(rules.schema_resource(call.state, s, call.base_url), call.self_url))


def get_object_schema(call: Call) -> Reply:
    """``GET /api/object-schemas/{id}``; ``include=profile-object-schemas`` adds the schema's profile
    relationships (with ``attributes.meta.relationship_id``, the spec's documented place for it) as
    ``included``."""
    s = _schema(call.state, call.params["id"])
    doc = document(rules.schema_resource(call.state, s, call.base_url), call.self_url)
    if "profile-object-schemas" in (call.query.get("include") or ()):
        doc["included"] = [
            {
                "type": "profile-object-schema",
                "id": "profile",
                "attributes": {"meta": {"relationship_id": rid, **meta}},
                "links": {"self": f"{call.base_url}/api/profile-object-schemas/profile/"},
            }
            for rid, meta in s.profile_relationships.items()
        ]
    return Reply(200, doc)


def update_object_schema(call: Call) -> Reply:
    """``PATCH /api/object-schemas/{id}``: only drafts change."""
    check_path_id(call)
    s = _schema(call.state, call.params["id"])
    delay = call.runtime.config.publish_delay_s
    publish_later = functools.partial(call.later, delay) if delay > 0 else None
    rules.update_object_schema(call.state, s, data(call)["attributes"], call.now, publish_later)
    return Reply(200, document(rules.schema_resource(call.state, s, call.base_url), call.self_url))


def _type_schema(call: Call, which: str) -> Reply:
    t = _object_type(call.state, call.params["id"])
    sid = t.current_schema_id if which == "current" else t.draft_schema_id
    if sid is None:
        raise ApiError(404, "not_found", f"object-type `{t.id}` has no {which} schema.", pointer="/data/")
    s = call.state.schemas[sid]
    return Reply(200, document(rules.schema_resource(call.state, s, call.base_url), call.self_url))


def get_current_schema_for_object_type(call: Call) -> Reply:
    """``GET /api/object-types/{id}/current-schema``."""
    return _type_schema(call, "current")


def get_draft_schema_for_object_type(call: Call) -> Reply:
    """``GET /api/object-types/{id}/draft-schema``."""
    return _type_schema(call, "draft")


def get_source_mapping_for_object_schema(call: Call) -> Reply:
    """``GET /api/object-schemas/{id}/source-mapping``."""
    s = _schema(call.state, call.params["id"])
    m = call.state.mappings[s.mapping_id]
    return Reply(200, document(rules.mapping_resource(m, call.base_url), call.self_url))


def get_source_mapping(call: Call) -> Reply:
    """``GET /api/source-mappings/{id}``."""
    m = call.state.mappings.get(call.params["id"])
    if m is None:
        raise not_found("source-mapping", call.params["id"])
    return Reply(200, document(rules.mapping_resource(m, call.base_url), call.self_url))


def update_source_mapping(call: Call) -> Reply:
    """``PATCH /api/source-mappings/{id}``."""
    check_path_id(call)
    m = call.state.mappings.get(call.params["id"])
    if m is None:
        raise not_found("source-mapping", call.params["id"])
    rules.update_mapping(call.state, m, data(call)["attributes"])
    return Reply(200, document(rules.mapping_resource(m, call.base_url), call.self_url))


# -- the profile relationship ---------------------------------------------------------------------------------


def _relationship_items(call: Call) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = call.body["data"]
    for i, item in enumerate(items):
        if item["id"] != "profile":
            raise invalid("The related id must be 'profile'.", pointer=f"/data/{i}/id")
    return items


def create_profile_schema_relationship(call: Call) -> Reply:
    """``POST .../relationships/profile-object-schemas``: 204."""
    s = _schema(call.state, call.params["id"])
    for item in _relationship_items(call):
        meta = item.get("meta") or {}
        s.profile_relationships[ids.ulid(call.now)] = {
            "name": meta.get("name", "profile"),
            "description": meta.get("description") or "",
        }
    return Reply(204)


def get_profile_schema_relationships(call: Call) -> Reply:
    """``GET .../relationships/profile-object-schemas``; ``meta.relationship_id`` as observed, or only
    ``{type, id}`` per item (the spec's shape) when the sandbox runs with ``relationship_linkage_meta=False``."""
    s = _schema(call.state, call.params["id"])
    with_meta = call.runtime.config.relationship_linkage_meta
    return Reply(
        200,
        {
            "data": [
                {"type": "profile-object-schema", "id": "profile", "meta": {"relationship_id": rid, **meta}}
                if with_meta
                else {"type": "profile-object-schema", "id": "profile"}
                for rid, meta in s.profile_relationships.items()
            ],
            "links": {"self": call.self_url},
        },
    )


def update_profile_schema_relationship(call: Call) -> Reply:
    """``PATCH .../relationships/profile-object-schemas``: rename/describe one relationship; 204."""
    s = _schema(call.state, call.params["id"])
    item = data(call)
    if item["id"] != "profile":
        raise invalid("The related id must be 'profile'.", pointer="/data/id")
    meta = item.get("meta") or {}
    rid = meta.get("relationship_id")
    if rid not in s.profile_relationships:
        raise not_found("relationship", str(rid))
    for key in ("name", "description"):
        if meta.get(key) is not None:
            s.profile_relationships[rid][key] = meta[key]
    return Reply(204)


def delete_profile_schema_relationship(call: Call) -> Reply:
    """``DELETE .../relationships/profile-object-schemas``: the named relationships (all without ids); 204."""
    s = _schema(call.state, call.params["id"])
    for item in _relationship_items(call):
        rid = (item.get("meta") or {}).get("relationship_id")
        if rid is None:
            s.profile_relationships.clear()
        elif s.profile_relationships.pop(rid, None) is None:
            raise not_found("relationship", str(rid))
    return Reply(204)


# -- records and logs -----------------------------------------------------------------------------------------


def get_records_for_object_type(call: Call) -> Reply:
    """``GET /api/object-types/{id}/object-records``: ≤ 100 per page, in ingestion order."""
    t = _object_type(call.state, call.params["id"])
    items = sorted(call.state.records[t.id].values(), key=lambda r: r.seq)
    chunk, nxt = paging.page(items, lambda r: r.seq, call.page_size(20), call.query.get("page[cursor]"))
    return Reply(
        200,
        {
            "data": [rules.record_resource(r, call.base_url) for r in chunk],
            "links": paging.links(call.self_url, call.query, nxt),
        },
    )


def get_object_record(call: Call) -> Reply:
    """``GET /api/object-records/{type_id}:::{record_id}``."""
    full = call.params["id"]
    type_id, sep, record_id = full.partition(":::")
    if not sep or not record_id:
        raise invalid(
            "Object record ids look like `<object_type_id>:::<record_id>`.", pointer=None, parameter="id"
        )
    _object_type(call.state, type_id)
    record = call.state.records[type_id].get(record_id)
    if record is None:
        raise not_found("object-record", full)
    return Reply(200, document(rules.record_resource(record, call.base_url), call.self_url))


def bulk_delete_object_records(call: Call) -> Reply:
    """``POST /api/object-record-bulk-delete-jobs``: 202 with an empty body; ≤ 500 ids; deleted later."""
    items = data(call)["relationships"]["object-records"].get("data") or []
    if len(items) > MAX_BULK_RECORDS:
        raise invalid(
            f"A bulk delete may name at most {MAX_BULK_RECORDS} records ({len(items)} given).",
            pointer="/data/relationships/object-records/data",
        )
    keys = [str(item["id"]).partition(":::") for item in items]
    state = call.state

    def run() -> None:
        for type_id, _, record_id in keys:
            state.records.get(type_id, {}).pop(record_id, None)

    call.later(call.runtime.config.ingest_delay_s, run)
    return Reply(202)


def _log_field(log: IngestionLog, name: str) -> Any:
    fields = {"event_type": "validation_error", "status": "error", "timestamp": log.timestamp}
    return fields.get(name)


def get_ingestion_logs_for_object_type(call: Call) -> Reply:
    """``GET /api/object-types/{id}/object-ingestion-logs``: failures only, newest first, 50 per page."""
    t = _object_type(call.state, call.params["id"])
    conditions = call.filters()
    logs = [
        log
        for log in call.state.ingestion_logs[t.id]
        if matches(
            conditions,
            functools.partial(_log_field, log),
        )
    ]
    logs.sort(key=lambda log: log.seq, reverse=True)
    chunk, nxt = paging.page(logs, lambda log: log.seq, 50, call.query.get("page[cursor]"), descending=True)
    return Reply(
        200,
        {
            "data": [rules.log_resource(log, call.base_url) for log in chunk],
            "links": paging.links(call.self_url, call.query, nxt),
        },
    )
