"""The Lua scripts, loaded once per Redis client (``SCRIPT LOAD`` + ``EVALSHA`` via redis-py)."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from redis.asyncio import Redis
from redis.commands.core import AsyncScript


@cache
def lua_source(name: str, package: str = "passbridge") -> str:
    """The text of ``<package>/lua/<name>.lua`` (``passbridge`` for the producer, ``worker`` for the engine)."""
    return (files(package) / "lua" / f"{name}.lua").read_text()


def script(redis: Redis, name: str, package: str = "passbridge") -> AsyncScript:
    """A callable script bound to ``redis``."""
    return redis.register_script(lua_source(name, package))
