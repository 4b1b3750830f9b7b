"""The hiredis-packing connection sends exactly what redis-py would."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
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


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("rediss://127.0.0.1:6380/0", SSLConnection),
        ("unix:///tmp/redis.sock?db=0", UnixDomainSocketConnection),
    ],
)
def test_tls_and_unix_urls_keep_their_connection_class(url: str, kind: type[object]) -> None:
    # redis-py's from_url lets the URL's scheme pick the class over ours: TLS is never dropped for speed.
    assert fast_redis(url).connection_pool.connection_class is kind
