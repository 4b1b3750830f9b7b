"""The arq host: startup/sweep/shutdown in-process against the sandbox; ``passbridge worker --check``."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from passbridge.accounts import AccountState
from passbridge.keys import ACTIVE_ACCOUNTS, ARQ_QUEUE, WORKERS, account_keys
from passbridge.redis_client import FastPackConnection
from tests.conftest import async_wait_for
from worker import dlq, pause
from worker.klaviyo.client import KlaviyoClient
from worker.main import close_clients, engine_config, open_engine, shutdown, startup, sweep, worker_settings
from worker.setup import load_provisioned, provision

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
    # Profile-job markers of serials that never got another event: one days old (its job is long complete),
    # one fresh (its job may still run, a later write of S8 must wait for it).
    now_ms = int(time.time() * 1000)
    old, fresh = (orjson.dumps({"job": "J", "at": at}) for at in (now_ms - 3 * 86_400_000, now_ms))
    await redis.hset(keys.profile_jobs, mapping={"S9": old, "S8": fresh})
    settings = pipeline.settings.model_copy(update={"worker_lease_ttl_s": 2.0})
    ctx: dict[str, Any] = {"settings": settings, "redis_url": pipeline.settings.redis_url}
    await startup(ctx)
    try:
        result = await sweep(ctx)
        assert result == {"taken_over": 1, "resumed": 1, "workers_pruned": 1, "markers_pruned": 1}
        assert await redis.hgetall(keys.profile_jobs) == {b"S8": fresh}
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


async def _paused_by_the_engine(pipeline: Pipeline, ctx: dict[str, Any], events: int) -> pause.Pause:
    """Start the in-process engine on ``events`` queued events of ``acme`` while Klaviyo refuses the whole
    integration; return its pause once the engine paused the account. Nothing is dead-lettered or settled."""
    await startup(ctx)

    async def paused() -> bool:
        p = await pause.get_pause(pipeline.redis, "acme")
        # Written in steps (the pause, its reason, then the registry): wait for the last one.
        return p is not None and bool(p.reason) and p.synced

    await async_wait_for(paused, timeout=20)
    p = await pause.get_pause(pipeline.redis, "acme")
    assert p is not None
    assert await dlq.count(pipeline.redis, "acme") == 0
    assert int(await pipeline.redis.get(account_keys("acme").depth) or 0) == events
    account = await pipeline.store.get("acme")
    assert (account.state, account.state_reason) == (AccountState.paused, p.reason)
    # The sweep's probe finds the account still refused: it stays paused.
    assert (await sweep(ctx))["resumed"] == 0
    assert await pause.get_pause(pipeline.redis, "acme") is not None
    await pipeline.redis.hdel(account_keys("acme").paused, "probed_ms")  # the next sweep probes again
    return p


async def test_a_retired_revision_pauses_the_account_instead_of_dead_lettering(pipeline: Pipeline) -> None:
    await pipeline.add_account("acme")
    events = [pass_event("acme", f"S{i}", 0, kind="created") for i in range(3)]
    await pipeline.put(events)
    pipeline.sandbox.set_faults(retired_revisions={pipeline.settings.klaviyo_revision: 410})
    ctx: dict[str, Any] = {"settings": pipeline.settings, "redis_url": pipeline.settings.redis_url}
    try:
        p = await _paused_by_the_engine(pipeline, ctx, len(events))
        assert p.reason.startswith("Klaviyo refuses the account's integration: HTTP 410 revision_retired")
        assert "PASSBRIDGE_KLAVIYO_REVISION" in p.reason
        # Once Klaviyo serves the revision again (here: the fault is lifted), the sweep resumes the account.
        pipeline.sandbox.clear_faults()
        assert (await sweep(ctx))["resumed"] == 1
        await async_wait_for(pipeline.drained, timeout=20)
        assert sorted(pipeline.stored_unique_ids("acme")) == sorted(e.event_id for e in events)
        assert await dlq.count(pipeline.redis, "acme") == 0
    finally:
        await shutdown(ctx)


async def test_a_deleted_data_source_pauses_the_account_until_setup_runs_again(pipeline: Pipeline) -> None:
    account = await pipeline.add_account("acme")
    provisioned = await load_provisioned(pipeline.redis, "acme")
    assert provisioned is not None
    # Someone deletes passbridge's data source in Klaviyo's UI.
    state = pipeline.server.app.runtime.states[pipeline.accounts["acme"]]
    del state.data_sources[provisioned.data_source_id]
    events = [pass_event("acme", f"S{i}", 0, kind="created") for i in range(3)]
    await pipeline.put(events)
    ctx: dict[str, Any] = {"settings": pipeline.settings, "redis_url": pipeline.settings.redis_url}
    try:
        p = await _paused_by_the_engine(pipeline, ctx, len(events))
        assert p.reason.startswith("Klaviyo refuses the account's integration: HTTP 404 data_source_missing")
        assert "passbridge klaviyo setup" in p.reason
        # The operator runs setup again: a new data source; the probe finds it and the account resumes.
        async with KlaviyoClient.from_settings(pipeline.settings, pipeline.redis, pipeline.store) as client:
            await provision(client, pipeline.redis, account)
        assert (await sweep(ctx))["resumed"] == 1
        await async_wait_for(pipeline.drained, timeout=20)
        assert sorted(pipeline.stored_unique_ids("acme")) == sorted(e.event_id for e in events)
        pipeline.sandbox.wait_idle()  # records are ingested in the background
        assert sorted(pipeline.records("acme")) == sorted(e.serial_number for e in events)
        assert await dlq.count(pipeline.redis, "acme") == 0
    finally:
        await shutdown(ctx)


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


async def test_a_stop_as_a_cron_job_starts_is_a_clean_exit(redis_url: str) -> None:
    """SIGTERM in the instant arq has created the sweep's task but not yet run it: arq cancels the task before
    its first step, so it raises CancelledError without its own handler; ``close`` gathered the tasks and let
    that out, and the worker exited 1 with a traceback (seen once in CI)."""
    from arq.connections import RedisSettings, create_pool

    from worker.arq_worker import Worker

    async def job(ctx: dict[str, Any]) -> None:
        await asyncio.sleep(60)

    worker = Worker(functions=[job], redis_settings=RedisSettings.from_dsn(redis_url), handle_signals=False)
    worker._pool = await create_pool(RedisSettings.from_dsn(redis_url))
    # Created and not yet started when close() cancels it (handle_signals=False: close sends itself SIGUSR1).
    task = asyncio.create_task(job({}))
    worker.tasks["cron:sweep"] = task
    await worker.close()
    assert task.cancelled()
