"""Cursor paging: ``page[cursor]`` is an opaque base64 token holding the position after the last item served,
so inserts between pages neither repeat nor skip items that sort after the cursor."""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlencode

import orjson

from klaviyo_sandbox.errors import invalid

T = TypeVar("T")


def encode_cursor(key: Any) -> str:
    """An opaque cursor for a sort key."""
    return base64.urlsafe_b64encode(orjson.dumps(key)).decode().rstrip("=")


def decode_cursor(cursor: str) -> Any:
    """The sort key a cursor holds, or a 400 naming ``page[cursor]``."""
    try:
        return orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        raise invalid("Invalid page cursor.", pointer=None, parameter="page[cursor]") from None


def page(
    items: Sequence[T],
    key: Callable[[T], Any],
    size: int,
    cursor: str | None,
    descending: bool = False,
) -> tuple[list[T], str | None]:
    """One page of ``items`` (already sorted by ``key``, ascending or descending) after ``cursor``; returns the
    page and the next cursor (None on the last page)."""
    start = 0
    if cursor:
        after = decode_cursor(cursor)
        if isinstance(after, list):
            after = list(after)
        start = len(items)
        for i, item in enumerate(items):
            k = list(key(item)) if isinstance(key(item), tuple) else key(item)
            if (k < after) if descending else (k > after):
                start = i
                break
    chunk = list(items[start : start + size])
    more = start + size < len(items)
    next_cursor = None
    if more and chunk:
        last = key(chunk[-1])
        next_cursor = encode_cursor(list(last) if isinstance(last, tuple) else last)
    return chunk, next_cursor


def links(self_url: str, params: dict[str, Any], next_cursor: str | None) -> dict[str, Any]:
    """``links`` for a collection: self, next (null on the last page), prev (always null)."""
    nxt = None
    if next_cursor is not None:
        query = {
            k: ",".join(map(str, v)) if isinstance(v, list) else v
            for k, v in params.items()
            if k != "page[cursor]"
        }
        query["page[cursor]"] = next_cursor
        nxt = f"{self_url}?{urlencode(query)}"
    return {"self": self_url, "next": nxt, "prev": None}
