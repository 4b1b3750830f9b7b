"""``passbridge dlq replay`` as a real process against a real Redis: it never takes an account's backlog over its
replay limit (PASSBRIDGE_BACKLOG_HIGH_WATER less the PASSBRIDGE_REPLAY_RESERVE kept for live ingest, which the
producer answers 503 beyond the mark), waits for the workers in waves by default, stops at the first backlog at
its limit with --no-wait, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import orjson
from redis.asyncio import Redis

from passbridge.cli.dlq_cmd import WAIT_POLL_S
from passbridge.keys import account_keys
from passbridge.settings import Settings
from producer.app import create_app
from tests.cli.test_cli import PASSBRIDGE, cipher, cli_env, run
from tests.conftest import serve
from tests.factories import event, make_account
from tests.worker.helpers import fill_dlq, settle_pending
from worker import dlq

HIGH_WATER = 120
RESERVE = 0.25
#: floor(HIGH_WATER * (1 - RESERVE)): how far a replay fills the backlog; the 30 above it are live ingest's.
LIMIT = 90
TOTAL = 300
LIMIT_TEXT = (
    f"{LIMIT} pending: PASSBRIDGE_BACKLOG_HIGH_WATER={HIGH_WATER} less the PASSBRIDGE_REPLAY_RESERVE={RESERVE} "
    "kept for live ingest"
)


async def seeded(redis: Redis) -> list[str]:
    """300 dead letters of account acme (2 serials), oldest first; its backlog empty."""
    await fill_dlq(redis, "acme", ["S1", "S2"], TOTAL // 2)
    assert int(await redis.get(account_keys("acme").depth) or 0) == 0
    return [m.decode() for m in await redis.zrange(account_keys("acme").dlq, 0, -1)]


def env(tmp_path: Path, secret_key: str, redis_url: str) -> dict[str, str]:
    return cli_env(tmp_path / "state", secret_key, redis_url) | {
        "PASSBRIDGE_BACKLOG_HIGH_WATER": str(HIGH_WATER),
        "PASSBRIDGE_REPLAY_RESERVE": str(RESERVE),
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
    assert result.stdout == f"replayed: {LIMIT} of {TOTAL} selected\n"
    err = " ".join(result.stderr.split())
    assert (
        f"account acme: room for {LIMIT} of its {TOTAL} selected entries under its replay limit ({LIMIT_TEXT})"
        in err
    )
    assert (
        f"account acme's backlog has reached its replay limit ({LIMIT} pending; a replay fills it up to {LIMIT_TEXT}): "
        f"{TOTAL - LIMIT} of the selected entries are still in the DLQ" in err
    )
    assert "Traceback" not in result.stderr
    assert int(await redis.get(account_keys("acme").depth)) == LIMIT
    left = {m.decode() for m in await redis.zrange(account_keys("acme").dlq, 0, -1)}
    assert left == set(oldest_first[LIMIT:])

    # Full: nothing more goes in; a single named entry is refused the same way.
    as_json = run(
        ["dlq", "replay", "-a", "acme", "--all", "--yes", "--no-wait", "--json"],
        env(tmp_path, secret_key, redis_url),
        tmp_path,
    )
    assert as_json.returncode == 1, as_json.stderr
    assert orjson.loads(as_json.stdout) == {
        "replayed": 0,
        "selected": TOTAL - LIMIT,
        "accounts": {"acme": 0},
        "left": {"acme": TOTAL - LIMIT},
        "interrupted": False,
    }
    one = run(
        ["dlq", "replay", oldest_first[-1], "--no-wait"], env(tmp_path, secret_key, redis_url), tmp_path
    )
    assert one.returncode == 1
    assert one.stdout == "replayed: 0 of 1 selected\n"
    assert "1 of the selected entries are still in the DLQ" in " ".join(one.stderr.split())
    assert await dlq.count(redis, "acme") == TOTAL - LIMIT


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
            assert depth <= LIMIT
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
        while await dlq.count(redis, "acme") > TOTAL - LIMIT:
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
    assert stdout == f"replayed: {LIMIT} of {TOTAL} selected\n"
    err = " ".join(stderr.split())
    assert f"stopped: {TOTAL - LIMIT} of account acme's selected entries are still in the DLQ" in err
    assert "Traceback" not in stderr
    left = {m.decode() for m in await redis.zrange(account_keys("acme").dlq, 0, -1)}
    assert left == set(oldest_first[LIMIT:])
    assert int(await redis.get(account_keys("acme").depth)) == LIMIT


async def test_a_waiting_replay_leaves_the_reserve_to_live_ingest(
    redis: Redis, redis_url: str, tmp_path: Path, secret_key: str, settings: Settings
) -> None:
    """The point of the reserve: while a replay waits for room, the account's live ingest through the producer
    is still accepted, and the replay goes on only once the workers have drained the backlog under its limit,
    not as soon as a slot under the mark is free."""
    await seeded(redis)
    await make_account(redis, cipher(secret_key, tmp_path / "state"))
    keys = account_keys("acme")
    producer = serve(
        create_app(
            settings.model_copy(update={"backlog_high_water": HIGH_WATER, "replay_reserve": RESERVE}),
            redis_url,
        )
    )
    proc = start(
        ["dlq", "replay", "-a", "acme", "--all", "--yes"], env(tmp_path, secret_key, redis_url), tmp_path
    )

    async def until(what: str, done: Callable[[], Awaitable[bool]]) -> None:
        deadline = time.monotonic() + 30
        while not await done():
            assert time.monotonic() < deadline, what
            assert proc.poll() is None, proc.communicate()
            await asyncio.sleep(0.05)

    async def dlq_count_is(n: int) -> bool:
        return await dlq.count(redis, "acme") <= n

    try:
        async with httpx.AsyncClient(
            base_url=producer.url, headers={"authorization": "Bearer tok-acme"}, timeout=10
        ) as http:
            await until("the first wave", lambda: dlq_count_is(TOTAL - LIMIT))
            assert (await dlq.count(redis, "acme"), int(await redis.get(keys.depth))) == (
                TOTAL - LIMIT,
                LIMIT,
            )
            await asyncio.sleep(2 * WAIT_POLL_S)  # the replay waits now: nothing drains the backlog

            # Live ingest gets the whole reserve, up to the mark; the mark still holds for it.
            live = [event(i) for i in range(HIGH_WATER - LIMIT)]
            r = await http.post("/v1/accounts/acme/events", json=live)
            assert r.status_code == 202, r.text
            r = await http.post("/v1/accounts/acme/events", json=event(HIGH_WATER))
            assert r.status_code == 503, r.text
            assert int(await redis.get(keys.depth)) == HIGH_WATER

            # The workers drain 25: room under the mark, none under the replay limit; the replay keeps waiting.
            assert await settle_pending(redis, "acme", 25) == 25
            await asyncio.sleep(3 * WAIT_POLL_S)
            assert (await dlq.count(redis, "acme"), int(await redis.get(keys.depth))) == (TOTAL - LIMIT, 95)

            # 10 more: 5 under the limit, less than a wave of a 90 limit (9), so the replay still waits ...
            assert await settle_pending(redis, "acme", 10) == 10
            await asyncio.sleep(3 * WAIT_POLL_S)
            assert (await dlq.count(redis, "acme"), int(await redis.get(keys.depth))) == (TOTAL - LIMIT, 85)
            # ... and 10 more: 15 under it, a wave's worth; the replay takes exactly those.
            assert await settle_pending(redis, "acme", 10) == 10
            await until("the second wave", lambda: dlq_count_is(TOTAL - LIMIT - 15))
            assert (await dlq.count(redis, "acme"), int(await redis.get(keys.depth))) == (
                TOTAL - LIMIT - 15,
                LIMIT,
            )
            r = await http.post("/v1/accounts/acme/events", json=[event(i) for i in range(100, 130)])
            assert r.status_code == 202, r.text
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=20)
    finally:
        producer.stop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert stdout == f"replayed: {LIMIT + 15} of {TOTAL} selected\n"
    err = " ".join(stderr.split())
    assert (
        f"account acme's backlog has reached its replay limit ({LIMIT} pending; a replay fills it up to {LIMIT_TEXT})"
        in err
    )
    assert "Traceback" not in stderr
