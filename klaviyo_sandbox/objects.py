"""Custom Objects: data sources, object types with schemas and source mappings, the profile relationship,
asynchronous record ingestion into object records, and ingestion logs for records that fail.

Ingestion (../shared/notes/klaviyo-api.md §2.7): a record pushed into a data source is processed later; for
every object type whose *active* schema's mapping reads from that source, the record id comes from the
mapping's ``id_path``, each mapped property is type-checked against the schema, and a valid record replaces the
stored object record with that id (last write wins). An invalid record is not stored; it becomes an error
entry in the object type's ingestion log. Schemas still in draft do not ingest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from klaviyo_sandbox import ids
from klaviyo_sandbox.errors import ApiError, invalid, not_found
from klaviyo_sandbox.jsonpath import MISSING, compile_path, evaluate
from klaviyo_sandbox.store import (
    AccountState,
    DataSource,
    IngestionLog,
    ObjectRecord,
    ObjectSchema,
    ObjectType,
    SourceMapping,
)

ENTITLEMENT_DETAIL = "Entitlement to create object type not found."
PROPERTY_TYPES = ("boolean", "float", "int", "string", "timestamp")
IDENTIFIER_TYPES = {
    "email": "email",
    "phone": "phone_number",
    "external-id": "external_id",
    "anonymous": "anonymous_id",
}


def entitlement_error() -> ApiError:
    """The 403 Klaviyo answers on an account without Custom Objects."""
    return ApiError(403, "forbidden", ENTITLEMENT_DETAIL, pointer="/data")


# -- data sources ---------------------------------------------------------------------------------------------


def create_data_source(state: AccountState, attrs: dict[str, Any], now: float) -> DataSource:
    """A new data source; titles are unique within a namespace."""
    title = attrs["title"]
    namespace = attrs.get("namespace") or "custom-objects"
    if not 1 <= len(title) <= 255:
        raise invalid("Title must be between 1 and 255 characters.", pointer="/data/attributes/title")
    for ds in state.data_sources.values():
        if ds.title == title and ds.namespace == namespace:
            raise ApiError(
                409,
                "conflict",
                f"A data source titled '{title}' already exists in namespace '{namespace}'.",
                pointer="/data/attributes/title",
            )
    ds = DataSource(
        id=ids.ulid(now),
        title=title,
        visibility=attrs.get("visibility") or "private",
        description=attrs.get("description") or "",
        namespace=namespace,
        created=now,
    )
    state.data_sources[ds.id] = ds
    return ds


def data_source_resource(ds: DataSource, base_url: str) -> dict[str, Any]:
    """The JSON:API resource of a data source."""
    return {
        "type": "data-source",
        "id": ds.id,
        "attributes": {
            "title": ds.title,
            "visibility": ds.visibility,
            "description": ds.description,
            "namespace": ds.namespace,
        },
        "links": {"self": f"{base_url}/api/data-sources/{ds.id}/"},
    }


# -- object types, schemas, mappings --------------------------------------------------------------------------


def _check_properties(props: list[dict[str, Any]], required: list[str], pointer: str) -> None:
    seen_ids: set[int] = set()
    seen_names: set[str] = set()
    for i, prop in enumerate(props):
        if prop["id"] < 1:
            raise invalid("Property id must be a positive integer.", pointer=f"{pointer}/properties/{i}/id")
        if prop["id"] in seen_ids:
            raise invalid(f"Duplicate property id {prop['id']}.", pointer=f"{pointer}/properties/{i}/id")
        if prop["name"] in seen_names:
            raise invalid(
                f"Duplicate property name '{prop['name']}'.", pointer=f"{pointer}/properties/{i}/name"
            )
        seen_ids.add(prop["id"])
        seen_names.add(prop["name"])
    for name in required:
        if name not in seen_names:
            raise invalid(
                f"Required property '{name}' is not a property of the schema.", pointer=f"{pointer}/required"
            )


def _check_mapping(state: AccountState, schema: ObjectSchema, attrs: dict[str, Any], pointer: str) -> None:
    prop_ids = {p["id"] for p in schema.properties}
    for i, pm in enumerate(attrs.get("property_mappings") or []):
        where = f"{pointer}/property_mappings/{i}"
        if pm["id"] not in prop_ids:
            raise invalid(
                f"Property mapping refers to unknown property id {pm['id']}.", pointer=f"{where}/id"
            )
        if pm["type"] == "simple":
            _check_source(state, pm["source"], f"{where}/source")
    for i, rm in enumerate(attrs.get("relationship_mappings") or []):
        where = f"{pointer}/relationship_mappings/{i}"
        if rm["relationship_id"] not in schema.profile_relationships:
            raise invalid(
                f"Unknown relationship id '{rm['relationship_id']}'.", pointer=f"{where}/relationship_id"
            )
        _check_source(state, rm["source"], f"{where}/source")
        for j, rel in enumerate(rm["source"].get("related_id_paths") or []):
            _check_path(rel["path"], f"{where}/source/related_id_paths/{j}/path")


def _check_source(state: AccountState, source: dict[str, Any], pointer: str) -> None:
    if source["source_id"] not in state.data_sources:
        raise invalid(f"Data source '{source['source_id']}' does not exist.", pointer=f"{pointer}/source_id")
    _check_path(source["id_path"], f"{pointer}/id_path")
    if "data_path" in source:
        _check_path(source["data_path"], f"{pointer}/data_path")


def _check_path(path: str, pointer: str) -> None:
    try:
        compile_path(path)
    except ValueError as exc:
        raise invalid(str(exc), pointer=pointer) from None


def _new_schema(
    state: AccountState, type_id: str, attrs: dict[str, Any], pointer: str, now: float
) -> ObjectSchema:
    props = list(attrs.get("properties") or [])
    required = list(attrs.get("required") or [])
    _check_properties(props, required, pointer)
    schema = ObjectSchema(
        id=ids.ulid(now),
        object_type_id=type_id,
        status="draft",
        properties=props,
        required=required,
        mapping_id=ids.ulid(now),
        created=now,
        updated=now,
    )
    mapping = SourceMapping(id=schema.mapping_id, schema_id=schema.id)
    inline = ((attrs.get("source-mapping") or {}).get("data") or {}).get("attributes") or {}
    if inline:
        _check_mapping(state, schema, inline, f"{pointer}/source-mapping/data/attributes")
        mapping.property_mappings = list(inline.get("property_mappings") or [])
        mapping.relationship_mappings = list(inline.get("relationship_mappings") or [])
    state.schemas[schema.id] = schema
    state.mappings[mapping.id] = mapping
    obj_type = state.object_types[type_id]
    if (attrs.get("status") or "draft") == "active":
        activate(state, schema, now)
    else:
        obj_type.draft_schema_id = schema.id
    return schema


def activate(state: AccountState, schema: ObjectSchema, now: float) -> None:
    """Make ``schema`` its type's current schema (records start being ingested through it)."""
    schema.status = "active"
    schema.updated = now
    obj_type = state.object_types[schema.object_type_id]
    obj_type.current_schema_id = schema.id
    if obj_type.draft_schema_id == schema.id:
        obj_type.draft_schema_id = None
    obj_type.updated = now


def create_object_type(state: AccountState, attrs: dict[str, Any], now: float) -> ObjectType:
    """A new object type with its schema (inline, or an empty draft) and source mapping."""
    title = attrs["title"]
    namespace = attrs.get("namespace") or "custom-objects"
    for t in state.object_types.values():
        if t.title == title and t.namespace == namespace:
            raise ApiError(
                409,
                "conflict",
                f"An object type titled '{title}' already exists.",
                pointer="/data/attributes/title",
            )
    obj_type = ObjectType(
        id=ids.ulid(now),
        title=title,
        description=attrs.get("description") or "",
        visibility=attrs.get("visibility") or "private",
        namespace=namespace,
        created=now,
        updated=now,
    )
    state.object_types[obj_type.id] = obj_type
    inline = ((attrs.get("object-schema") or {}).get("data") or {}).get("attributes") or {}
    try:
        _new_schema(state, obj_type.id, inline, "/data/attributes/object-schema/data/attributes", now)
    except ApiError:
        del state.object_types[obj_type.id]
        raise
    state.records[obj_type.id] = {}
    state.ingestion_logs[obj_type.id] = []
    return obj_type


def create_object_schema(
    state: AccountState, attrs: dict[str, Any], object_type_id: str | None, now: float
) -> ObjectSchema:
    """``POST /api/object-schemas``: a new schema version for an existing object type."""
    if not object_type_id:
        raise invalid("An object-type relationship is required.", pointer="/data/relationships/object-type")
    if object_type_id not in state.object_types:
        raise not_found("object-type", object_type_id)
    return _new_schema(state, object_type_id, attrs, "/data/attributes", now)


def update_object_schema(
    state: AccountState,
    schema: ObjectSchema,
    attrs: dict[str, Any],
    now: float,
    publish_later: Callable[[Callable[[], None]], None] | None = None,
) -> None:
    """``PATCH /api/object-schemas/{id}``: only a draft can change; ``status: active`` publishes it — at once,
    or, with ``publish_later`` (which runs its argument after the sandbox's publishing delay), after the
    schema reads ``publishing`` for a while, as Klaviyo's spec allows ("While activation is in progress, reads
    may report a ``publishing`` status"). Until then the type's records are not processed through it."""
    if schema.status != "draft":
        raise invalid("Only a draft schema can be updated.", pointer="/data/attributes")
    props = attrs["properties"] if attrs.get("properties") is not None else schema.properties
    required = attrs["required"] if attrs.get("required") is not None else schema.required
    _check_properties(props, required, "/data/attributes")
    schema.properties = list(props)
    schema.required = list(required)
    schema.updated = now
    if attrs.get("status") == "active":
        if publish_later is None:
            activate(state, schema, now)
        else:
            schema.status = "publishing"
            publish_later(lambda: activate(state, schema, time.time()))


def _type_status(state: AccountState, t: ObjectType) -> str:
    if t.current_schema_id:
        return "active"
    draft = state.schemas.get(t.draft_schema_id) if t.draft_schema_id else None
    return "publishing" if draft is not None and draft.status == "publishing" else "draft"


def object_type_resource(state: AccountState, t: ObjectType, base_url: str) -> dict[str, Any]:
    """The JSON:API resource of an object type."""
    link = f"{base_url}/api/object-types/{t.id}/"
    rel: dict[str, Any] = {}
    for name, sid in (("current-schema", t.current_schema_id), ("draft-schema", t.draft_schema_id)):
        entry: dict[str, Any] = {
            "links": {"self": f"{link}relationships/{name}/", "related": f"{link}{name}/"}
        }
        if sid:
            entry["data"] = {"type": "object-schema", "id": sid}
        rel[name] = entry
    return {
        "type": "object-type",
        "id": t.id,
        "attributes": {
            "title": t.title,
            "description": t.description,
            "status": _type_status(state, t),
            "namespace": t.namespace,
            "created_at": ids.iso(t.created),
            "updated_at": ids.iso(t.updated),
        },
        "relationships": rel,
        "links": {"self": link},
    }


def schema_resource(state: AccountState, s: ObjectSchema, base_url: str) -> dict[str, Any]:
    """The JSON:API resource of an object schema."""
    link = f"{base_url}/api/object-schemas/{s.id}/"
    t = state.object_types[s.object_type_id]
    return {
        "type": "object-schema",
        "id": s.id,
        "attributes": {
            "title": t.title,
            "description": t.description,
            "status": s.status,
            "properties": [dict(p) for p in s.properties],
            "required": list(s.required),
            "visibility": t.visibility,
            "published_at": ids.iso(s.updated) if s.status == "active" else None,
        },
        "relationships": {
            "source-mapping": {
                "data": {"type": "source-mapping", "id": s.mapping_id},
                "links": {
                    "self": f"{link}relationships/source-mapping/",
                    "related": f"{link}source-mapping/",
                },
            },
            "profile-object-schemas": {
                "data": [{"type": "profile-object-schema", "id": "profile"}]
                if s.profile_relationships
                else [],
                "links": {
                    "self": f"{link}relationships/profile-object-schemas/",
                    "related": f"{link}profile-object-schemas/",
                },
            },
        },
        "links": {"self": link},
    }


def mapping_resource(m: SourceMapping, base_url: str) -> dict[str, Any]:
    """The JSON:API resource of a source mapping."""
    return {
        "type": "source-mapping",
        "id": m.id,
        "attributes": {
            "property_mappings": [dict(p) for p in m.property_mappings],
            "relationship_mappings": [dict(r) for r in m.relationship_mappings],
        },
        "links": {"self": f"{base_url}/api/source-mappings/{m.id}/"},
    }


def update_mapping(state: AccountState, mapping: SourceMapping, attrs: dict[str, Any]) -> None:
    """``PATCH /api/source-mappings/{id}``: replace the lists given."""
    schema = state.schemas[mapping.schema_id]
    _check_mapping(state, schema, attrs, "/data/attributes")
    if attrs.get("property_mappings") is not None:
        mapping.property_mappings = list(attrs["property_mappings"])
    if attrs.get("relationship_mappings") is not None:
        mapping.relationship_mappings = list(attrs["relationship_mappings"])


# -- records --------------------------------------------------------------------------------------------------


def _coerce(kind: str, value: Any) -> tuple[bool, Any]:
    """Whether ``value`` fits a schema property type, and the value to store."""
    if value is None:
        return True, None
    if kind == "string":
        return isinstance(value, str), value
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool), value
    if kind == "float":
        return isinstance(value, int | float) and not isinstance(value, bool), value
    if kind == "boolean":
        return isinstance(value, bool), value
    if kind == "timestamp":
        if isinstance(value, int | float) and not isinstance(value, bool):
            return True, value
        if isinstance(value, str):
            try:
                datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                return False, value
            return True, value
        return False, value
    return False, value


def ingest(state: AccountState, data_source_id: str, record: Any, now: float) -> None:
    """Process one raw record from a data source into every object type that maps it."""
    for t in state.object_types.values():
        if not t.current_schema_id:
            continue
        schema = state.schemas[t.current_schema_id]
        mapping = state.mappings[schema.mapping_id]
        simple = [
            pm
            for pm in mapping.property_mappings
            if pm["type"] == "simple" and pm["source"]["source_id"] == data_source_id
        ]
        if not simple:
            continue
        _ingest_one(state, t, schema, mapping, simple, data_source_id, record, now)


def _ingest_one(
    state: AccountState,
    t: ObjectType,
    schema: ObjectSchema,
    mapping: SourceMapping,
    simple: list[dict[str, Any]],
    data_source_id: str,
    record: Any,
    now: float,
) -> None:
    errors: list[dict[str, Any]] = []
    record_id = evaluate(simple[0]["source"]["id_path"], record)
    if record_id is MISSING or record_id is None or isinstance(record_id, dict | list):
        errors.append(
            {
                "code": "missing_record_id",
                "message": f"No record id at {simple[0]['source']['id_path']}",
                "property": "id",
                "invalid_value": None,
            }
        )
    by_id = {p["id"]: p for p in schema.properties}
    props: dict[str, Any] = {}
    for pm in mapping.property_mappings:
        prop = by_id.get(pm["id"])
        if prop is None:
            continue
        if pm["type"] == "constant":
            value = pm["value"]
        elif pm["source"]["source_id"] == data_source_id:
            value = evaluate(pm["source"]["data_path"], record)
            if value is MISSING:
                continue
        else:
            continue
        ok, stored = _coerce(prop["type"], value)
        if not ok:
            errors.append(
                {
                    "code": "invalid_type",
                    "message": f"Expected {prop['type']} for property '{prop['name']}'",
                    "property": prop["name"],
                    "invalid_value": str(value),
                }
            )
        else:
            props[prop["name"]] = stored
    for name in schema.required:
        if props.get(name) is None and not any(e["property"] == name for e in errors):
            errors.append(
                {
                    "code": "missing_required",
                    "message": f"Required property '{name}' is missing",
                    "property": name,
                    "invalid_value": None,
                }
            )
    if errors:
        state.ingestion_logs[t.id].append(
            IngestionLog(
                id=ids.ulid(now),
                object_type_id=t.id,
                timestamp=now,
                summary=f"Record failed validation with {len(errors)} error(s)",
                errors=errors,
                record=record,
                data_source_id=data_source_id,
                seq=state.next_seq(),
            )
        )
        return
    rid = str(record_id)
    relationships = _relationships(state, mapping, data_source_id, record)
    existing = state.records[t.id].get(rid)
    state.records[t.id][rid] = ObjectRecord(
        object_type_id=t.id,
        record_id=rid,
        properties=props,
        relationships=relationships,
        created=existing.created if existing else now,
        updated=now,
        seq=existing.seq if existing else state.next_seq(),
        writes=existing.writes + 1 if existing else 1,
    )


def _relationships(
    state: AccountState, mapping: SourceMapping, data_source_id: str, record: Any
) -> dict[str, Any]:
    """Profile links: the first related id path that resolves decides the identifier; the profile is linked
    if it exists (the sandbox does not create profiles from records)."""
    out: dict[str, Any] = {}
    for rm in mapping.relationship_mappings:
        source = rm["source"]
        if source.get("type") != "profile" or source["source_id"] != data_source_id:
            continue
        for rel in source.get("related_id_paths") or []:
            value = evaluate(rel["path"], record)
            if value is MISSING or value is None:
                continue
            kind = rel["identifier_type"]
            if kind == "klaviyo-id":
                pid = str(value) if str(value) in state.profiles else None
            else:
                pid = state.index[IDENTIFIER_TYPES[kind]].get(str(value))
            out[rm["relationship_id"]] = {"identifier_type": kind, "value": value, "profile_id": pid}
            break
    return out


def record_resource(r: ObjectRecord, base_url: str) -> dict[str, Any]:
    """The JSON:API resource of an object record."""
    return {
        "type": "object-record",
        "id": r.full_id,
        "attributes": {"record_properties": dict(r.properties)},
        "links": {"self": f"{base_url}/api/object-records/{r.full_id}/"},
    }


def log_resource(log: IngestionLog, base_url: str) -> dict[str, Any]:
    """The JSON:API resource of an ingestion log entry."""
    return {
        "type": "object-ingestion-log",
        "id": log.id,
        "attributes": {
            "status": "error",
            "event_type": "validation_error",
            "timestamp": ids.iso(log.timestamp),
            "summary": log.summary,
            "errors": [dict(e) for e in log.errors],
        },
        "relationships": {
            "object-type": {
                "data": {"type": "object-type", "id": log.object_type_id},
                "links": {
                    "self": f"{base_url}/api/object-ingestion-logs/{log.id}/relationships/object-type/",
                    "related": f"{base_url}/api/object-ingestion-logs/{log.id}/object-type/",
                },
            }
        },
        "links": {"self": f"{base_url}/api/object-ingestion-logs/{log.id}/"},
    }
