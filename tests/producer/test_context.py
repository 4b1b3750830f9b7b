"""The producer's account cache: concurrent requests for an expired or unknown entry share one registry read."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from passbridge.accounts import AccountStore
from passbridge.redis_lean import ReplyLost
from passbridge.settings import Settings
from producer.context import ProducerContext
from producer.problems import Problem
from producer.publisher import Publisher
from producer.routes.common import as_503
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


async def test_secrets_under_another_key_are_a_503_problem_logged_without_secrets(
    redis: Redis, settings: Settings
) -> None:
    """An account encrypted with a key this process lacks (per-container generated keys, a rotation done before
    every process had the new key) is a deployment fault: 503 with Retry-After, one clear log line."""
    from cryptography.fernet import Fernet, MultiFernet
    from structlog.testing import capture_logs

    other = MultiFernet([Fernet(Fernet.generate_key())])
    await make_account(redis, other, "acme")
    ctx = _context(redis, settings)
    with capture_logs() as logs:
        results = await asyncio.gather(ctx.account("acme"), ctx.account("acme"), return_exceptions=True)
        again = await asyncio.gather(ctx.account("acme"), return_exceptions=True)
    for r in [*results, *again]:
        assert isinstance(r, Problem), r
        assert (r.status, r.kind) == (503, "secret-key-mismatch")
        assert r.headers["Retry-After"] == str(settings.retry_after_s)
    errors = [e for e in logs if e["log_level"] == "error"]
    assert len(errors) == 1  # not once per request
    assert errors[0]["account_id"] == "acme"
    assert "PASSBRIDGE_SECRET_KEY" in errors[0]["event"]
    assert "pk_" not in repr(logs)
    assert "whsec_" not in repr(logs)


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (ReplyLost("connection to Redis lost before its reply"), "the outcome is unknown"),
        (RedisTimeoutError("no answer"), "the outcome is unknown"),
        (RedisConnectionError("refused"), "nothing was written"),
    ],
)
async def test_503_says_whether_the_write_may_have_happened(
    redis: Redis, settings: Settings, error: Exception, outcome: str
) -> None:
    """A command sent and unanswered may have run; a refused connection wrote nothing."""
    problem = as_503(_context(redis, settings), "acme", error)
    assert problem.status == 503
    assert outcome in problem.detail
