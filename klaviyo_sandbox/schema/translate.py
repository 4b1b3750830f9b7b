"""Translate OpenAPI 3.0 schema objects into JSON Schema (draft 7) that fastjsonschema compiles.

OpenAPI 3.0 differs from JSON Schema where the spec uses it: ``nullable: true`` (JSON Schema spells it as a
``"null"`` type), ``$ref`` with siblings (OpenAPI ignores siblings; Klaviyo uses a sibling ``nullable`` to mean
"this reference or null", which is how its servers behave), and component references under
``#/components/schemas`` (rewritten to ``#/definitions``). Keys JSON Schema does not know are dropped.
"""

from __future__ import annotations

from typing import Any

_SCHEMA_REF = "#/schemas/"
_CHILD_MAPS = ("properties", "patternProperties", "definitions")
_CHILD_LISTS = ("oneOf", "anyOf", "allOf")
_CHILD_ONE = ("items", "not", "additionalProperties")
_DROP = frozenset({"nullable", "discriminator", "readOnly", "writeOnly", "xml", "default", "deprecated"})


def _ref(ref: str) -> str:
    if ref.startswith(_SCHEMA_REF):
        return "#/definitions/" + ref[len(_SCHEMA_REF) :]
    if ref.startswith("#/components/schemas/"):
        return "#/definitions/" + ref[len("#/components/schemas/") :]
    raise ValueError(f"unsupported $ref {ref!r}")


def to_json_schema(node: Any) -> Any:
    """A JSON Schema equivalent of the OpenAPI schema ``node`` (input left untouched)."""
    if not isinstance(node, dict):
        return node
    nullable = node.get("nullable") is True
    if "$ref" in node:
        target = {"$ref": _ref(node["$ref"])}
        return {"anyOf": [{"type": "null"}, target]} if nullable else target
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or key.startswith("x-"):
            continue
        if key in _CHILD_MAPS and isinstance(value, dict):
            out[key] = {name: to_json_schema(child) for name, child in value.items()}
        elif key in _CHILD_LISTS and isinstance(value, list):
            out[key] = [to_json_schema(child) for child in value]
        elif key in _CHILD_ONE and isinstance(value, dict):
            out[key] = to_json_schema(value)
        else:
            out[key] = value
    if not nullable:
        return out
    composite = any(key in out for key in _CHILD_LISTS) or "type" not in out
    if composite:
        return {"anyOf": [{"type": "null"}, out]}
    types = out["type"] if isinstance(out["type"], list) else [out["type"]]
    out["type"] = [*types, "null"] if "null" not in types else types
    if "enum" in out and None not in out["enum"]:
        out["enum"] = [*out["enum"], None]
    return out


def definitions(schemas: dict[str, Any]) -> dict[str, Any]:
    """All component schemas, translated, keyed for ``#/definitions/<name>``."""
    return {name: to_json_schema(schema) for name, schema in schemas.items()}
