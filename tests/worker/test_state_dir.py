"""``passbridge worker`` (and ``producer``) started without a usable state dir or secret key: one clear line,
no traceback (real processes against a real Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path

from cryptography.fernet import Fernet
from redis.asyncio import Redis

from passbridge.crypto import load_cipher
from tests.factories import make_account

from .e2e import worker_env


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
