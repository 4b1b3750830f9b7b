"""Klaviyo-shaped errors: ``{"errors": [{id, status, code, title, detail, source, links, meta}]}``.

Handlers raise :class:`ApiError`; the app turns it into the JSON:API error document Klaviyo sends (``status``
an integer, ``id`` a UUID, ``source.pointer`` for body problems or ``source.parameter`` for query problems).
Codes and titles follow ../shared/notes/klaviyo-api.md §3.4.
"""

from __future__ import annotations

import uuid
from typing import Any

TITLES: dict[str, str] = {
    "invalid": "Invalid input.",
    "parse_error": "Malformed request.",
    "authentication_failed": "Incorrect authentication credentials.",
    "not_authenticated": "Authentication credentials were not provided.",
    "permission_denied": "You do not have permission to perform this action.",
    "forbidden": "Forbidden.",
    "not_found": "Not found.",
    "method_not_allowed": "Method not allowed.",
    "unsupported_media_type": "Unsupported media type.",
    "request_too_large": "Request entity too large.",
    "duplicate_profile": "Conflict.",
    "conflict": "Conflict.",
    "throttled": "Request was throttled.",
    "error": "A server error occurred.",
}


class ApiError(Exception):
    """An error answer from an emulated Klaviyo endpoint."""

    def __init__(
        self,
        status: int,
        code: str,
        detail: str,
        *,
        pointer: str | None = "/data",
        parameter: str | None = None,
        title: str | None = None,
        meta: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.pointer = pointer
        self.parameter = parameter
        self.title = title or TITLES.get(code, "Error.")
        self.meta = meta or {}
        self.headers = headers or {}

    def document(self) -> dict[str, Any]:
        """The JSON:API error document for this error."""
        return error_document(
            self.status,
            self.code,
            self.detail,
            pointer=self.pointer,
            parameter=self.parameter,
            title=self.title,
            meta=self.meta,
        )


def error_object(
    status: int,
    code: str,
    detail: str,
    *,
    pointer: str | None = "/data",
    parameter: str | None = None,
    title: str | None = None,
    meta: dict[str, Any] | None = None,
    links: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One entry of ``errors[]``."""
    source: dict[str, str] = {}
    if parameter is not None:
        source["parameter"] = parameter
    elif pointer is not None:
        source["pointer"] = pointer
    return {
        "id": str(uuid.uuid4()),
        "status": status,
        "code": code,
        "title": title or TITLES.get(code, "Error."),
        "detail": detail,
        "source": source,
        "links": links or {},
        "meta": meta or {},
    }


def error_document(status: int, code: str, detail: str, **kwargs: Any) -> dict[str, Any]:
    """A whole error body holding one error."""
    return {"errors": [error_object(status, code, detail, **kwargs)]}


def invalid(detail: str, pointer: str | None = "/data", parameter: str | None = None) -> ApiError:
    """400 ``invalid`` (Klaviyo's validation error)."""
    return ApiError(400, "invalid", detail, pointer=pointer, parameter=parameter)


def not_found(kind: str, ident: str) -> ApiError:
    """404 the way Klaviyo words it for a missing resource."""
    return ApiError(404, "not_found", f"{kind} with id `{ident}` does not exist.", pointer="/data/")
