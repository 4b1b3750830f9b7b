"""Fixtures for the end-to-end engine tests: the Klaviyo sandbox and a pipeline wired to it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from klaviyo_sandbox.client import SandboxClient
from klaviyo_sandbox.config import SandboxConfig
from klaviyo_sandbox.testing import SandboxServer, start_sandbox
from passbridge.settings import Settings

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
