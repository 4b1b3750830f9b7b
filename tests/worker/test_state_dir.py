"""``passbridge worker`` (and ``producer``) started without a usable state dir or secret key: one clear line,
no traceback (real processes against a real Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from redis.asyncio import Redis

from klaviyo_sandbox.testing import SandboxServer
from passbridge.crypto import load_cipher
from tests.factories import make_account

from .e2e import Pipeline, Workers, drained, engines_running, worker_env
from .helpers import pass_event


def _worker(
    env: dict[str, str], timeout: float = 60, *args: str, command: str = "worker"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "passbridge"), command, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _blocked_state_dir(tmp_path: Path) -> Path:
    """A state dir that cannot be created (its parent is a file: unwritable even for root)."""
    parent = tmp_path / "not-a-dir"
    parent.write_text("")
    return parent / "state"


def test_a_worker_whose_state_dir_is_unwritable_exits_with_one_line(redis_url: str, tmp_path: Path) -> None:
    state = _blocked_state_dir(tmp_path)
    env = worker_env(redis_url, "http://127.0.0.1:9", Fernet.generate_key().decode(), state)
    result = _worker(env)
    assert result.returncode == 1, result.stderr
    assert "cannot write the worker's metrics files under PASSBRIDGE_STATE_DIR" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr

    # No express lane (no metrics files) and no secret key: the generated key is what cannot be written.
    env.pop("PASSBRIDGE_SECRET_KEY")
    env["PASSBRIDGE_WORKER_EXPRESS_LANE"] = "false"
    result = _worker(env)
    assert result.returncode == 1, result.stderr
    assert "no PASSBRIDGE_SECRET_KEY is set and" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_a_producer_whose_state_dir_is_unwritable_exits_with_one_line(redis_url: str, tmp_path: Path) -> None:
    env = worker_env(
        redis_url, "http://127.0.0.1:9", Fernet.generate_key().decode(), _blocked_state_dir(tmp_path)
    )
    result = _worker(env, 60, "--port", "0", "--workers", "2", command="producer")
    assert result.returncode == 1, result.stderr
    assert "cannot write the producer's metrics files" in result.stderr
    env.pop("PASSBRIDGE_SECRET_KEY")
    result = _worker(env, 60, "--port", "0", command="producer")
    assert result.returncode == 1, result.stderr
    assert "no PASSBRIDGE_SECRET_KEY is set and" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


async def test_a_worker_without_the_secret_key_exits_instead_of_generating_a_useless_one(
    redis: Redis, redis_url: str, secret_key: str, tmp_path: Path
) -> None:
    """Accounts stored with the producer's key; a worker with neither that key nor its state dir used to
    generate a key of its own and fail every batch, with a traceback each, while the events waited."""
    await make_account(redis, load_cipher(secret_key, tmp_path / "producer"), "acme")
    state = tmp_path / "worker-state"
    env = worker_env(redis_url, "http://127.0.0.1:9", secret_key, state)
    env.pop("PASSBRIDGE_SECRET_KEY")
    result = _worker(env, timeout=30)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "cannot decrypt the secrets of the 1 account(s) in Redis" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stdout + result.stderr
    assert not (state / "secret.key").exists()  # the next start with the right settings finds none
    assert secret_key not in result.stdout + result.stderr

    # The same worker with the producer's key file in its state dir starts (and is stopped here).
    state.mkdir(exist_ok=True)
    (state / "secret.key").write_text(secret_key)
    assert await asyncio.to_thread(_still_running_after, env, 5)


def _still_running_after(env: dict[str, str], seconds: float) -> bool:
    """Whether a worker started with ``env`` still runs after ``seconds`` (it is stopped then)."""
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "passbridge"), "worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=seconds)
        return proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB file system of its own (tmpfs), to fill up: needs the right to mount (root in CI)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path) -> None:
    """Write (unbuffered) until the file system is full."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 65536)
        with contextlib.suppress(OSError):
            while True:  # the last partial block
                os.write(fd, b"\0" * 512)
    finally:
        os.close(fd)


async def test_a_worker_outlives_its_state_dir_disk_filling_up(
    small_disk: Path,
    pipeline: Pipeline,
    redis_url: str,
    sandbox_server: SandboxServer,
    secret_key: str,
    tmp_path: Path,
) -> None:
    """Metrics of the worker and its express lane live in files under the state dir, written through a memory
    map. On a full disk a write to a page of those (sparse) files was a SIGBUS: the worker died at once, its
    events waited for another worker. Now the files are allocated up front, and a metric that cannot get a
    file is skipped (one error line) while the events go through."""
    logs = tmp_path / "logs"
    logs.mkdir()
    workers = Workers(worker_env(redis_url, sandbox_server.url, secret_key, small_disk / "state"), logs)
    try:
        await pipeline.add_account("acme")
        workers.start(1)
        await engines_running(pipeline.redis, 2)
        await asyncio.to_thread(_fill, small_disk)
        for account_id in ("beta", "gamma"):  # new label sets: new metric values to write
            await pipeline.add_account(account_id)
        events = [
            pass_event(a, f"S{s}", n) for a in ("acme", "beta", "gamma") for s in range(20) for n in range(3)
        ]
        await pipeline.put(events)
        await drained(pipeline, workers, timeout=60)
        assert workers.procs[0].poll() is None, workers.logs()
        for account_id in ("acme", "beta", "gamma"):
            expected = sorted(e.event_id for e in events if e.account_id == account_id)
            assert sorted(pipeline.stored_unique_ids(account_id)) == expected
    finally:
        workers.stop_all()
