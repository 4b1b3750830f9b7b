"""``passbridge.scripts.run_many``: one round trip for many calls of a script, errors raised as a pipeline would."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from passbridge.scripts import run_many

ECHO = "redis.call('RPUSH', 'ran', ARGV[1]) if ARGV[1] == 'bad' then return redis.error_reply('boom') end return ARGV[1]"


async def test_replies_come_back_in_call_order(redis: Redis) -> None:
    echo = redis.register_script(ECHO)
    assert await run_many(redis, echo, [["a"], ["b"], ["c"]]) == [b"a", b"b", b"c"]
    assert await run_many(redis, echo, []) == []


async def test_a_script_error_is_raised_after_every_call_ran(redis: Redis) -> None:
    echo = redis.register_script(ECHO)
    with pytest.raises(ResponseError, match="boom"):
        await run_many(redis, echo, [["a"], ["bad"], ["c"]])
    assert await redis.lrange("ran", 0, -1) == [b"a", b"bad", b"c"]


async def test_a_script_redis_does_not_know_is_loaded_and_every_call_runs_once(redis: Redis) -> None:
    echo = redis.register_script(ECHO)
    await redis.script_flush()
    assert await run_many(redis, echo, [["a"], ["b"]]) == [b"a", b"b"]
    assert await redis.lrange("ran", 0, -1) == [b"a", b"b"]
    assert await redis.script_exists(echo.sha) == [True]
