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

from klaviyo_sandbox.client import SandboxClient
from klaviyo_sandbox.testing import SandboxServer
from passbridge.keys import WORKERS
from passbridge.redis_server import RedisServer, free_port, start_redis
from passbridge.settings import Settings
from tests.conftest import async_wait_for

from .e2e import RATE_SCALE, Pipeline, Workers, worker_env
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
    yield Pipeline(redis, sandbox, sandbox_server, secret_key, s)
    await redis.aclose()


async def test_workers_outlive_a_redis_restart_and_deliver_what_follows(
    own_redis: RedisServer,
    own_pipeline: Pipeline,
    sandbox_server: SandboxServer,
    secret_key: str,
    tmp_path: Path,
) -> None:
    pipeline = own_pipeline
    logs = tmp_path / "logs"
    logs.mkdir()
    workers = Workers(worker_env(own_redis.url, sandbox_server.url, secret_key, tmp_path / "state"), logs)
    restarted: RedisServer | None = None
    try:
        await pipeline.add_account("acme")
        workers.start(2)
        before = [pass_event("acme", f"S{s}", 0) for s in range(10)]
        await pipeline.put(before)
        await async_wait_for(pipeline.drained, timeout=60)

        async def all_running() -> bool:  # both workers and their express lanes past their start-up
            return await pipeline.redis.zcard(WORKERS) == 4

        await async_wait_for(all_running, timeout=60)
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
        text = workers.logs()
        assert '"event": "redis_unreachable"' in text
        assert '"event": "redis_reachable_again"' in text
        # one report per loop and outage, not a line per retry
        assert text.count('"event": "redis_unreachable"') <= 3 * 2 * 2, text
    finally:
        workers.stop_all()
        if restarted is not None:
            restarted.stop()


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
