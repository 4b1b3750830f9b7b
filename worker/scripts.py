"""The engine's Lua scripts (``worker/lua``), each with the shared helpers of ``lib.lua`` prepended."""

from __future__ import annotations

from functools import cache

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from passbridge.scripts import lua_source


@cache
def engine_source(name: str) -> str:
    """``lib.lua`` followed by ``<name>.lua``."""
    return lua_source("lib", "worker") + "\n" + lua_source(name, "worker")


class Scripts:
    """The engine's scripts bound to one Redis client (SHA computed once, ``EVALSHA`` on every call)."""

    def __init__(self, redis: Redis) -> None:
        self.claim: AsyncScript = redis.register_script(engine_source("claim"))
        self.renew: AsyncScript = redis.register_script(engine_source("renew"))
        self.settle: AsyncScript = redis.register_script(engine_source("settle"))
        self.release: AsyncScript = redis.register_script(engine_source("release"))
        self.sweep: AsyncScript = redis.register_script(engine_source("sweep"))
        self.replay: AsyncScript = redis.register_script(engine_source("replay"))
        self.resume: AsyncScript = redis.register_script(engine_source("resume"))
        self.pause_set: AsyncScript = redis.register_script(engine_source("pause_set"))
