"""The arq host: startup/sweep/shutdown in-process against the sandbox; ``passbridge worker --check``."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from passbridge.accounts import AccountState
from passbridge.keys import ACTIVE_ACCOUNTS, ARQ_QUEUE, WORKERS, account_keys
from passbridge.redis_client import FastPackConnection
from tests.conftest import async_wait_for
from worker import pause
from worker.main import close_clients, engine_config, open_engine, shutdown, startup, sweep, worker_settings

from .e2e import Pipeline, Workers
from .helpers import pass_event


async def test_sweep_takes_over_resumes_and_prunes(pipeline: Pipeline, redis: Redis) -> None:
    await pipeline.add_account("acme")
    await pipeline.put([pass_event("acme", "S1", 0)])
    keys = account_keys("acme")
    # A lease left behind by a dead worker, an account that fell out of the scheduling index, an auth pause
    # whose credentials work again (the sandbox accepts them), and a worker that stopped beating long ago.
    await redis.zrem(keys.ready, "S1")
    await redis.zadd(keys.leased, {"S1": 1})
    await redis.hset(keys.lease_tokens, "S1", "dead:1:ab.1")
    await redis.zrem(ACTIVE_ACCOUNTS, "acme")
    await pause.pause_account(redis, pipeline.store, "acme", "HTTP 401", kind="auth")
    await redis.zadd(WORKERS, {"ghost": 1})
    settings = pipeline.settings.model_copy(update={"worker_lease_ttl_s": 2.0})
    ctx: dict[str, Any] = {"settings": settings, "redis_url": pipeline.settings.redis_url}
    await startup(ctx)
    try:
        result = await sweep(ctx)
        assert result == {"taken_over": 1, "resumed": 1, "workers_pruned": 1}
        assert (await pipeline.store.get("acme")).state is AccountState.connected
        # The in-process engine then delivers the event.
        await async_wait_for(pipeline.drained, timeout=20)
        assert pipeline.stored_unique_ids("acme") == ["acme-S1-0"]
        # A second sweep does nothing, and does not probe again within the interval.
        await pause.pause_account(redis, pipeline.store, "acme", "HTTP 401", kind="auth")
        await redis.hset(keys.paused, "probed_ms", int(time.time() * 1000))
        assert (await sweep(ctx))["resumed"] == 0
    finally:
        await shutdown(ctx)
    assert await redis.zscore(WORKERS, ctx["engine"].worker_id) is None


def test_worker_settings_for_arq(pipeline: Pipeline) -> None:
    kw = worker_settings(pipeline.settings, "redis://127.0.0.1:1/0")
    assert kw["queue_name"] == ARQ_QUEUE
    assert kw["max_jobs"] == pipeline.settings.worker_max_jobs
    assert kw["poll_delay"] == pipeline.settings.worker_poll_delay_s
    assert [c.name for c in kw["cron_jobs"]] == ["passbridge-sweep"]


async def test_the_engines_redis_clients_pack_commands_in_c(pipeline: Pipeline, redis_url: str) -> None:
    # A backlog's settles and renewals carry thousands of arguments: redis-py's asyncio packer (pure Python)
    # was the worker's biggest single cost before (BENCHMARKS.md, fair share, session 8).
    ctx = open_engine(pipeline.settings, redis_url, engine_config(pipeline.settings))
    try:
        for name in ("pb_redis", "pb_blocking"):
            client: Redis = ctx[name]
            assert client.connection_pool.connection_class is FastPackConnection
            assert await client.ping()
    finally:
        await close_clients(ctx)


@pytest.mark.slow
async def test_health_check_exit_codes(pipeline: Pipeline, workers: Workers) -> None:
    binary = str(Path(sys.executable).parent / "passbridge")

    async def check() -> int:
        proc = await asyncio.create_subprocess_exec(
            binary, "worker", "--check", env=workers.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        return await proc.wait()

    assert await check() == 1
    (proc,) = workers.start(1)
    await async_wait_for(lambda: _health_key(pipeline.redis), timeout=30)
    assert await check() == 0
    assert workers.terminate(proc) == 0
    assert await check() == 1


async def _health_key(redis: Redis) -> bool:
    return bool(await redis.exists(ARQ_QUEUE + ":health-check"))
