"""Shared fixtures: a real Redis server per test session (never port 6379), flushed between tests, and
servers started on free loopback ports."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis as redis_sync
import structlog
import uvicorn
from cryptography.fernet import Fernet
from redis.asyncio import Redis
from rich.console import Console
from typer.testing import CliRunner
from xdist.scheduler import LoadFileScheduling

from passbridge.cli import app
from passbridge.redis_server import RedisServer, free_port, start_redis
from passbridge.settings import Settings, get_settings

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

#: Test files that read the operations scenario (the package-scoped ``known`` fixture of tests/ops/conftest.py,
#: a producer, a worker and five accounts' history: 15-25 s to build).
SCENARIO_FILES = frozenset(
    f"tests/ops/{name}.py" for name in ("test_browser", "test_cli", "test_dashboard", "test_metrics")
)


#: Files whose few tests take long (20-80 s each file on the 2-core machine), longest first. xdist deals files
#: out by test count, most first, which leaves these for the end: one of them started last keeps one worker busy
#: for a minute after the other has finished. Dealt out first, they are done while short files fill the gaps.
#: Only an order: a file missing here is scheduled where xdist puts it.
LONG_FILES_FIRST = (
    "tests/worker/test_e2e.py",
    "tests/worker/test_redis_outage.py",
    "tests/ops (scenario)",
    "tests/worker/test_e2e_property.py",
    "tests/worker/test_express_lane.py",
    "tests/worker/test_key_bounds.py",
    "tests/producer/test_shutdown.py",
    "tests/test_secrets_sweep.py",
    "tests/test_demo.py",
    "tests/ops/test_dashboard_dlq.py",
    "tests/worker/test_state_dir.py",
    "tests/ops/test_metrics_dirs.py",
    "tests/test_redis_server.py",
    "tests/producer/test_resilience.py",
    "tests/worker/test_bulk_serial_failure.py",
)


class LoadFileSharingTheScenario(LoadFileScheduling):
    """``--dist loadfile``, except that the files reading the operations scenario are one unit of work, and
    that the long files (:data:`LONG_FILES_FIRST`) are dealt out first.

    xdist hands out files by size, so the four scenario files land apart, and a worker that goes on to another
    package in between tears the package-scoped scenario down: it was built four times per run. As one unit
    they run in one worker, back to back, on one scenario."""

    _ordered = False

    def _split_scope(self, nodeid: str) -> str:
        scope = super()._split_scope(nodeid)
        return "tests/ops (scenario)" if scope in SCENARIO_FILES else scope

    def _assign_work_unit(self, node: Any) -> None:
        if not self._ordered:  # the first call, once the work queue is complete
            self._ordered = True
            for scope in reversed(LONG_FILES_FIRST):
                if scope in self.workqueue:
                    self.workqueue.move_to_end(scope, last=False)
        super()._assign_work_unit(node)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> LoadFileScheduling | None:
    """Our ``--dist loadfile`` (see :class:`LoadFileSharingTheScenario`); xdist's own for any other mode."""
    if config.getvalue("dist") == "loadfile":
        return LoadFileSharingTheScenario(config, log)
    return None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session, on a free port, AOF off (tests flush it anyway)."""
    server = start_redis(tmp_path_factory.mktemp("redis"), appendonly=False)
    assert server.port != 6379
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The session server's URL, flushed before and after the test."""
    client = redis_sync.Redis.from_url(redis_server.url)
    client.flushall()
    yield redis_server.url
    client.flushall()
    client.close()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    """An asyncio client on the flushed server."""
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def secret_key() -> str:
    return Fernet.generate_key().decode()


@pytest.fixture
def settings(redis_url: str, tmp_path: Path, secret_key: str) -> Settings:
    """Settings for a test: the test Redis, a private state dir, a fresh secret key."""
    return Settings(
        redis_url=redis_url,
        state_dir=tmp_path / "state",
        secret_key=secret_key,  # type: ignore[arg-type]
        log_format="console",
        retry_after_s=3,
    )


@dataclass
class LiveServer:
    """An ASGI app served by uvicorn on a loopback port in a background thread."""

    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(app: Any, port: int | None = None) -> LiveServer:
    """Serve ``app`` on 127.0.0.1 and wait until it accepts connections."""
    port = port or free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", lifespan="on", loop="asyncio"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.01)
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    return LiveServer(f"http://127.0.0.1:{port}", server, thread)


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> None:
    """Poll ``predicate`` until it is truthy or fail the test."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def async_wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> None:
    """Await ``predicate()`` until it is truthy or fail the test."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(interval)


@dataclass
class Answer:
    """What a command run in this process answered: the fields of a finished process that tests read."""

    returncode: int
    stdout: str
    stderr: str


class InProcessCli:
    """Runs a ``passbridge`` command in this process (typer's CliRunner) with exactly the environment ``env``
    (variables ``env`` lacks are unset meanwhile), as ``subprocess.run([passbridge, ...], env=env)`` would,
    without a second of start-up; in a thread, since the command runs its own event loop. Only for tests about
    what a command answers: what reaches a terminal or a pipe is checked on real processes."""

    def invoke(self, args: list[str], env: dict[str, str]) -> Answer:
        environ: dict[str, str | None] = {name: None for name in os.environ if name not in env}
        environ.update(env)
        get_settings.cache_clear()  # settings are read once per process; each command is a "process" here
        consoles = self._fresh_consoles(env)
        try:
            result = CliRunner().invoke(app, args, env=environ)
        finally:
            get_settings.cache_clear()
            for module, name, console in consoles:
                setattr(module, name, console)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception  # the traceback the process would have printed
        return Answer(result.exit_code, result.stdout, result.stderr)

    async def __call__(self, args: list[str], env: dict[str, str]) -> Answer:
        return await asyncio.to_thread(self.invoke, args, env)

    @staticmethod
    def _fresh_consoles(env: dict[str, str]) -> list[tuple[ModuleType, str, Console]]:
        """Give the command modules' Rich consoles (made at import, as a process makes them at its start) fresh
        ones that read ``env``: a console reads COLUMNS when it is made, and xdist's workers import with
        COLUMNS=80, where the process would get the command's own. Returns what to put back."""
        replaced = []
        for module_name, module in list(sys.modules.items()):
            if not module_name.startswith("passbridge.cli"):
                continue
            for name, value in list(vars(module).items()):
                if isinstance(value, Console):
                    replaced.append((module, name, value))
                    setattr(module, name, Console(stderr=value.stderr, _environ=dict(env)))
        return replaced


@pytest.fixture
def cli_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[InProcessCli]:
    """In-process commands, run from ``tmp_path`` as the tests run their processes (settings read a ``.env``
    in the working directory)."""
    monkeypatch.chdir(tmp_path)
    # Each command configures logging as the process does (to whatever sys.stderr is when a line is written:
    # CliRunner's capture while it runs, so its log lines are in the answer's stderr as in the process's).
    # Before the first command, structlog's default prints to sys.stdout, which CliRunner swaps for its capture
    # while a command runs: a line another thread logged then (an in-process sandbox) would land in its output.
    structlog.configure(
        logger_factory=structlog.PrintLoggerFactory(file=sys.__stderr__), cache_logger_on_first_use=False
    )
    yield InProcessCli()
    get_settings.cache_clear()
    structlog.reset_defaults()
