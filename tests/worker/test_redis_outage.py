"""A Redis restart under running workers: they wait it out and deliver what comes after (real processes)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.exceptions import ReadOnlyError

from klaviyo_sandbox.client import SandboxClient
from klaviyo_sandbox.testing import SandboxServer
from passbridge.keys import account_keys
from passbridge.redis_server import RedisServer, free_port, start_redis
from passbridge.settings import Settings
from tests.conftest import async_wait_for

from .e2e import RATE_SCALE, Pipeline, Workers, engines_running, worker_env
from .helpers import pass_event

pytestmark = pytest.mark.slow


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own (AOF on), which it stops and starts again on the same port and data."""
    server = start_redis(tmp_path / "redis", free_port(), appendonly=True)
    yield server
    server.stop()


@pytest.fixture
async def own_pipeline(
    own_redis: RedisServer,
    sandbox: SandboxClient,
    sandbox_server: SandboxServer,
    settings: Settings,
    secret_key: str,
) -> AsyncIterator[Pipeline]:
    redis = Redis.from_url(own_redis.url)
    s = settings.model_copy(update={"klaviyo_base_url": sandbox_server.url, "klaviyo_rate_scale": RATE_SCALE})
    pipeline = Pipeline(redis, sandbox, sandbox_server, secret_key, s)
    yield pipeline
    await redis.aclose()
    if pipeline.redis is not redis:  # a test's client of the restarted server
        await pipeline.redis.aclose()


async def test_workers_outlive_a_redis_restart_and_deliver_what_follows(
    own_redis: RedisServer,
    own_pipeline: Pipeline,
    sandbox_server: SandboxServer,
    secret_key: str,
    tmp_path: Path,
) -> None:
    pipeline = own_pipeline
    workers = _workers(own_redis, sandbox_server, secret_key, tmp_path)
    restarted: RedisServer | None = None
    try:
        await pipeline.add_account("acme")
        workers.start(2)
        before = [pass_event("acme", f"S{s}", 0) for s in range(10)]
        await pipeline.put(before)
        await async_wait_for(pipeline.drained, timeout=60)
        await engines_running(pipeline.redis, 4)
        await asyncio.sleep(1)  # and arq inside its poll loop

        own_redis.stop()
        await asyncio.sleep(
            4
        )  # longer than arq's poll delay and the engine's retry pause, several times over
        assert [p.poll() for p in workers.procs] == [None, None], workers.logs()

        restarted = start_redis(own_redis.data_dir, own_redis.port, appendonly=True)
        after = [pass_event("acme", f"S{s}", 1) for s in range(10)]
        await pipeline.redis.aclose()  # its pooled connections died with the server
        pipeline.redis = Redis.from_url(own_redis.url)
        await pipeline.put(after)
        await async_wait_for(pipeline.drained, timeout=60)
        pipeline.sandbox.wait_idle()
        assert sorted(pipeline.stored_unique_ids("acme")) == sorted(e.event_id for e in before + after)
        assert all(p.poll() is None for p in workers.procs)
        text = workers.text()
        assert '"event": "redis_unreachable"' in text
        assert '"event": "redis_reachable_again"' in text
        # one report per loop and outage, not a line per retry
        assert text.count('"event": "redis_unreachable"') <= 3 * 2 * 2, text
    finally:
        workers.stop_all()
        if restarted is not None:
            restarted.stop()


def _workers(
    own_redis: RedisServer, sandbox_server: SandboxServer, secret_key: str, tmp_path: Path
) -> Workers:
    """Worker processes (none started yet) against the test's own Redis, logging under ``tmp_path/logs``."""
    logs = tmp_path / "logs"
    logs.mkdir()
    return Workers(worker_env(own_redis.url, sandbox_server.url, secret_key, tmp_path / "state"), logs)


def _worker(env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "passbridge"), "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_worker_started_without_redis_gives_up_with_one_clear_error(
    tmp_path: Path, secret_key: str
) -> None:
    port = free_port()
    env = worker_env(f"redis://:hunter2@127.0.0.1:{port}/0", "http://127.0.0.1:9", secret_key, tmp_path)
    env["PASSBRIDGE_WORKER_REDIS_WAIT_S"] = "1.5"
    started = time.monotonic()
    result = _worker(env, 60)
    assert result.returncode == 1
    assert time.monotonic() - started < 30
    assert f"Redis at 127.0.0.1:{port} did not answer for 1.5 s" in result.stderr
    assert "PASSBRIDGE_WORKER_REDIS_WAIT_S" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "hunter2" not in result.stderr + result.stdout


def test_a_worker_started_before_redis_waits_for_it(tmp_path: Path, secret_key: str) -> None:
    port = free_port()
    env = worker_env(f"redis://127.0.0.1:{port}/0", "http://127.0.0.1:9", secret_key, tmp_path / "state")
    env["PASSBRIDGE_WORKER_REDIS_WAIT_S"] = "60"
    log = tmp_path / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "passbridge"), "worker"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = None
    try:
        deadline = time.monotonic() + 30
        while '"event": "redis_unreachable"' not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.1)
        time.sleep(1)
        assert proc.poll() is None  # still waiting
        server = start_redis(tmp_path / "redis", port, appendonly=False)
        deadline = time.monotonic() + 30
        while _worker_check(env) != 0:  # arq's health record, written once the worker runs
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.3)
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if server is not None:
            server.stop()
    text = log.read_text(errors="replace")
    assert '"loop": "start-up"' in text
    assert '"event": "redis_reachable_again"' in text


def _worker_check(env: dict[str, str]) -> int:
    return subprocess.run(
        [str(Path(sys.executable).parent / "passbridge"), "worker", "--check"],
        env=env,
        capture_output=True,
        timeout=30,
    ).returncode


async def _refuse_writes_for(own_redis: RedisServer, tmp_path: Path, how: str, seconds: float) -> None:
    """Make the test's Redis refuse every write for ``seconds``: ``oom`` (full, ``noeviction``) or
    ``readonly`` (a replica, as in a failover: a second server takes its data, then it follows that one)."""
    admin = Redis.from_url(own_redis.url)
    other: RedisServer | None = None
    try:
        if how == "oom":
            await admin.config_set("maxmemory-policy", "noeviction")
            await admin.config_set("maxmemory", "1")  # below what any Redis uses: every write refused
            await asyncio.sleep(seconds)
            await admin.config_set("maxmemory", "0")
            return
        other = start_redis(tmp_path / f"other-{how}", free_port(), appendonly=False)
        promoted = Redis.from_url(other.url)
        try:
            await promoted.replicaof("127.0.0.1", str(own_redis.port))

            async def synced() -> bool:
                return (await promoted.info("replication")).get("master_link_status") == "up"

            await async_wait_for(synced, timeout=30)
            await promoted.replicaof("NO", "ONE")
            await admin.replicaof("127.0.0.1", str(other.port))
            with pytest.raises(ReadOnlyError):
                await admin.set("pb:test:probe", "1")
            await asyncio.sleep(seconds)
            await admin.replicaof("NO", "ONE")
        finally:
            await promoted.aclose()
    finally:
        await admin.aclose()
        if other is not None:
            other.stop()


async def test_workers_outlive_a_redis_that_refuses_writes(
    own_redis: RedisServer,
    own_pipeline: Pipeline,
    sandbox_server: SandboxServer,
    secret_key: str,
    tmp_path: Path,
) -> None:
    """Redis full (OOM under ``noeviction``) and then a read-only replica (a failover): arq's poll loop got
    an ``OutOfMemoryError``/``ReadOnlyError`` from its cron and ended the worker; now both are waited out."""
    pipeline = own_pipeline
    workers = _workers(own_redis, sandbox_server, secret_key, tmp_path)
    try:
        await pipeline.add_account("acme")
        workers.start(1)
        await engines_running(pipeline.redis, 2)
        before = [pass_event("acme", f"S{s}", n) for s in range(10) for n in range(3)]
        await pipeline.put(before)
        # Longer than arq's cron period (the sweep, every 5 s), whose writes ended the worker.
        for how in ("oom", "readonly"):
            await _refuse_writes_for(own_redis, tmp_path, how, 6)
            assert workers.procs[0].poll() is None, workers.logs()
        after = [pass_event("acme", f"S{s}", 3) for s in range(10)]
        await pipeline.put(after)
        await async_wait_for(pipeline.drained, timeout=60)
        pipeline.sandbox.wait_idle()
        assert sorted(pipeline.stored_unique_ids("acme")) == sorted(e.event_id for e in before + after)
        assert workers.procs[0].poll() is None
        text = workers.text()
        assert "Redis is full and refuses writes" in text
        assert "Redis is a read-only replica" in text
        # The claim script's refusals are reported as an outage, not twice a second; what is left is the
        # failover's one "UNBLOCKED" of each engine's blocking wait.
        assert text.count('"event": "claim_failed"') <= 2, text
    finally:
        workers.stop_all()


async def test_workers_report_a_redis_that_came_back_empty_and_go_on(
    own_redis: RedisServer,
    own_pipeline: Pipeline,
    sandbox_server: SandboxServer,
    secret_key: str,
    tmp_path: Path,
) -> None:
    """Redis restarted without its data (a new container without its volume): what was queued is gone, which
    nothing in Redis can say. Each engine reports it once (``redis_data_lost``) and works on with the
    accounts registered again."""
    pipeline = own_pipeline
    workers = _workers(own_redis, sandbox_server, secret_key, tmp_path)
    empty: RedisServer | None = None
    try:
        await pipeline.add_account("acme")
        workers.start(1)
        await engines_running(pipeline.redis, 2)
        own_redis.stop()
        empty = start_redis(tmp_path / "empty", own_redis.port, appendonly=False)
        await pipeline.redis.aclose()
        pipeline.redis = Redis.from_url(own_redis.url)

        async def reported() -> bool:  # by the worker's engine and its express lane's
            return workers.text().count('"event": "redis_data_lost"') == 2

        await async_wait_for(reported, timeout=30)
        await pipeline.add_account("acme")
        events = [pass_event("acme", f"S{s}", 0) for s in range(5)]
        await pipeline.put(events)
        await async_wait_for(pipeline.drained, timeout=60)
        pipeline.sandbox.wait_idle()
        assert sorted(pipeline.stored_unique_ids("acme")) == sorted(e.event_id for e in events)
        assert workers.procs[0].poll() is None
        assert workers.text().count('"event": "redis_data_lost"') == 2  # once per engine and loss
    finally:
        workers.stop_all()
        if empty is not None:
            empty.stop()


async def test_a_redis_restart_mid_batch_loses_nothing_and_keeps_order(
    own_redis: RedisServer,
    own_pipeline: Pipeline,
    sandbox_server: SandboxServer,
    secret_key: str,
    tmp_path: Path,
) -> None:
    """Redis stopped while the worker holds leases and its Klaviyo calls are in flight (slowed by the
    sandbox): after the restart every event is delivered, each serial ends on its last state, no lease stays
    behind, and the interrupted batch is one warning line, not a traceback of a bug."""
    pipeline = own_pipeline
    workers = _workers(own_redis, sandbox_server, secret_key, tmp_path)
    restarted: RedisServer | None = None
    try:
        await pipeline.add_account("acme")
        workers.start(1)
        await engines_running(pipeline.redis, 2)
        pipeline.sandbox.set_faults(latency_ms=300)
        events = [pass_event("acme", f"S{s}", n) for s in range(20) for n in range(4)]
        await pipeline.put(events)
        leased = account_keys("acme").leased

        async def in_flight() -> bool:
            return bool(await pipeline.redis.zcard(leased))

        await async_wait_for(in_flight, timeout=30, interval=0.01)
        await asyncio.sleep(0.1)  # its Klaviyo calls under way
        own_redis.stop()
        await asyncio.sleep(3)  # longer than the leases (2 s)
        restarted = start_redis(own_redis.data_dir, own_redis.port, appendonly=True)
        pipeline.sandbox.clear_faults()
        await pipeline.redis.aclose()
        pipeline.redis = Redis.from_url(own_redis.url)
        await async_wait_for(pipeline.drained, timeout=60)
        pipeline.sandbox.wait_idle()
        assert sorted(pipeline.stored_unique_ids("acme")) == sorted(e.event_id for e in events)
        sandbox_id = pipeline.accounts["acme"]
        for s in range(20):
            [profile] = pipeline.sandbox.profiles(sandbox_id, external_id=f"S{s}")
            assert profile["attributes"]["properties"]["points"] == 3, profile  # the last event's state
        assert workers.procs[0].poll() is None
        text = workers.text()
        assert '"event": "batch_failed"' not in text, text
    finally:
        workers.stop_all()
        if restarted is not None:
            restarted.stop()
