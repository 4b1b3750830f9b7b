"""The producer's account cache: concurrent requests for an expired or unknown entry share one registry read."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from passbridge.accounts import AccountStore
from passbridge.settings import Settings
from producer.context import ProducerContext
from producer.problems import Problem
from producer.publisher import Publisher
from tests.factories import make_account
from tests.producer.conftest import cipher


def _context(redis: Redis, settings: Settings) -> ProducerContext:
    publisher = Publisher(redis, high_water=1000, dedup_window_s=60)  # not started: account() never uses it
    return ProducerContext(settings, redis, AccountStore(redis, cipher(settings)), publisher)


async def _registry_reads(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_hmget", {}).get("calls", 0))


async def test_concurrent_misses_share_one_read(redis: Redis, settings: Settings) -> None:
    await make_account(redis, cipher(settings), "acme")
    ctx = _context(redis, settings)
    await redis.config_resetstat()
    accounts = await asyncio.gather(*(ctx.account("acme") for _ in range(20)))
    assert {a.account_id for a in accounts} == {"acme"}
    assert await _registry_reads(redis) == 1
    # Cached now: no further read; after forget() the next call reads again.
    await ctx.account("acme")
    assert await _registry_reads(redis) == 1
    ctx.forget("acme")
    await asyncio.gather(ctx.account("acme"), ctx.account("acme"))
    assert await _registry_reads(redis) == 2


async def test_unknown_account_fails_every_waiter_and_is_read_again(redis: Redis, settings: Settings) -> None:
    ctx = _context(redis, settings)
    await redis.config_resetstat()
    results = await asyncio.gather(*(ctx.account("ghost") for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, Problem) and r.status == 404 for r in results), results
    assert await _registry_reads(redis) == 1
    # A failed read is not cached: once the account exists, the next request finds it.
    await make_account(redis, cipher(settings), "ghost")
    assert (await ctx.account("ghost")).account_id == "ghost"


async def test_a_cancelled_waiter_does_not_cancel_the_shared_read(redis: Redis, settings: Settings) -> None:
    await make_account(redis, cipher(settings), "acme")
    ctx = _context(redis, settings)
    first = asyncio.ensure_future(ctx.account("acme"))
    second = asyncio.ensure_future(ctx.account("acme"))
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert (await second).account_id == "acme"
