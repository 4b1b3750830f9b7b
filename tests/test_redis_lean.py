"""The publisher's lean script connection, against a real Redis: replies, errors, reconnects, pipelining."""

from __future__ import annotations

import asyncio

import pytest
import uvloop
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from passbridge.redis_lean import LeanScripts, ReplyLost
from passbridge.redis_server import free_port

ECHO = "return {tonumber(ARGV[1]) * 2, ARGV[2]}"


def lean(url: str, **kwargs: object) -> LeanScripts:
    runner = LeanScripts.for_client(Redis.from_url(url, **kwargs))  # type: ignore[arg-type]
    assert runner is not None
    return runner


async def test_reply_and_script_loaded_when_missing(redis_url: str, redis: Redis) -> None:
    runner = lean(redis_url)
    assert await runner.run(ECHO, [21, b"\x00bin\xff"]) == [42, b"\x00bin\xff"]
    await redis.script_flush()  # e.g. a restarted server: NOSCRIPT, loaded again, same reply
    assert await runner.run(ECHO, [1, "x"]) == [2, b"x"]
    await runner.close()


async def test_concurrent_calls_each_get_their_own_reply(redis_url: str) -> None:
    runner = lean(redis_url)
    replies = await asyncio.gather(*(runner.run(ECHO, [i, f"r{i}"]) for i in range(200)))
    assert replies == [[2 * i, f"r{i}".encode()] for i in range(200)]
    await runner.close()


def test_on_uvloop(redis_url: str) -> None:
    """The producer serves on uvloop, whose transports are not asyncio.Transport subclasses."""

    async def calls() -> list[object]:
        runner = lean(redis_url)
        try:
            return list(await asyncio.gather(*(runner.run(ECHO, [i, "u"]) for i in range(20))))
        finally:
            await runner.close()

    assert uvloop.run(calls()) == [[2 * i, b"u"] for i in range(20)]


async def test_error_reply_raises_and_the_connection_stays_usable(redis_url: str) -> None:
    runner = lean(redis_url)
    with pytest.raises(ResponseError, match="boom"):
        await runner.run("return redis.error_reply('boom')", [])
    assert await runner.run(ECHO, [2, "ok"]) == [4, b"ok"]
    await runner.close()


async def test_database_from_the_url(redis_url: str) -> None:
    runner = lean(redis_url.rsplit("/", 1)[0] + "/3")
    await runner.run("redis.call('SET', 'lean-db', ARGV[1]) return 1", ["three"])
    other = Redis.from_url(redis_url.rsplit("/", 1)[0] + "/3")
    assert await other.get("lean-db") == b"three"
    await other.flushdb()
    await other.aclose()
    await runner.close()


async def test_unreachable_server_is_a_connection_error() -> None:
    runner = lean(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=2)
    with pytest.raises(RedisConnectionError):
        await runner.run(ECHO, [1, "x"])


async def test_timeout_drops_the_connection_and_the_next_call_reconnects(redis_url: str) -> None:
    runner = lean(redis_url, socket_timeout=0.2)
    busy = "local t = redis.call('TIME') repeat local n = redis.call('TIME') until (n[1] - t[1]) * 1e6 + (n[2] - t[2]) > 600000 return 1"
    with pytest.raises(RedisTimeoutError):
        await runner.run(busy, [])
    await asyncio.sleep(0.6)  # the script finishes; its late reply went to the dropped connection
    assert await runner.run(ECHO, [5, "after"]) == [10, b"after"]
    await runner.close()


async def test_calls_in_flight_when_the_connection_drops_are_reported_as_possibly_run(redis_url: str) -> None:
    """A command sent and not answered may have run: it fails with ReplyLost (a ConnectionError, so callers
    that only know redis-py's errors still handle it), not as a refused connection."""
    runner = lean(redis_url, socket_timeout=0.2)
    busy = "local t = redis.call('TIME') repeat local n = redis.call('TIME') until (n[1] - t[1]) * 1e6 + (n[2] - t[2]) > 600000 return 1"
    first = asyncio.ensure_future(runner.run(busy, []))
    await asyncio.sleep(0.05)  # sent: it holds Redis
    second = asyncio.ensure_future(runner.run("redis.call('SET', 'lean-second', 1) return 1", []))
    with pytest.raises(RedisTimeoutError):
        await first  # its timeout drops the connection, with the second call sent and unanswered
    with pytest.raises(ReplyLost, match="before its reply"):
        await second
    await asyncio.sleep(0.6)  # the script finishes; the next call reconnects
    assert await runner.run(ECHO, [1, "x"]) == [2, b"x"]
    await runner.close()


def test_only_plain_tcp_urls() -> None:
    assert LeanScripts.for_client(Redis.from_url("unix:///tmp/redis.sock")) is None
    assert LeanScripts.for_client(Redis.from_url("rediss://127.0.0.1:6380/0")) is None
    runner = LeanScripts.for_client(Redis.from_url("redis://user:pw@127.0.0.1:6390/2", socket_timeout=5))
    assert runner is not None
    assert (runner.host, runner.port, runner.db, runner.socket_timeout) == ("127.0.0.1", 6390, 2, 5)
