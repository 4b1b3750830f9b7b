"""Fixtures for the end-to-end engine tests: the Klaviyo sandbox, a pipeline wired to it, worker processes and
in-process engines on it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from klaviyo_sandbox.client import SandboxClient
from klaviyo_sandbox.config import SandboxConfig
from klaviyo_sandbox.testing import SandboxServer, start_sandbox
from passbridge.accounts import AccountStore
from passbridge.settings import Settings
from worker.batching import SyncMode
from worker.bulk import BulkOptions, BulkSync
from worker.engine import Engine, EngineConfig
from worker.klaviyo.client import KlaviyoClient
from worker.retry import RetryPolicy
from worker.sync import Syncer

from .e2e import RATE_SCALE, Pipeline, Workers, worker_env


@pytest.fixture(scope="module")
def sandbox_server() -> Iterator[SandboxServer]:
    """One sandbox per test module (accounts are created per test), real Klaviyo limits on a faster clock."""
    server = start_sandbox(SandboxConfig(rate_scale=RATE_SCALE, request_log_size=100))
    yield server
    server.stop()


@pytest.fixture
def sandbox(sandbox_server: SandboxServer) -> Iterator[SandboxClient]:
    client = SandboxClient(sandbox_server.url)
    client.clear_faults()
    yield client
    client.clear_faults()
    client.close()


@pytest.fixture
async def pipeline(
    redis: Redis, sandbox: SandboxClient, sandbox_server: SandboxServer, settings: Settings, secret_key: str
) -> Pipeline:
    s = settings.model_copy(update={"klaviyo_base_url": sandbox_server.url, "klaviyo_rate_scale": RATE_SCALE})
    return Pipeline(redis, sandbox, sandbox_server, secret_key, s)


@pytest.fixture
def workers(
    redis_url: str, sandbox_server: SandboxServer, secret_key: str, tmp_path: Path
) -> Iterator[Workers]:
    logs = tmp_path / "logs"
    logs.mkdir()
    w = Workers(worker_env(redis_url, sandbox_server.url, secret_key, tmp_path / "state"), logs)
    yield w
    w.stop_all()


RequestHook = Callable[[httpx.Request], Awaitable[None]]
StartEngine = Callable[..., Awaitable[Engine]]


@pytest.fixture
async def start_engine(pipeline: Pipeline, redis_url: str) -> AsyncIterator[StartEngine]:
    """Start an engine (its own Redis and Klaviyo clients, as a separate process would have) syncing in
    ``mode``; ``on_request`` sees every request its Klaviyo client sends."""
    made: list[tuple[Engine, KlaviyoClient, list[Redis]]] = []

    async def start(
        *, on_request: RequestHook | None = None, mode: SyncMode = SyncMode.single, **config: Any
    ) -> Engine:
        redis = Redis.from_url(redis_url)
        blocking = Redis.from_url(redis_url)
        store = AccountStore(redis, pipeline.store.cipher)
        hooks = {"request": [on_request]} if on_request is not None else None
        client = KlaviyoClient.from_settings(pipeline.settings, redis, store, event_hooks=hooks)
        cfg = EngineConfig(**{"retry": RetryPolicy(base_delay_s=0.05, max_delay_s=0.5), **config})
        syncer = Syncer(client, redis)
        # Single: the engine's own per-event path; else the bulk strategy's lanes.
        batch_sync = None if mode is SyncMode.single else BulkSync(syncer, BulkOptions(mode=mode))
        engine = Engine(redis, store, syncer, config=cfg, blocking_redis=blocking, batch_sync=batch_sync)
        await engine.start()
        made.append((engine, client, [redis, blocking]))
        return engine

    yield start
    for engine, client, clients in made:
        await engine.stop(grace_s=1)
        await client.aclose()
        for c in clients:
            await c.aclose()
