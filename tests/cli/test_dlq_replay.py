"""``passbridge dlq replay`` as a real process against a real Redis: it never takes an account's backlog over
PASSBRIDGE_BACKLOG_HIGH_WATER (live ingest would answer 503), waits for the workers in waves by default, stops at
the first full backlog with --no-wait, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import orjson
from redis.asyncio import Redis

from passbridge.keys import account_keys
from tests.cli.test_cli import PASSBRIDGE, cli_env, run
from tests.worker.helpers import fill_dlq, settle_pending
from worker import dlq

HIGH_WATER = 120
TOTAL = 300


async def seeded(redis: Redis) -> list[str]:
    """300 dead letters of account acme (2 serials), oldest first; its backlog empty."""
    await fill_dlq(redis, "acme", ["S1", "S2"], TOTAL // 2)
    assert int(await redis.get(account_keys("acme").depth) or 0) == 0
    return [m.decode() for m in await redis.zrange(account_keys("acme").dlq, 0, -1)]


def env(tmp_path: Path, secret_key: str, redis_url: str) -> dict[str, str]:
    return cli_env(tmp_path / "state", secret_key, redis_url) | {
        "PASSBRIDGE_BACKLOG_HIGH_WATER": str(HIGH_WATER)
    }


def start(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [PASSBRIDGE, *args], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


async def test_no_wait_replays_what_fits_and_says_what_is_left(
    redis: Redis, redis_url: str, tmp_path: Path, secret_key: str
) -> None:
    oldest_first = await seeded(redis)
    result = run(
        ["dlq", "replay", "-a", "acme", "--all", "--yes", "--no-wait"],
        env(tmp_path, secret_key, redis_url),
        tmp_path,
    )
    assert result.returncode == 1, result.stderr
    assert result.stdout == f"replayed: {HIGH_WATER} of {TOTAL} selected\n"
    err = " ".join(result.stderr.split())
    assert f"account acme: room for {HIGH_WATER} of its {TOTAL} selected entries" in err
    assert (
        f"account acme's backlog is at its high-water mark ({HIGH_WATER} pending, "
        f"PASSBRIDGE_BACKLOG_HIGH_WATER={HIGH_WATER}): {TOTAL - HIGH_WATER} of the selected entries are still in "
        "the DLQ" in err
    )
    assert "Traceback" not in result.stderr
    assert int(await redis.get(account_keys("acme").depth)) == HIGH_WATER
    left = {m.decode() for m in await redis.zrange(account_keys("acme").dlq, 0, -1)}
    assert left == set(oldest_first[HIGH_WATER:])

    # Full: nothing more goes in; a single named entry is refused the same way.
    as_json = run(
        ["dlq", "replay", "-a", "acme", "--all", "--yes", "--no-wait", "--json"],
        env(tmp_path, secret_key, redis_url),
        tmp_path,
    )
    assert as_json.returncode == 1, as_json.stderr
    assert orjson.loads(as_json.stdout) == {
        "replayed": 0,
        "selected": TOTAL - HIGH_WATER,
        "accounts": {"acme": 0},
        "left": {"acme": TOTAL - HIGH_WATER},
        "interrupted": False,
    }
    one = run(
        ["dlq", "replay", oldest_first[-1], "--no-wait"], env(tmp_path, secret_key, redis_url), tmp_path
    )
    assert one.returncode == 1
    assert one.stdout == "replayed: 0 of 1 selected\n"
    assert "1 of the selected entries are still in the DLQ" in " ".join(one.stderr.split())
    assert await dlq.count(redis, "acme") == TOTAL - HIGH_WATER


async def test_waiting_replay_goes_on_in_waves_as_a_consumer_drains(
    redis: Redis, redis_url: str, tmp_path: Path, secret_key: str
) -> None:
    await seeded(redis)
    proc = start(
        ["dlq", "replay", "-a", "acme", "--all", "--yes", "--json"],
        env(tmp_path, secret_key, redis_url),
        tmp_path,
    )
    keys = account_keys("acme")
    drained = 0
    deadline = time.monotonic() + 60
    try:
        while proc.poll() is None or int(await redis.get(keys.depth) or 0) > 0:
            assert time.monotonic() < deadline, "the replay never finished"
            # The consumer takes 70 at a time: every wave has to wait for it.
            depth = int(await redis.get(keys.depth) or 0)
            assert depth <= HIGH_WATER
            drained += await settle_pending(redis, "acme", 70)
            await asyncio.sleep(0.2)
        stdout, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert orjson.loads(stdout) == {
        "replayed": TOTAL,
        "selected": TOTAL,
        "accounts": {"acme": TOTAL},
        "left": {},
        "interrupted": False,
    }
    assert "waiting for the workers to drain it" in " ".join(stderr.split())
    assert drained == TOTAL
    assert await dlq.count(redis, "acme") == 0


async def test_ctrl_c_stops_between_waves_and_keeps_what_was_replayed(
    redis: Redis, redis_url: str, tmp_path: Path, secret_key: str
) -> None:
    oldest_first = await seeded(redis)
    proc = start(
        ["dlq", "replay", "-a", "acme", "--all", "--yes"], env(tmp_path, secret_key, redis_url), tmp_path
    )
    try:
        deadline = time.monotonic() + 30
        while await dlq.count(redis, "acme") > TOTAL - HIGH_WATER:
            assert time.monotonic() < deadline
            assert proc.poll() is None
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # waiting for room now: nothing drains the backlog
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert stdout == f"replayed: {HIGH_WATER} of {TOTAL} selected\n"
    err = " ".join(stderr.split())
    assert f"stopped: {TOTAL - HIGH_WATER} of account acme's selected entries are still in the DLQ" in err
    assert "Traceback" not in stderr
    left = {m.decode() for m in await redis.zrange(account_keys("acme").dlq, 0, -1)}
    assert left == set(oldest_first[HIGH_WATER:])
    assert int(await redis.get(account_keys("acme").depth)) == HIGH_WATER
