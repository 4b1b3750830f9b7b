"""The Lua scripts, loaded once per Redis client (``SCRIPT LOAD`` + ``EVALSHA`` via redis-py).

A line ``--!include NAME`` in a script is replaced by the text of ``passbridge/lua/NAME.lua``, so scripts
that must enqueue as part of their own atomic step (the Apple registrations) share ``enqueue.lua``'s logic
instead of copying it.
"""

from __future__ import annotations

import re
import weakref
from functools import cache
from importlib.resources import files

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

_INCLUDE = re.compile(r"^--!include ([A-Za-z0-9_]+)[ \t]*$", re.MULTILINE)


@cache
def lua_source(name: str) -> str:
    """The text of ``passbridge/lua/<name>.lua`` with its ``--!include`` lines expanded."""
    text = (files("passbridge") / "lua" / f"{name}.lua").read_text()
    return _INCLUDE.sub(lambda m: lua_source(m.group(1)), text)


_bound: weakref.WeakKeyDictionary[Redis, dict[str, AsyncScript]] = weakref.WeakKeyDictionary()


def script(redis: Redis, name: str) -> AsyncScript:
    """A callable script bound to ``redis`` (made once per client: it hashes the source)."""
    scripts = _bound.setdefault(redis, {})
    bound = scripts.get(name)
    if bound is None:
        bound = scripts[name] = redis.register_script(lua_source(name))
    return bound
