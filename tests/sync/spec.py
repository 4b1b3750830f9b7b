"""Klaviyo's official OpenAPI spec (``../shared/klaviyo``) as a request validator for our own tests.

Independent of the sandbox's validation on purpose: what our client sends is checked against Klaviyo's
published schemas here too, so a lenient sandbox cannot hide a bad request. OpenAPI 3.0 schemas become JSON
Schema by turning ``nullable: true`` into "or null"; ``date-time`` formats are checked.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import jsonschema
import pytest

CATEGORIES = ("profiles", "events", "custom_objects")
REVISION = re.compile(r"^\d{4}-\d{2}-\d{2}(\.[a-z0-9]+)?$")


def shared_dir() -> Path | None:
    """``$PASSBRIDGE_SHARED_DIR``, else the nearest ``shared/`` beside the project or one of its parents."""
    explicit = os.environ.get("PASSBRIDGE_SHARED_DIR")
    if explicit:
        return Path(explicit) if (Path(explicit) / "klaviyo").is_dir() else None
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared"
        if (candidate / "klaviyo" / "categories").is_dir():
            return candidate
    return None


def require_spec() -> SpecIndex:
    """The spec index, or skip the test saying why."""
    if shared_dir() is None:
        pytest.skip("../shared/klaviyo (Klaviyo's official OpenAPI spec) is absent: spec checks skipped")
    return load_spec()


def _convert(node: Any) -> Any:
    """OpenAPI 3.0 schema → JSON Schema (draft 7): ``nullable`` becomes a null alternative."""
    if isinstance(node, list):
        return [_convert(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _convert(v) for k, v in node.items() if k not in ("nullable", "example", "description")}
    if node.get("nullable"):
        return {"anyOf": [out, {"type": "null"}]}
    return out


_FORMATS = jsonschema.FormatChecker(formats=())


@_FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError("date-time without a timezone")
    return True


@dataclass(frozen=True)
class SpecOperation:
    """One operation of the spec: what a request to it must look like."""

    operation_id: str
    method: str
    path: str
    pattern: re.Pattern[str]
    query_params: frozenset[str]
    request_schema: str | None
    ratelimit: dict[str, str]
    scopes: tuple[str, ...]


class SpecIndex:
    """The operations and component schemas of the three category files."""

    def __init__(self, root: Path) -> None:
        self.operations: dict[str, SpecOperation] = {}
        components: dict[str, Any] = {}
        for category in CATEGORIES:
            doc = json.loads((root / "klaviyo" / "categories" / f"{category}.json").read_text())
            components.update(doc["components"]["schemas"])
            for path, item in doc["paths"].items():
                for method, op in item.items():
                    if method not in ("get", "post", "patch", "put", "delete"):
                        continue
                    body = (
                        (op.get("requestBody") or {}).get("content", {}).get("application/vnd.api+json", {})
                    )
                    ref = (body.get("schema") or {}).get("$ref")
                    self.operations[op["operationId"]] = SpecOperation(
                        operation_id=op["operationId"],
                        method=method.upper(),
                        path=path,
                        pattern=re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "/?$"),
                        query_params=frozenset(
                            p["name"] for p in op.get("parameters", []) if p["in"] == "query"
                        ),
                        request_schema=ref.rsplit("/", 1)[-1] if ref else None,
                        ratelimit=op.get("x-klaviyo-ratelimit", {}),
                        scopes=tuple(op.get("x-klaviyo-scopes", ())),
                    )
        self.components = _convert(components)

    def validator(self, schema_name: str) -> jsonschema.Draft7Validator:
        """A validator for one component schema (refs resolved within the spec's components)."""
        schema = {
            "allOf": [{"$ref": f"#/components/schemas/{schema_name}"}],
            "components": {"schemas": self.components},
        }
        return jsonschema.Draft7Validator(schema, format_checker=_FORMATS)

    def errors(self, schema_name: str, body: Any) -> list[str]:
        """Every violation of ``schema_name`` by ``body`` (empty when valid)."""
        return [
            f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message[:300]}"
            for e in self.validator(schema_name).iter_errors(body)
        ]

    def match(self, method: str, path: str) -> SpecOperation | None:
        """The operation serving ``method path`` (more specific literal paths win)."""
        hits = [op for op in self.operations.values() if op.method == method and op.pattern.match(path)]
        hits.sort(key=lambda op: op.path.count("{"))
        return hits[0] if hits else None

    def check_request(self, method: str, url: str, headers: dict[str, str], body: bytes | None) -> list[str]:
        """Every way a captured request breaks the spec (empty when it conforms)."""
        parts = urlsplit(url)
        op = self.match(method, parts.path)
        if op is None:
            return [f"{method} {parts.path}: no such operation in the spec"]
        problems = []
        revision = headers.get("revision")
        if not revision or not REVISION.match(revision):
            problems.append(f"{op.operation_id}: missing or malformed revision header {revision!r}")
        for name, _ in parse_qsl(parts.query, keep_blank_values=True):
            if name not in op.query_params:
                problems.append(f"{op.operation_id}: unknown query parameter {name!r}")
        if op.request_schema is not None:
            if not body:
                problems.append(f"{op.operation_id}: request body required")
            else:
                ctype = headers.get("content-type", "")
                if ctype.split(";")[0].strip() not in ("application/vnd.api+json", "application/json"):
                    problems.append(f"{op.operation_id}: content-type {ctype!r}")
                problems += [
                    f"{op.operation_id}: {e}" for e in self.errors(op.request_schema, json.loads(body))
                ]
        elif body:
            problems.append(f"{op.operation_id}: takes no request body")
        return problems


@cache
def load_spec() -> SpecIndex:
    root = shared_dir()
    assert root is not None
    return SpecIndex(root)
