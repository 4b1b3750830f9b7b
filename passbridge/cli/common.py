"""What every command shares: settings, logging, the Redis URL, JSON output, clean errors."""

from __future__ import annotations

import re
import sys
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape

# Every command module imports this one, so it stays light: settings, logging, Redis and asyncio are
# imported by the functions that use them, and `passbridge --help` never pays for them.
if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.exceptions import RedisError

    from passbridge.settings import Settings

T = TypeVar("T")
#: The width answers are laid out in when they go to a pipe or a file: no table is ever cut to fit.
UNBOUNDED_WIDTH = 100_000


class AnswerConsole(Console):
    """Stdout for answers. On a terminal (or with ``COLUMNS`` set) tables fit its width as usual; into a pipe
    or a file they take their natural width, so no serial, event id or account id is cut short with "…" (a
    cut id matches no grep and cannot be pasted back into a command; Rich otherwise assumed the terminal's
    width, or 80 columns without one)."""

    @property
    def size(self) -> ConsoleDimensions:
        """The terminal's size, or an unbounded width off a terminal without ``COLUMNS``."""
        dims = super().size
        if self._width is None and not self.is_terminal and "COLUMNS" not in self._environ:
            return ConsoleDimensions(UNBOUNDED_WIDTH, dims.height)
        return dims

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


#: Errors, prompts and progress: on stderr, so they never mix into output a pipe or a file takes.
console = Console(stderr=True)
#: What a command answers (tables, lines of data): on stdout, so `passbridge status | grep acme` works.
out = AnswerConsole()
#: C0 and C1 control characters: in data they could move the cursor, clear the screen or retitle the window.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: The Redis URL this command resolved last, so a failure can say which server it could not reach.
_current_url: str | None = None


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """:func:`passbridge.logging.configure_logging`, imported on first use (structlog is not needed for ``--help``)."""
    from passbridge.logging import configure_logging as configure

    configure(level, fmt)


def settings(*, server: bool = False) -> Settings:
    """Settings, with logging configured for this command: a ``server`` (producer, worker, sandbox) at
    ``PASSBRIDGE_LOG_LEVEL``, any other command at :func:`command_log_level`."""
    from passbridge.settings import SettingsError, get_settings

    try:
        s = get_settings()
    except SettingsError as exc:
        fail(str(exc))
    configure_logging(s.log_level if server else command_log_level(s), s.log_format)
    return s


def command_log_level(s: Settings) -> str:
    """The log level of a command an operator runs and reads (``klaviyo setup``, ``dlq replay``, ``up``, ...):
    ``PASSBRIDGE_LOG_LEVEL`` when it is set (environment or ``.env``), else warning.

    A server's info lines are its record; a command's answer is its table or its lines, and info lines from the
    code it runs (JSON when stderr is not a terminal) would bury it. Warnings and errors still show.
    """
    return s.log_level if "log_level" in s.model_fields_set else "warning"


def redis_url(s: Settings, *, start: bool = True) -> str:
    """The Redis URL: ``REDIS_URL``, or the embedded server (started on demand when ``start``)."""
    from passbridge.redis_server import RedisServerError, resolve_redis_url

    global _current_url
    try:
        _current_url = resolve_redis_url(
            s.redis_url, s.state_dir, start=start, appendfsync=s.redis_appendfsync
        )
    except RedisServerError as exc:
        fail(str(exc))
    return _current_url


def running_redis() -> Redis:
    """A client of the configured Redis, never of an embedded one started on demand: for the commands that read
    or act on queued data, an empty new server would answer "nothing there"."""
    from redis.asyncio import Redis

    return Redis.from_url(redis_url(settings(), start=False))


def redis_problem(exc: RedisError, url: str | None = None) -> str:
    """One line for a person: which Redis, and what went wrong, without the URL's credentials."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    from passbridge.logging import redact_text
    from passbridge.outage import describe_outage, redis_error_text, refuses_writes
    from passbridge.redis_client import redis_location

    url = url or _current_url
    where = f"Redis at {redis_location(url)}" if url else "Redis"
    if refuses_writes(exc):  # full or read-only: what it says and what to do, without the command's data
        return redact_text(f"{where} refused the write ({describe_outage(exc)})")
    text = redis_error_text(exc) or type(exc).__name__
    password = urlsplit(url).password if url else None
    if password:
        text = text.replace(password, "***")
    if isinstance(exc, RedisConnectionError | RedisTimeoutError):
        return redact_text(f"{where} is unreachable ({text}); check REDIS_URL or start it")
    return redact_text(f"{where} failed: {text}")


def plain(value: object) -> str:
    """``value`` as text that is safe on a terminal: control characters shown as ``\\xNN``, never sent.

    For output that Rich does not interpret (``typer.echo``).
    """
    text = str(value)
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text) if _CONTROL.search(text) else text


def safe(value: object) -> str:
    """``value`` for a Rich table cell or ``console.print``: :func:`plain`, and its ``[...]`` shown literally.

    Serials, event ids, reasons and Klaviyo's error details are data: Rich would otherwise read
    ``[link=...]`` as a hyperlink, drop ``[gold]`` and fail on a stray ``[/]``.
    """
    return escape(plain(value))


def fail(message: str, code: int = 1) -> NoReturn:
    """Print an error for a person and exit non-zero (the message is data: never read as markup)."""
    console.print("[bold red]error:[/] " + "\n".join(safe(line) for line in message.split("\n")))
    raise typer.Exit(code)


def check_can_listen(host: str, port: int) -> None:
    """Fail with one ``error:`` line when ``host:port`` cannot be listened on (in use, not an address of this
    host), before a server command announces itself or starts anything: uvicorn would say so only after.

    The probe binds as uvicorn does (``SO_REUSEADDR``), so a port in TIME_WAIT is no false alarm.
    """
    import socket

    if port == 0:
        return  # any free port
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror}")
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            fail(f"cannot listen on {host}:{port}: {exc.strerror or exc} (is another server running there?)")


def emit_json(doc: Any) -> None:
    """Print a JSON document on stdout."""
    import orjson

    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion; an unreachable Redis or an unusable secret key is a one-line error.

    Every Redis-backed command goes through here, so these failures never show as a traceback.
    """
    import asyncio

    from redis.exceptions import RedisError

    from passbridge.crypto import SecretKeyError
    from passbridge.logging import redact_text

    try:
        return asyncio.run(coro)
    except SecretKeyError as exc:
        fail(str(exc))
    except RedisError as exc:
        fail(redis_problem(exc))
    except OSError as exc:
        # A socket error redis-py did not wrap, or a state-dir file it could not write (secret.key).
        fail(redact_text(str(exc) or type(exc).__name__))
