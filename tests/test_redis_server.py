"""The embedded Redis: one server per state dir, even when processes start together, and a recorded server is
trusted (used or stopped) only while it is still the server of the recorded data dir."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_sync

from passbridge.redis_server import (
    STATE_FILE,
    RedisServer,
    RedisServerError,
    ensure_embedded,
    read_state,
    start_redis,
    stop_embedded,
)
from tests.conftest import pid_alive

ROOT = Path(__file__).resolve().parents[1]


def _redis_pids_serving(data_dir: Path) -> list[int]:
    """Every live redis-server process working in ``data_dir`` (its cwd, see passbridge.redis_server)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (
                b"redis-server" in (entry / "cmdline").read_bytes()
                and Path(os.readlink(entry / "cwd")) == data_dir.resolve()
            ):
                pids.append(int(entry.name))
    return pids


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A state dir whose embedded servers are all stopped after the test, whatever happens."""
    state = tmp_path / "state"
    yield state
    for pid in _redis_pids_serving(state / "redis"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def test_processes_starting_together_share_one_server(state_dir: Path) -> None:
    """Four processes asking for the embedded Redis at once get the same URL, and one server runs."""
    code = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from passbridge.redis_server import ensure_embedded
        sys.stdout.write(ensure_embedded(Path({str(state_dir)!r})).url)
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err.decode() for _, err in outputs]
    urls = {out.decode() for out, _ in outputs}
    assert len(urls) == 1, urls
    assert len(_redis_pids_serving(state_dir / "redis")) == 1
    recorded = read_state(state_dir)
    assert recorded is not None
    assert recorded.url == urls.pop()
    assert stop_embedded(state_dir)
    assert _redis_pids_serving(state_dir / "redis") == []


def test_a_stale_record_pointing_at_another_redis_is_neither_used_nor_stopped(
    state_dir: Path, redis_server: RedisServer
) -> None:
    """The record names a port and pid that now belong to another Redis (the test session's): it is ignored,
    a server of our own is started, and stopping ours leaves the other one running."""
    state_dir.mkdir(parents=True)
    stale = json.dumps(
        {
            "url": redis_server.url,
            "pid": redis_server.pid,
            "port": redis_server.port,
            "data_dir": str(state_dir / "redis"),
        }
    )
    (state_dir / STATE_FILE).write_text(stale)
    assert read_state(state_dir) is None
    assert not stop_embedded(state_dir)  # nothing of ours was running: the other server is not signalled
    assert pid_alive(redis_server.pid)

    (state_dir / STATE_FILE).write_text(stale)
    ours = ensure_embedded(state_dir)
    assert ours.port != redis_server.port
    assert ours.pid != redis_server.pid
    assert stop_embedded(state_dir)
    assert not pid_alive(ours.pid)
    assert pid_alive(redis_server.pid)
    assert redis_sync.Redis.from_url(redis_server.url).ping()


def test_a_recorded_pid_reused_by_another_process_is_not_killed(state_dir: Path) -> None:
    """A live pid that is not our Redis is left alone by ``stop``: known by its working directory (a record
    without a start time) or by a start time that is not the pid's."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        server = RedisServer("redis://127.0.0.1:1/0", sleeper.pid, 1, state_dir / "redis")
        server.stop(timeout=0.5)
        assert sleeper.poll() is None
        stat = Path(f"/proc/{sleeper.pid}/stat").read_text().rpartition(")")[2].split()
        other_start = int(stat[19]) - 1
        RedisServer(server.url, sleeper.pid, 1, state_dir / "redis", other_start).stop(timeout=0.5)
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_an_explicit_port_in_use_is_refused(tmp_path: Path, redis_server: RedisServer) -> None:
    """redis-server daemonizes before it binds, so without a check the launch would 'succeed' and the other
    Redis on that port would be taken for ours."""
    with pytest.raises(RedisServerError, match=f"port {redis_server.port} .* in use"):
        start_redis(tmp_path / "redis", redis_server.port)
    assert pid_alive(redis_server.pid)


def test_cli_redis_start_on_a_taken_port_is_one_clear_error(
    state_dir: Path, tmp_path: Path, redis_server: RedisServer
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PASSBRIDGE_") and k != "REDIS_URL"}
    env["PASSBRIDGE_STATE_DIR"] = str(state_dir)
    result = subprocess.run(
        [sys.executable, "-m", "passbridge", "redis", "start", "--port", str(redis_server.port)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"port {redis_server.port}" in result.stderr
    assert "in use" in result.stderr
    assert "Traceback" not in result.stderr
    assert pid_alive(redis_server.pid)


def test_a_server_whose_data_dir_was_deleted_is_still_stopped(tmp_path: Path) -> None:
    """Known by its pid and start time, not only its working directory: pytest's clean-up of an older run's
    temp dirs (or an operator's ``rm -rf``) used to leave the server running with nobody able to stop it."""
    server = start_redis(tmp_path / "redis", appendonly=False)
    try:
        (tmp_path / "redis").rename(tmp_path / "garbage")
        subprocess.run(["rm", "-rf", str(tmp_path / "garbage")], check=True)
        server.stop(timeout=5)
        assert not pid_alive(server.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, signal.SIGKILL)


def _wrapped_redis_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> None:
    """Point ``PASSBRIDGE_REDIS_SERVER`` at a script that runs the real binary with ``extra`` options last."""
    from passbridge.redis_server import redis_server_binary

    script = tmp_path / "redis-server-wrapped"
    script.write_text(f'#!/bin/sh\nexec {redis_server_binary()} "$@" {" ".join(extra)}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PASSBRIDGE_REDIS_SERVER", str(script))


def test_a_start_that_fails_leaves_no_server_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that never answers (here: it listens on no TCP port) is stopped when the start gives up, so
    no unrecorded server is left on the data dir for the next command to start a second one beside."""
    _wrapped_redis_server(tmp_path, monkeypatch, "--port", "0")
    data_dir = tmp_path / "redis"
    try:
        with pytest.raises(RedisServerError, match="did not answer PING within 1 s"):
            start_redis(data_dir, ready_timeout=1)
        assert _redis_pids_serving(data_dir) == []
    finally:
        for pid in _redis_pids_serving(data_dir):
            os.kill(pid, signal.SIGKILL)


def test_a_server_loading_a_large_aof_is_waited_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the AOF loads the server answers LOADING: the start waits for the load however long it takes
    (here about 2 s, against a 0.5 s limit on silence) instead of giving up on a live server."""
    data_dir = tmp_path / "redis"
    first = start_redis(data_dir)
    client = redis_sync.Redis.from_url(first.url)
    client.mset({f"k{i}": "v" for i in range(20)})
    client.close()
    first.stop()
    # Redis's own test knob: 100 ms per key loaded.
    _wrapped_redis_server(tmp_path, monkeypatch, "--key-load-delay", "100000")
    try:
        server = start_redis(data_dir, ready_timeout=0.5)
        client = redis_sync.Redis.from_url(server.url)
        assert client.dbsize() == 20
        client.close()
        server.stop()
    finally:
        for pid in _redis_pids_serving(data_dir):
            os.kill(pid, signal.SIGKILL)


def _passbridge(state_dir: Path, cwd: Path, *args: str, **env_extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PASSBRIDGE_") and k != "REDIS_URL"}
    env.update(PASSBRIDGE_STATE_DIR=str(state_dir), **env_extra)
    return subprocess.run(
        [sys.executable, "-m", "passbridge", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_embedded_servers_fsync_policy_is_the_setting_and_follows_its_changes(
    state_dir: Path, tmp_path: Path
) -> None:
    """PASSBRIDGE_REDIS_APPENDFSYNC reaches the server started on demand, and a later command with another value
    changes the running server's policy (Redis applies it at once), so no restart is needed."""
    started = _passbridge(state_dir, tmp_path, "redis", "start", PASSBRIDGE_REDIS_APPENDFSYNC="always")
    assert started.returncode == 0, started.stderr
    client = redis_sync.Redis.from_url(started.stdout.strip())
    try:
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        again = _passbridge(state_dir, tmp_path, "redis", "start")  # the default: everysec
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip() == started.stdout.strip()  # the same server, not a second one
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
    finally:
        client.close()
    refused = _passbridge(state_dir, tmp_path, "redis", "start", PASSBRIDGE_REDIS_APPENDFSYNC="sometimes")
    assert refused.returncode != 0
    assert "redis_appendfsync" in refused.stderr.lower() or "appendfsync" in refused.stderr.lower()
    assert "Traceback" not in refused.stderr
