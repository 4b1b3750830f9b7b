"""The hiredis-packing connection sends exactly what redis-py would."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from passbridge.redis_client import FastPackConnection, fast_redis


@pytest.mark.parametrize(
    "args",
    [
        ("SET", "k", "v"),
        ("EVALSHA", b"abc", 2, "k1", b"\x00\xffbinary", "ünïcode", 12345678901234),
        ("SCRIPT LOAD", "return 1"),
        (b"CONFIG GET", b"maxmemory"),
        ("ZADD", "z", 1.5, "m"),  # floats go through redis-py's own packer
    ],
)
def test_same_bytes_as_redis_py(args: tuple[object, ...]) -> None:
    ours = b"".join(FastPackConnection().pack_command(*args))
    theirs = b"".join(Connection().pack_command(*args))
    assert ours == theirs


def test_bad_types_still_raise_redis_py_errors() -> None:
    with pytest.raises(DataError):
        FastPackConnection().pack_command("SET", "k", None)
    with pytest.raises(DataError):
        FastPackConnection().pack_command("SET", "k", True)


async def test_round_trip(redis_url: str) -> None:
    client: Redis = fast_redis(redis_url)
    try:
        await client.set("k", "ünï\x00")
        assert await client.get("k") == "ünï\x00".encode()
        assert await client.eval("return ARGV[1] .. ARGV[2]", 0, "a", 7) == b"a7"
    finally:
        await client.aclose()
