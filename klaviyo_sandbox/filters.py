"""Klaviyo's ``filter`` query language, checked against the operation's ``x-klaviyo-filters``.

Grammar (what Klaviyo documents): ``equals(field,"value")``, ``any(field,["a","b"])``, comparison operators
(``greater-than``, ``less-or-equal``, ...) with quoted strings, numbers, booleans or bare ISO datetimes,
``has(field)``, ``and(...)``, and a top-level comma-separated list meaning "and". Conditions on fields or
operators an operation does not allow are a 400 naming the ``filter`` parameter.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from klaviyo_sandbox.errors import invalid

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_BARE = re.compile(r"[^,()\[\]\s]+")


@dataclass(frozen=True)
class Condition:
    """One ``operator(field, value)``."""

    operator: str
    field: str
    value: Any


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, why: str) -> Exception:
        return invalid(
            f"Invalid filter provided: {why} (at position {self.pos}).", pointer=None, parameter="filter"
        )

    def ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t":
            self.pos += 1

    def expect(self, char: str) -> None:
        self.ws()
        if self.pos >= len(self.text) or self.text[self.pos] != char:
            raise self.fail(f"expected '{char}'")
        self.pos += 1

    def peek(self) -> str:
        self.ws()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def name(self) -> str:
        self.ws()
        m = _NAME.match(self.text, self.pos)
        if not m:
            raise self.fail("expected a name")
        self.pos = m.end()
        return m.group(0)

    def value(self) -> Any:
        ch = self.peek()
        if ch == '"' or ch == "'":
            return self.string(ch)
        if ch == "[":
            self.pos += 1
            items: list[Any] = []
            if self.peek() == "]":
                self.pos += 1
                return items
            while True:
                items.append(self.value())
                if self.peek() == ",":
                    self.pos += 1
                    continue
                self.expect("]")
                return items
        m = _BARE.match(self.text, self.pos)
        if not m:
            raise self.fail("expected a value")
        self.pos = m.end()
        raw = m.group(0)
        if raw in ("true", "false"):
            return raw == "true"
        if raw == "null":
            return None
        try:
            return float(raw) if any(c in raw for c in ".eE") and "T" not in raw else int(raw)
        except ValueError:
            pass
        try:
            return datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            raise self.fail(f"cannot read value {raw!r}") from None

    def string(self, quote: str) -> str:
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch == "\\" and self.pos + 1 < len(self.text):
                out.append(self.text[self.pos + 1])
                self.pos += 2
                continue
            if ch == quote:
                self.pos += 1
                return "".join(out)
            out.append(ch)
            self.pos += 1
        raise self.fail("unterminated string")

    def expression(self) -> list[Condition]:
        op = self.name()
        self.expect("(")
        if op == "and":
            conds: list[Condition] = []
            while True:
                conds.extend(self.expression())
                if self.peek() == ",":
                    self.pos += 1
                    continue
                self.expect(")")
                return conds
        field = self.name()
        if self.peek() == ")":
            self.pos += 1
            return [Condition(op, field, None)]
        self.expect(",")
        value = self.value()
        self.expect(")")
        return [Condition(op, field, value)]

    def top(self) -> list[Condition]:
        conds = self.expression()
        while self.peek() == ",":
            self.pos += 1
            conds.extend(self.expression())
        if self.peek():
            raise self.fail("unexpected text")
        return conds


def parse_filter(text: str, allowed: dict[str, Any] | None) -> list[Condition]:
    """Parse ``text`` and check each condition against the operation's ``x-klaviyo-filters``."""
    conditions = _Parser(text).top()
    allowed = allowed or {}
    for cond in conditions:
        spec = allowed.get(cond.field)
        if spec is None:
            raise invalid(
                f"'{cond.field}' is not a valid field for this filter.", pointer=None, parameter="filter"
            )
        ops = spec.get("operators", {})
        kind = (
            "list"
            if isinstance(cond.value, list)
            else "none"
            if cond.value is None and cond.operator == "has"
            else "single"
        )
        if cond.operator not in ops.get(kind, []):
            raise invalid(
                f"'{cond.operator}' is not a valid operator for '{cond.field}'.",
                pointer=None,
                parameter="filter",
            )
        _check_type(cond, spec.get("value", {}))
    return conditions


def _check_type(cond: Condition, value_spec: dict[str, Any]) -> None:
    values = cond.value if isinstance(cond.value, list) else [cond.value]
    kind = value_spec.get("type")
    for v in values:
        if v is None:
            continue
        if value_spec.get("format") == "date-time":
            ok = isinstance(v, datetime)
        elif kind == "string":
            ok = isinstance(v, str)
        elif kind == "number":
            ok = isinstance(v, int | float) and not isinstance(v, bool)
        else:
            ok = True
        if ok and "enum" in value_spec:
            ok = v in value_spec["enum"]
        if not ok:
            raise invalid(f"Invalid value for filter field '{cond.field}'.", pointer=None, parameter="filter")


_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "equals": lambda a, b: a == b,
    "greater-than": lambda a, b: a is not None and a > b,
    "greater-or-equal": lambda a, b: a is not None and a >= b,
    "less-than": lambda a, b: a is not None and a < b,
    "less-or-equal": lambda a, b: a is not None and a <= b,
}


def matches(conditions: list[Condition], get: Callable[[str], Any]) -> bool:
    """Whether a resource (``get(field)`` reads a field; datetimes as timestamps) meets all conditions."""
    for cond in conditions:
        actual = get(cond.field)
        value = cond.value
        if isinstance(value, datetime):
            value = value.timestamp()
        if cond.operator == "has":
            if actual is None:
                return False
        elif cond.operator == "any" or (cond.operator == "equals" and isinstance(value, list)):
            if actual not in value:
                return False
        elif not _COMPARE.get(cond.operator, _COMPARE["equals"])(actual, value):
            return False
    return True
