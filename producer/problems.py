"""RFC 9457 problem details: every error the producer answers is ``application/problem+json``.

Each problem names what went wrong; validation problems carry ``errors[]`` with a JSON Pointer
(RFC 6901) to each bad field and the reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.responses import Response

PROBLEM_TYPE_BASE = "https://passbridge.dev/problems/"


class Problem(Exception):
    """An error answered as a problem document."""

    def __init__(
        self,
        status: int,
        kind: str,
        title: str,
        detail: str = "",
        *,
        errors: Sequence[dict[str, Any]] = (),
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.kind = kind
        self.title = title
        self.detail = detail
        self.errors = list(errors)
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self, instance: str = "") -> dict[str, Any]:
        doc: dict[str, Any] = {
            "type": PROBLEM_TYPE_BASE + self.kind,
            "title": self.title,
            "status": self.status,
        }
        if self.detail:
            doc["detail"] = self.detail
        if instance:
            doc["instance"] = instance
        if self.errors:
            doc["errors"] = self.errors
        doc.update(self.extra)
        return doc

    def response(self, instance: str = "") -> Response:
        return Response(
            orjson.dumps(self.body(instance)),
            status_code=self.status,
            media_type="application/problem+json",
            headers=self.headers,
        )


def escape_pointer(token: str | int) -> str:
    """One JSON Pointer reference token."""
    return str(token).replace("~", "~0").replace("/", "~1")


def pointer(*parts: str | int) -> str:
    """A JSON Pointer from path tokens."""
    return "".join("/" + escape_pointer(p) for p in parts)


def validation_errors(exc: ValidationError, prefix: Iterable[str | int] = ()) -> list[dict[str, Any]]:
    """pydantic errors as ``{"pointer", "field", "detail"}`` entries."""
    out = []
    base = list(prefix)
    for err in exc.errors(include_url=False, include_input=False):
        loc = [p for p in err["loc"] if p not in ("function-after[_aware(), datetime]",)]
        field = ".".join(str(p) for p in loc) or "(body)"
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        out.append({"pointer": pointer(*base, *loc), "field": field, "detail": msg})
    return out


def unprocessable(errors: list[dict[str, Any]], detail: str = "") -> Problem:
    """422: the body is JSON but some field is invalid."""
    return Problem(
        422,
        "validation",
        "Invalid event",
        detail or f"{len(errors)} invalid field(s); nothing was accepted",
        errors=errors,
    )


def bad_json(reason: str) -> Problem:
    """400: the body is not parseable JSON."""
    return Problem(
        400, "malformed-json", "Body is not valid JSON", reason, errors=[{"pointer": "", "detail": reason}]
    )


def unavailable(detail: str, retry_after_s: int, kind: str = "unavailable") -> Problem:
    """503 with Retry-After: Redis is unreachable, the account's backlog is full, or (``kind``) another
    condition a retry may outlast."""
    return Problem(
        503,
        kind,
        "Service unavailable, retry later",
        detail,
        headers={"Retry-After": str(retry_after_s)},
    )
