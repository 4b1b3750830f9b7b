"""The Lua scripts, loaded once per Redis client (``SCRIPT LOAD`` + ``EVALSHA`` via redis-py)."""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from redis.asyncio import Redis
from redis.commands.core import AsyncScript


@cache
def lua_source(name: str) -> str:
    """The text of ``passbridge/lua/<name>.lua``."""
    return (files("passbridge") / "lua" / f"{name}.lua").read_text()


def script(redis: Redis, name: str) -> AsyncScript:
    """A callable script bound to ``redis``."""
    return redis.register_script(lua_source(name))
