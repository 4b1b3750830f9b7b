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
def lua_source(name: str, package: str = "passbridge") -> str:
    """The text of ``<package>/lua/<name>.lua`` (``passbridge`` for the producer, ``worker`` for the engine)
    with its ``--!include`` lines expanded from the same package."""
    text = (files(package) / "lua" / f"{name}.lua").read_text()
    return _INCLUDE.sub(lambda m: lua_source(m.group(1), package), text)


_bound: weakref.WeakKeyDictionary[Redis, dict[tuple[str, str], AsyncScript]] = weakref.WeakKeyDictionary()


def script(redis: Redis, name: str, package: str = "passbridge") -> AsyncScript:
    """A callable script bound to ``redis`` (made once per client and script: it hashes the source)."""
    scripts = _bound.setdefault(redis, {})
    bound = scripts.get((package, name))
    if bound is None:
        bound = scripts[package, name] = redis.register_script(lua_source(name, package))
    return bound
