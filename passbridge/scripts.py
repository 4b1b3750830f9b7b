"""The Lua scripts, loaded once per Redis client (``SCRIPT LOAD`` + ``EVALSHA`` via redis-py).

A line ``--!include NAME`` in a script is replaced by the text of ``passbridge/lua/NAME.lua``, so scripts
that must enqueue as part of their own atomic step (the Apple registrations) share ``enqueue.lua``'s logic
instead of copying it.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Sequence
from functools import cache
from importlib.resources import files
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError
from redis.typing import EncodableT

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


async def run_many(redis: Redis, script: AsyncScript, calls: Sequence[Sequence[EncodableT]]) -> list[Any]:
    """Run ``script`` (no keys) once per argument list of ``calls``, all in one round trip; the replies in order.

    A redis-py pipeline that holds a script asks ``SCRIPT EXISTS`` before each execute: a second round trip
    on every settle, release and renewal batch, each a wake-up of Redis and of this process. Here the calls go
    as plain ``EVALSHA``. Only when Redis answers ``NOSCRIPT`` (its script cache was emptied: a restart,
    ``SCRIPT FLUSH``) is the script loaded and the refused calls sent again. A refused call did not run, so
    sending it again is the same as having sent it late: callers pass independent calls (one per serial or
    batch of leases). The first error of any other kind is raised, as ``pipeline.execute`` raises it.
    """
    if not calls:
        return []
    results = await _evalsha_all(redis, script.sha, calls)
    refused = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
    if refused:
        await redis.script_load(script.script)  # the same SHA: it is the source's
        again = await _evalsha_all(redis, script.sha, [calls[i] for i in refused])
        for i, r in zip(refused, again, strict=True):
            results[i] = r
    for r in results:
        if isinstance(r, Exception):
            raise r
    return results


async def _evalsha_all(redis: Redis, sha: str, calls: Sequence[Sequence[EncodableT]]) -> list[Any]:
    async with redis.pipeline(transaction=False) as pipe:
        for args in calls:
            pipe.evalsha(sha, 0, *args)
        return list(await pipe.execute(raise_on_error=False))
