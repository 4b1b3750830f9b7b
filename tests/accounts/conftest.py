"""The ``passbridge accounts`` commands run in-process (typer's CliRunner) against the test Redis, configured
only through the environment, as an operator runs them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis as redis_sync
import structlog
from typer.testing import CliRunner, Result

from passbridge.accounts import Account, AccountStore
from passbridge.cli.main import app
from passbridge.crypto import load_cipher
from passbridge.logging import configure_logging
from passbridge.settings import Settings, get_settings
from producer.app import create_app
from tests.conftest import LiveServer, serve


@dataclass
class Cli:
    """Runs ``passbridge`` commands with a fixed environment (REDIS_URL, secret key, state dir)."""

    env: dict[str, str]
    redis: redis_sync.Redis
    runner: CliRunner = field(default_factory=CliRunner)

    def __call__(self, *args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
        get_settings.cache_clear()  # settings are read once per process; each command is a "process" here
        try:
            return self.runner.invoke(app, list(args), input=input, env={**self.env, **(env or {})})
        finally:
            get_settings.cache_clear()

    def ok(self, *args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
        """Run a command that must succeed."""
        result = self(*args, input=input, env=env)
        assert result.exit_code == 0, (
            f"exit {result.exit_code}\nstdout: {result.stdout}\nstderr: {result.stderr}"
        )
        return result

    def json(self, *args: str, input: str | None = None, env: dict[str, str] | None = None) -> Any:
        """Run a command with ``--json`` that must succeed; its parsed output."""
        return orjson.loads(self.ok(*args, "--json", input=input, env=env).stdout)

    def fails(self, *args: str, input: str | None = None, env: dict[str, str] | None = None) -> str:
        """Run a command that must fail cleanly (non-zero exit, no traceback); its error text."""
        result = self(*args, input=input, env=env)
        assert result.exit_code != 0, result.stdout
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        assert "Traceback" not in result.stderr
        return " ".join(result.stderr.split())

    def account_state_dir(self) -> Path:
        return Path(self.env["PASSBRIDGE_STATE_DIR"])

    def account(self, account_id: str, key: str | None = None) -> Account:
        """The stored account, decrypted with ``key`` (default: the environment's)."""
        import asyncio

        from redis.asyncio import Redis

        async def get() -> Account:
            client = Redis.from_url(self.env["REDIS_URL"])
            try:
                cipher = load_cipher(
                    key or self.env["PASSBRIDGE_SECRET_KEY"], Path(self.env["PASSBRIDGE_STATE_DIR"])
                )
                return await AccountStore(client, cipher).get(account_id)
            finally:
                await client.aclose()

        return asyncio.run(get())


def configure_uncached(level: str = "info", fmt: str = "auto") -> None:
    """The product's logging set-up, minus caching loggers on first use: commands run inside the test process,
    and a logger cached with a command's configuration would ignore later tests' ``capture_logs``."""
    configure_logging(level, fmt)
    structlog.configure(cache_logger_on_first_use=False)


@pytest.fixture
def cli(redis_url: str, tmp_path: Path, secret_key: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cli]:
    monkeypatch.chdir(tmp_path)  # no stray .env from the repo
    monkeypatch.setattr("passbridge.cli.common.configure_logging", configure_uncached)
    env = {
        "REDIS_URL": redis_url,
        "PASSBRIDGE_SECRET_KEY": secret_key,
        "PASSBRIDGE_STATE_DIR": str(tmp_path / "state"),
        "PASSBRIDGE_LOG_FORMAT": "console",
    }
    client = redis_sync.Redis.from_url(redis_url)
    yield Cli(env, client)
    client.close()
    structlog.reset_defaults()


@pytest.fixture
def producer(settings: Settings, redis_url: str) -> Iterator[LiveServer]:
    """The producer over real HTTP on loopback."""
    server = serve(create_app(settings, redis_url))
    yield server
    server.stop()
