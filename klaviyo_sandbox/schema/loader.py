"""Load the shipped compact schema and compile validators from it, once per process.

Validators are compiled lazily (first use) and cached per (operation, kind), so creating many apps in one
test session compiles each validator only once. ``SpecDocument.warm()`` compiles every request validator up
front, which a server does at start-up so the first request pays nothing.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import fastjsonschema

from klaviyo_sandbox.schema.translate import definitions, to_json_schema

Validator = Callable[[Any], Any]

#: The revision whose spec the sandbox ships.
SCHEMA_REVISION = "2026-07-15"


@dataclass
class SpecDocument:
    """The compact spec: operations (method, path, scopes, limits, parameters, schemas) and components."""

    raw: dict[str, Any]
    _defs: dict[str, Any] = field(default_factory=dict)
    _cache: dict[tuple[str, str], Validator | None] = field(default_factory=dict)

    @property
    def operations(self) -> dict[str, Any]:
        """operationId → compact operation."""
        ops: dict[str, Any] = self.raw["operations"]
        return ops

    @property
    def provenance(self) -> dict[str, Any]:
        """Where the compact file came from (source path, sha256, revision)."""
        prov: dict[str, Any] = self.raw["provenance"]
        return prov

    def _definitions(self) -> dict[str, Any]:
        if not self._defs:
            self._defs = definitions(self.raw["schemas"])
        return self._defs

    def _compile(self, schema: Any, *, detailed: bool = False) -> Validator:
        doc = dict(to_json_schema(schema))
        doc["definitions"] = self._definitions()
        # Detailed exceptions embed each rule's whole definition in the generated code (huge enums), which
        # makes compiling ~40x slower; the hot path uses compact ones and the error path compiles a detailed
        # twin on demand.
        validator: Validator = fastjsonschema.compile(
            doc, use_default=False, use_formats=True, detailed_exceptions=detailed
        )
        return validator

    def body_validator(self, operation_id: str, *, detailed: bool = False) -> Validator | None:
        """The compiled request-body validator of an operation (None when it takes no body)."""
        key = (operation_id, "body:detailed" if detailed else "body")
        if key not in self._cache:
            schema = self.operations[operation_id]["request_body"]
            self._cache[key] = self._compile(schema, detailed=detailed) if schema else None
        return self._cache[key]

    def query_validator(self, operation_id: str) -> Validator | None:
        """The compiled validator of an operation's query parameters (after :func:`coerce_query`)."""
        key = (operation_id, "query")
        if key not in self._cache:
            params = [p for p in self.operations[operation_id]["parameters"] if p["in"] == "query"]
            if not params:
                self._cache[key] = None
            else:
                schema = {
                    "type": "object",
                    "properties": {p["name"]: p.get("schema", {}) for p in params},
                    "required": [p["name"] for p in params if p.get("required")],
                }
                self._cache[key] = self._compile(schema)
        return self._cache[key]

    def response_validator(self, operation_id: str, status: int) -> Validator | None:
        """A validator for a response body the spec declares for ``status`` (None when it declares none)."""
        key = (operation_id, f"response:{status}")
        if key not in self._cache:
            schema = self.operations[operation_id]["responses"].get(str(status))
            if schema is None:
                schema = self.operations[operation_id]["responses"].get(f"{str(status)[0]}XX")
            self._cache[key] = self._compile(schema) if schema else None
        return self._cache[key]

    def query_types(self, operation_id: str) -> dict[str, str]:
        """Query parameter name → its JSON type (``array`` values arrive comma-separated)."""
        out: dict[str, str] = {}
        for p in self.operations[operation_id]["parameters"]:
            if p["in"] == "query":
                out[p["name"]] = str(p.get("schema", {}).get("type", "string"))
        return out

    def warm(self) -> None:
        """Compile every request validator now."""
        for op_id in self.operations:
            self.body_validator(op_id)
            self.query_validator(op_id)


@functools.cache
def load_spec(revision: str = SCHEMA_REVISION) -> SpecDocument:
    """The shipped compact schema for ``revision`` (cached for the process)."""
    text = resources.files("klaviyo_sandbox.schema").joinpath(f"klaviyo-{revision}.json").read_text("utf-8")
    return SpecDocument(json.loads(text))
