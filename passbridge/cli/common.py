"""What every command shares: settings, logging, the Redis URL, JSON output, clean errors."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any, NoReturn, TypeVar

import orjson
import typer
from rich.console import Console

from passbridge.logging import configure_logging
from passbridge.redis_server import RedisServerError, resolve_redis_url
from passbridge.settings import Settings, get_settings

T = TypeVar("T")
console = Console(stderr=True)


def settings() -> Settings:
    """Settings, with logging configured for this command."""
    s = get_settings()
    configure_logging(s.log_level, s.log_format)
    return s


def redis_url(s: Settings, *, start: bool = True) -> str:
    """The Redis URL: ``REDIS_URL``, or the embedded server (started on demand when ``start``)."""
    try:
        return resolve_redis_url(s.redis_url, s.state_dir, start=start)
    except RedisServerError as exc:
        fail(str(exc))


def fail(message: str, code: int = 1) -> NoReturn:
    """Print an error for a person and exit non-zero."""
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def emit_json(doc: Any) -> None:
    """Print a JSON document on stdout."""
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion."""
    return asyncio.run(coro)
