"""An asyncio Redis client whose commands are packed in C.

redis-py 5's asyncio connection packs every command argument in Python, about a microsecond each; an
``EVALSHA`` carrying a few thousand event arguments spends more time there than Redis spends running the
script. :class:`FastPackConnection` hands plain ``bytes``/``str``/``int`` arguments to ``hiredis.pack_command``
(the packer redis-py's sync client already uses) and leaves everything else to redis-py's own packer, so
behaviour (type errors included) is unchanged.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import Connection


class FastPackConnection(Connection):  # type: ignore[misc]  # redis is untyped here (see pyproject)
    """A redis-py asyncio connection packing commands with hiredis (see the module docstring)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        for arg in args:
            kind = type(arg)
            if kind is not bytes and kind is not str and kind is not int:
                packed: list[bytes] = super().pack_command(*args)  # floats, memoryviews, bad types
                return packed
        # A command name with a space ("SCRIPT LOAD") goes out as separate arguments, as redis-py does.
        head = args[0]
        if isinstance(head, str):
            if " " in head:
                args = tuple(head.encode().split()) + args[1:]
        elif b" " in head:
            args = tuple(head.split()) + args[1:]
        return [hiredis.pack_command(args)]


def fast_redis(url: str, **kwargs: Any) -> Redis:
    """``Redis.from_url(url, **kwargs)`` with :class:`FastPackConnection` for ``redis://`` URLs.

    For ``rediss://`` and ``unix://`` redis-py's ``from_url`` lets the URL pick its own connection class over
    ours: TLS and unix sockets keep working, with commands packed in Python."""
    return Redis.from_url(url, connection_class=FastPackConnection, **kwargs)


def redis_location(url: str) -> str:
    """Where ``url`` points, as ``host:port`` (or a socket path): never its user or password."""
    try:
        parts = urlsplit(url)
        if parts.scheme == "unix":
            return parts.path
        return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"
    except ValueError:
        return "the configured Redis"
