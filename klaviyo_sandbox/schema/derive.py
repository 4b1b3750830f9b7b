"""Derive the compact schema file the sandbox ships from Klaviyo's full OpenAPI spec.

Keeps only the emulated operations (``klaviyo_sandbox.operations``) and the component schemas they reach,
strips prose (descriptions, examples, summaries, tags), and records where the data came from. The output is
deterministic (sorted keys), so a test can compare the shipped file with a fresh derivation byte for byte.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from klaviyo_sandbox.operations import EMULATED_OPERATIONS

#: Keys that carry prose or documentation-only metadata; none of them affects validation.
_STRIP = frozenset(
    {
        "description",
        "example",
        "examples",
        "summary",
        "tags",
        "externalDocs",
        "x-klaviyo-subtag",
        "x-klaviyo-operation-aliases",
        "x-klaviyo-pre-release",
        "x-readme",
    }
)
_METHODS = ("get", "post", "patch", "put", "delete")
_SCHEMA_PREFIX = "#/components/schemas/"
_RESPONSE_PREFIX = "#/components/responses/"
FORMAT_VERSION = 1
#: Where the full spec lives relative to a checkout (``../shared`` beside the project root).
SPEC_SOURCE = "../shared/klaviyo/stable.json"


def find_shared_spec(start: Path) -> Path | None:
    """``shared/klaviyo/stable.json`` in ``start``'s parent or any ancestor's (a worktree sits deeper than
    the main checkout), or None when ``../shared`` is absent (a Docker image, a user's machine)."""
    for parent in start.resolve().parents:
        candidate = parent / "shared" / "klaviyo" / "stable.json"
        if candidate.is_file():
            return candidate
    return None


def _strip(node: Any) -> Any:
    """A copy of ``node`` without prose keys (property *names* such as ``description`` are kept)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                out[key] = {name: _strip(prop) for name, prop in value.items()}
            elif key not in _STRIP:
                out[key] = _strip(value)
        return out
    if isinstance(node, list):
        return [_strip(item) for item in node]
    return node


def _collect_refs(node: Any, found: set[str], schemas: dict[str, Any]) -> None:
    """Add every component schema reachable from ``node`` to ``found``."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(_SCHEMA_PREFIX):
            name = ref[len(_SCHEMA_PREFIX) :]
            if name not in found:
                found.add(name)
                _collect_refs(schemas[name], found, schemas)
        for value in node.values():
            _collect_refs(value, found, schemas)
    elif isinstance(node, list):
        for item in node:
            _collect_refs(item, found, schemas)


def _resolve_response(resp: Any, spec: dict[str, Any]) -> Any:
    """Inline a ``#/components/responses/...`` reference (the generic 4XX/5XX error bodies)."""
    if (
        isinstance(resp, dict)
        and isinstance(resp.get("$ref"), str)
        and resp["$ref"].startswith(_RESPONSE_PREFIX)
    ):
        return spec["components"]["responses"][resp["$ref"][len(_RESPONSE_PREFIX) :]]
    return resp


def _operation(path: str, method: str, op: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """The compact form of one operation."""
    body_schema = None
    body_required = False
    if "requestBody" in op:
        content = op["requestBody"].get("content", {})
        media = content.get("application/vnd.api+json") or next(iter(content.values()))
        body_schema = media["schema"]
        body_required = bool(op["requestBody"].get("required", False))
    responses: dict[str, Any] = {}
    for status, resp in op.get("responses", {}).items():
        resp = _resolve_response(resp, spec)
        content = resp.get("content") or {}
        media = content.get("application/vnd.api+json") or (next(iter(content.values())) if content else None)
        responses[status] = media["schema"] if media else None
    return {
        "method": method.upper(),
        "path": path,
        "scopes": list(op.get("x-klaviyo-scopes", [])),
        "ratelimit": dict(op.get("x-klaviyo-ratelimit", {})),
        "filters": op.get("x-klaviyo-filters"),
        "parameters": [_strip(p) for p in op.get("parameters", [])],
        "request_body": body_schema,
        "request_body_required": body_required,
        "responses": _strip(responses),
    }


def derive(spec_bytes: bytes, source: str) -> dict[str, Any]:
    """The compact schema document for ``spec_bytes`` (the full spec), recording ``source`` as its origin."""
    spec = json.loads(spec_bytes)
    operations: dict[str, Any] = {}
    for path, item in spec["paths"].items():
        for method in _METHODS:
            op = item.get(method)
            if isinstance(op, dict) and op.get("operationId") in EMULATED_OPERATIONS:
                operations[op["operationId"]] = _operation(path, method, op, spec)
    missing = sorted(set(EMULATED_OPERATIONS) - set(operations))
    if missing:
        raise ValueError(f"operations missing from the spec: {', '.join(missing)}")
    schemas = spec["components"]["schemas"]
    reached: set[str] = set()
    _collect_refs(operations, reached, schemas)
    return {
        "format": FORMAT_VERSION,
        "provenance": {
            "source": source,
            "sha256": hashlib.sha256(spec_bytes).hexdigest(),
            "revision": spec["info"]["version"],
            "openapi": spec["openapi"],
            "upstream": "github.com/klaviyo/openapi openapi/stable.json",
            "generator": "scripts/derive_klaviyo_schema.py",
        },
        "operations": operations,
        "schemas": {name: _strip(schemas[name]) for name in sorted(reached)},
    }


def render(doc: dict[str, Any]) -> str:
    """The file text for ``doc``: sorted keys, one level of indentation, trailing newline."""
    return json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def derive_file(spec_path: Path, source: str) -> tuple[str, str]:
    """Derive from ``spec_path``; returns (revision, file text)."""
    doc = derive(spec_path.read_bytes(), source)
    return doc["provenance"]["revision"], render(doc)
