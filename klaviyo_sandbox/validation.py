"""Request validation against the spec, with rejections as Klaviyo-shaped 400s.

Bodies and queries go through validators compiled once from the shipped spec (see ``schema.loader``). The
validators are compiled without fastjsonschema's detailed exceptions (which embed every enum in the generated
code and make compiling 40x slower), so the failing location is read back from the message, and the missing
field of a ``required`` rule is found by looking at the data itself.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

from fastjsonschema import JsonSchemaValueException

from klaviyo_sandbox.errors import ApiError, invalid
from klaviyo_sandbox.schema.loader import SpecDocument

_TOKEN = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
_TYPE_WORDS = {
    "string": "a valid string",
    "number": "a valid number",
    "integer": "a valid integer",
    "boolean": "a valid boolean",
    "object": "an object",
    "array": "a list",
}


def _path(name: str) -> list[str | int]:
    """``data.data.attributes.events[0].x`` → ``["data", "attributes", "events", 0, "x"]`` (root dropped)."""
    out: list[str | int] = []
    for key, index in _TOKEN.findall(name[len("data") :]):
        out.append(int(index) if index else key)
    return out


def _lookup(data: Any, path: list[str | int]) -> Any:
    for part in path:
        if isinstance(part, int) and isinstance(data, list) and part < len(data):
            data = data[part]
        elif isinstance(part, str) and isinstance(data, dict):
            data = data.get(part)
        else:
            return None
    return data


def _pointer(path: list[str | int]) -> str:
    return "/" + "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in path)


def _detail(rule_text: str, value: Any, field: str) -> str:
    """Words close to Klaviyo's (it is a Django REST framework service) for one failed rule."""
    if rule_text.startswith("must be one of"):
        return f"\"{value}\" is not a valid choice for '{field}'."
    if rule_text.startswith("must be date-time"):
        return f"'{field}' has the wrong format: use an ISO 8601 / RFC 3339 date-time with a timezone."
    if rule_text.startswith("must be uri"):
        return f"'{field}' must be a valid URI."
    if rule_text.startswith("must be smaller than or equal to"):
        return f"Ensure '{field}' is less than or equal to {rule_text.rsplit(' ', 1)[-1]}."
    if rule_text.startswith("must be bigger than or equal to"):
        return f"Ensure '{field}' is greater than or equal to {rule_text.rsplit(' ', 1)[-1]}."
    if rule_text.startswith("must be valid"):
        return f"Invalid value for '{field}'."
    if rule_text.startswith("must be "):
        wanted = rule_text[len("must be ") :].replace(" or null", "").split(" or ")
        if value is None:
            return f"'{field}' may not be null."
        words = " or ".join(_TYPE_WORDS.get(w, w) for w in wanted)
        return f"'{field}' must be {words}."
    return f"Invalid value for '{field}'."


def body_error(exc: JsonSchemaValueException, body: Any) -> ApiError:
    """The 400 for a body that failed its schema (any rule but ``required``)."""
    name, _, rule_text = exc.message.partition(" ")
    path = _path(name)
    value = _lookup(body, path)
    field = str(path[-1]) if path else "data"
    return invalid(_detail(rule_text, value, field), pointer=_pointer(path))


def validate_body(spec: SpecDocument, operation_id: str, body: Any) -> None:
    """Raise a Klaviyo 400 when ``body`` does not match the operation's request schema."""
    validator = spec.body_validator(operation_id)
    if validator is None:
        return
    try:
        validator(body)
    except JsonSchemaValueException as exc:
        if " must contain" in exc.message:
            raise _missing_field(spec, operation_id, body, exc) from None
        raise body_error(exc, body) from None


def _missing_field(
    spec: SpecDocument, operation_id: str, body: Any, fast: JsonSchemaValueException
) -> ApiError:
    """Name the missing key: the fast validator's message does not, so re-run the detailed validator
    (compiled on first need and cached; this is the error path only)."""
    validator = spec.body_validator(operation_id, detailed=True)
    assert validator is not None
    try:
        validator(body)
    except JsonSchemaValueException as exc:
        path = _path(exc.name or "data")
        value = _lookup(body, path)
        required = exc.rule_definition if exc.rule == "required" else None
        if isinstance(value, dict) and isinstance(required, list):
            missing = [str(k) for k in required if k not in value]
            if missing:
                return invalid(f"'{missing[0]}' is a required field.", pointer=_pointer([*path, missing[0]]))
        return body_error(exc, body)
    name = fast.message.partition(" ")[0]
    return invalid("A required field is missing.", pointer=_pointer(_path(name)))


def parse_query(spec: SpecDocument, operation_id: str, query_string: bytes) -> dict[str, Any]:
    """Decode and validate the query; returns name → typed value (arrays split on commas)."""
    if not query_string:
        params: dict[str, Any] = {}
    else:
        types = spec.query_types(operation_id)
        params = {}
        for name, raw in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
            kind = types.get(name)
            if kind is None:
                # Parameters the operation does not declare are ignored (see the README's limits).
                continue
            if kind == "array":
                params[name] = [item for item in raw.split(",") if item != ""]
            elif kind == "integer":
                try:
                    params[name] = int(raw)
                except ValueError:
                    raise invalid(f"'{raw}' is not a valid integer.", pointer=None, parameter=name) from None
            else:
                params[name] = raw
    validator = spec.query_validator(operation_id)
    if validator is not None and params:
        try:
            validator(params)
        except JsonSchemaValueException as exc:
            name, _, rule_text = exc.message.partition(" ")
            param = _param_name(name[len("data.") :], params)
            value = params.get(param)
            index = re.fullmatch(r"\[(\d+)\]", name[len("data.") + len(param) :])
            if isinstance(value, list) and index and int(index.group(1)) < len(value):
                value = value[int(index.group(1))]
            raise invalid(_detail(rule_text, value, param), pointer=None, parameter=param) from None
    return params


def _param_name(name: str, params: dict[str, Any]) -> str:
    best = ""
    for candidate in params:
        if name.startswith(candidate) and len(candidate) > len(best):
            best = candidate
    return best or name
