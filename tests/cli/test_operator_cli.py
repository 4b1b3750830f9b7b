"""The operator commands (``status``, ``serial``, ``event``, ``report``, ``dlq``, ``engine``, ``accounts``)
against a real Redis: what they print when the data is hostile, which Redis and which accounts they read, and
what they say about waiting events.

What reaches a terminal or a pipe (hostile data, stdout against stderr) is checked on real processes; what a
command answers is checked in this process (typer's CliRunner) with exactly the process's environment and
working directory, which spares a second of start-up per command."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from cryptography.fernet import MultiFernet
from redis.asyncio import Redis

from passbridge.account_check import read_flow
from passbridge.accounts import AccountState, AccountStore
from passbridge.crypto import load_cipher
from passbridge.keys import ACCOUNTS_INDEX, WORKERS, WORKERS_INFO, account_keys
from passbridge.metrics import Recorder
from passbridge.queue import enqueue
from tests.cli.test_cli import PASSBRIDGE, cli_env, run
from tests.conftest import InProcessCli, async_wait_for
from tests.factories import make_account
from tests.worker.e2e import worker_env
from tests.worker.helpers import dead_letter_head, pass_event, put
from worker import pause
from worker.dlq import DLQEntry
from worker.queue import WorkQueue


def env_for(state_dir: Path, secret_key: str, redis_url: str | None) -> dict[str, str]:
    """The CLI's environment, never forcing colours: any escape sequence in the output came from data."""
    # The dedup window tests.worker.helpers.put enqueues with (event id → serial is found through it).
    env = cli_env(state_dir, secret_key, redis_url) | {"COLUMNS": "250", "PASSBRIDGE_DEDUP_TTL_S": "3600"}
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "CLICOLOR_FORCE"):
        env.pop(name, None)
    return env


def cipher(secret_key: str, tmp_path: Path) -> MultiFernet:
    return load_cipher(secret_key, tmp_path / "state")


async def dead_letter(
    redis: Redis, account_id: str, serial: str, *, reason: str, detail: str, worker: str = "w1"
) -> DLQEntry:
    """Claim ``serial``, dead-letter its head event with ``reason`` and an error ``detail``, release it."""
    now = int(time.time() * 1000)
    q = WorkQueue(redis, worker_id=worker)
    return await dead_letter_head(q, redis, account_id, serial, at_ms=now, reason=reason, detail=detail)


def output(result: Any) -> str:
    return str(result.stdout) + str(result.stderr)


class TestHostileData:
    """Serials, event ids, reasons and Klaviyo details are shown as they are: never read as Rich markup, and
    their control characters never reach the terminal."""

    #: An event id stored before ingest refused control characters: retitles the window, clears the screen.
    ESCAPING_ID = "evt-\x1b]0;pwned\x07\x1b[2J-1"
    MARKUP_SERIAL = "PASS-[gold]-1"
    LINK_SERIAL = "[link=https://evil.example]click[/link]"

    async def seed(self, redis: Redis, secret_key: str, tmp_path: Path) -> None:
        await make_account(redis, cipher(secret_key, tmp_path), "acme")
        await put(
            redis,
            pass_event("acme", self.MARKUP_SERIAL, 0, event_id="evt-[/]-0"),
            pass_event("acme", self.MARKUP_SERIAL, 1, event_id="evt-[object Object]-1"),
            pass_event("acme", self.LINK_SERIAL, 0, event_id=self.ESCAPING_ID),
        )
        await dead_letter(
            redis,
            "acme",
            self.MARKUP_SERIAL,
            reason="permanent error: x[/gold] HTTP 400",
            detail="[link=https://evil.example]bad[/link] \x1b[31mred",
        )

    async def test_every_command_shows_data_literally(
        self, redis: Redis, redis_url: str, tmp_path: Path, secret_key: str
    ) -> None:
        await self.seed(redis, secret_key, tmp_path)
        env = env_for(tmp_path / "state", secret_key, redis_url)
        commands = [
            ["dlq", "list"],
            ["dlq", "show", "evt-[/]-0"],
            ["serial", "acme", self.MARKUP_SERIAL],
            ["serial", "acme", self.LINK_SERIAL],
            ["event", "acme", "evt-[/]-0"],
            ["event", "acme", "evt-[object Object]-1"],
            ["engine", "history", "acme", "--serial", self.LINK_SERIAL],
            ["engine", "status"],
            ["status"],
        ]
        outs = []
        for args in commands:
            result = run(args, env, tmp_path)
            out = output(result)
            assert result.returncode == 0, (args, out)
            assert "Traceback" not in out, (args, out)
            assert "\x1b" not in out, (args, out)
            assert "\x07" not in out, (args, out)
            outs.append(out)
        dlq_list, dlq_show, serial_markup, serial_link, event_dead, event_queued, history, _, _ = outs
        assert "evt-[/]-0" in dlq_list
        assert self.MARKUP_SERIAL in dlq_list
        assert "x[/gold] HTTP 400" in dlq_show
        assert "[link=https://evil.example]bad[/link] \\x1b[31mred" in dlq_show
        assert "evt-[object Object]-1" in serial_markup
        assert "evt-\\x1b]0;pwned\\x07\\x1b[2J-1" in serial_link
        assert self.LINK_SERIAL in serial_link
        assert "x[/gold] HTTP 400" in event_dead
        assert "evt-[object Object]-1" in event_queued
        assert "evt-\\x1b]0;pwned\\x07\\x1b[2J-1" in history


class TestWhichRedisAndWhichAccounts:
    """The ``dlq`` and ``engine`` commands read the configured Redis only, and see every account ``status``
    sees."""

    COMMANDS = (
        ["dlq", "list"],
        ["dlq", "show", "evt-1"],
        ["dlq", "purge", "--all", "--yes"],
        ["engine", "status"],
        ["engine", "history", "acme", "--serial", "S1"],
        ["engine", "resume", "acme"],
    )

    async def test_no_redis_configured_is_an_error_not_an_empty_answer(
        self, cli_in_process: InProcessCli, tmp_path: Path, secret_key: str
    ) -> None:
        state = tmp_path / "state"
        env = env_for(state, secret_key, None)
        try:
            for args in self.COMMANDS:
                result = await cli_in_process(args, env)
                assert result.returncode == 1, (args, output(result))
                assert " ".join(result.stderr.split()) == (
                    "error: REDIS_URL is unset and no embedded Redis is running; start one with "
                    "`passbridge redis start`"
                ), args
                assert not (state / "redis.json").exists(), args  # no empty Redis was started
                assert not (state / "secret.key").exists(), args  # nor a key made up
        finally:
            record = state / "redis.json"
            if record.exists():
                os.kill(int(orjson.loads(record.read_bytes())["pid"]), signal.SIGTERM)

    async def test_a_removed_account_with_dead_letters_stays_visible(
        self, cli_in_process: InProcessCli, redis: Redis, redis_url: str, tmp_path: Path, secret_key: str
    ) -> None:
        await make_account(redis, cipher(secret_key, tmp_path), "acme")
        await make_account(redis, cipher(secret_key, tmp_path), "globex")
        await put(redis, pass_event("acme", "S1", 0))
        await dead_letter(redis, "acme", "S1", reason="permanent error: HTTP 400 invalid", detail="bad")
        env = env_for(tmp_path / "state", secret_key, redis_url)
        removed = await cli_in_process(["accounts", "remove", "acme", "--yes"], env)
        assert removed.returncode == 0, output(removed)
        assert await redis.zscore("pb:active", "acme") is None  # nothing pending: the engine forgot it

        listed = await cli_in_process(["dlq", "list", "--json"], env)
        assert listed.returncode == 0, output(listed)
        doc = orjson.loads(listed.stdout)
        assert [(e["account"], e["event_id"]) for e in doc["entries"]] == [("acme", "acme-S1-0")]
        assert doc["totals"] == {"acme": 1, "globex": 0}
        engine = orjson.loads((await cli_in_process(["engine", "status", "--json"], env)).stdout)
        assert {a["account"]: a["dlq"] for a in engine["accounts"]} == {"acme": 1, "globex": 0}
        status = orjson.loads((await cli_in_process(["status", "--json"], env)).stdout)
        assert {a["account"]: a["dlq"] for a in status["accounts"]} == {"acme": 1, "globex": 0}

        purged = await cli_in_process(["dlq", "purge", "--all", "--yes", "--json"], env)
        assert orjson.loads(purged.stdout)["purged"] == 1, output(purged)
        # Nothing left of it: it is no longer listed.
        status = orjson.loads((await cli_in_process(["status", "--json"], env)).stdout)
        assert [a["account"] for a in status["accounts"]] == ["globex"]


async def test_report_since_beyond_the_retention_reads_the_kept_days_and_says_so(
    cli_in_process: InProcessCli, redis: Redis, redis_url: str, tmp_path: Path, secret_key: str
) -> None:
    """``--since 730d`` (two years) means "all there is": the last 400 days, not the oldest 400 days from two years ago."""
    await redis.sadd(ACCOUNTS_INDEX, "acme")  # counts are kept for known accounts only
    rec = Recorder()
    now = datetime.now(UTC)
    for _ in range(3):
        rec.tally("acme", now - timedelta(hours=1), "created", "apple", "loyalty")
    rec.tally("acme", now - timedelta(hours=1), "installed", "apple", "loyalty")
    rec.tally("acme", now - timedelta(days=350), "created", "apple", "loyalty")
    assert await rec.flush(redis, now_s=now.timestamp()) > 0
    env = env_for(tmp_path / "state", secret_key, redis_url)

    result = await cli_in_process(["report", "acme", "--since", "730d", "--json"], env)
    assert result.returncode == 0, output(result)
    doc = orjson.loads(result.stdout)
    assert (doc["total"]["created"], doc["total"]["installed"]) == (4, 1)
    kept_since = datetime.fromisoformat(doc["since"])
    assert timedelta(days=400) <= now - kept_since <= timedelta(days=401)
    assert doc["requested_since"] < doc["since"]
    assert "kept 400 days" in doc["note"]

    text = await cli_in_process(["report", "acme", "--since", "730d"], env)
    assert "note: report counters are kept 400 days" in " ".join(output(text).split())
    within = orjson.loads((await cli_in_process(["report", "acme", "--since", "30d", "--json"], env)).stdout)
    assert "note" not in within
    assert within["total"]["created"] == 3
    gone = await cli_in_process(["report", "acme", "--since", "1095d", "--until", "730d", "--json"], env)
    assert orjson.loads(gone.stdout)["total"]["created"] == 0
    assert "nothing is left to count" in orjson.loads(gone.stdout)["note"]


async def test_engine_resume_refuses_an_account_paused_in_the_registry(
    cli_in_process: InProcessCli, redis: Redis, redis_url: str, tmp_path: Path, secret_key: str
) -> None:
    """The sweep mirrors the registry: resuming only the engine's pause would be undone within seconds."""
    store = AccountStore(redis, cipher(secret_key, tmp_path))
    await make_account(redis, store.cipher, "acme")
    env = env_for(tmp_path / "state", secret_key, redis_url)
    updated = await cli_in_process(
        ["accounts", "update", "acme", "--state", "paused", "--reason", "merchant asked"], env
    )
    assert updated.returncode == 0, output(updated)
    assert await pause.reconcile(redis, store, "acme") == "paused"  # what the workers' sweep does

    result = await cli_in_process(["engine", "resume", "acme"], env)
    assert result.returncode == 1, output(result)
    assert " ".join(output(result).split()) == (
        "acme not resumed: the account is paused in the registry (merchant asked); "
        "`passbridge accounts update acme --state connected` resumes it"
    )
    assert (await pause.get_pause(redis, "acme")) is not None
    assert await redis.llen(account_keys("acme").pause_log) == 0  # no spurious closed interval

    # An auth pause (the engine set the registry to paused itself) is still resumed by the command.
    assert (await cli_in_process(["accounts", "update", "acme", "--state", "connected"], env)).returncode == 0
    assert await pause.reconcile(redis, store, "acme") == "resumed"
    await pause.pause_account(redis, store, "acme", "HTTP 401 not_authenticated")
    resumed = await cli_in_process(["engine", "resume", "acme", "--json"], env)
    assert orjson.loads(resumed.stdout)["resumed"] is True, output(resumed)
    assert (await store.get("acme")).state is AccountState.connected


async def test_engine_resume_check_says_what_failed(
    cli_in_process: InProcessCli, redis: Redis, redis_url: str, tmp_path: Path, secret_key: str
) -> None:
    """`--check` names why it did not resume: a missing set-up, or the Klaviyo call's own error. An unreachable
    Klaviyo says nothing about the credentials (it used to answer "credentials still rejected" for both)."""
    from passbridge.redis_server import free_port
    from worker.setup import Provisioned, store_provisioned

    store = AccountStore(redis, cipher(secret_key, tmp_path))
    await make_account(redis, store.cipher, "acme")
    await pause.pause_account(redis, store, "acme", "HTTP 401 not_authenticated")
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = env_for(tmp_path / "state", secret_key, redis_url) | {"PASSBRIDGE_KLAVIYO_BASE_URL": closed}

    result = await cli_in_process(["engine", "resume", "acme", "--check"], env)
    assert result.returncode == 1, output(result)
    assert " ".join(output(result).split()) == (
        "acme not resumed: not set up in Klaviyo: run `passbridge klaviyo setup --account acme`"
    )
    ids = {f: f"id-{f}" for f in ("data_source_id", "object_type_id", "schema_id", "source_mapping_id")}
    await store_provisioned(
        redis, "acme", Provisioned(**ids, relationship_id="r", revision="2026-10-15", provisioned_at=1.0)
    )
    result = await cli_in_process(["engine", "resume", "acme", "--check"], env)
    assert result.returncode == 1, output(result)
    said = " ".join(output(result).split())
    assert said.startswith("acme not resumed: the Klaviyo check failed: HTTP 401 no_credentials"), said
    key = await cli_in_process(["accounts", "update", "acme", "--klaviyo-api-key", "pk_" + "7" * 32], env)
    assert key.returncode == 0, output(key)
    result = await cli_in_process(["engine", "resume", "acme", "--check"], env)
    assert result.returncode == 1, output(result)
    said = " ".join(output(result).split())
    assert said.startswith("acme not resumed: the Klaviyo check failed: network error"), said
    assert "7777" not in said
    assert (await pause.get_pause(redis, "acme")) is not None  # still paused


class TestWhyWaiting:
    """A paused or throttled account's serials look due; the tools say why no worker takes them."""

    async def test_paused_account_and_an_event_older_than_the_dedup_window(
        self, cli_in_process: InProcessCli, redis: Redis, redis_url: str, tmp_path: Path, secret_key: str
    ) -> None:
        store = AccountStore(redis, cipher(secret_key, tmp_path))
        await make_account(
            redis, store.cipher, "acme", state=AccountState.paused, state_reason="billing hold"
        )
        assert await pause.reconcile(redis, store, "acme") == "paused"  # what the workers' sweep does
        # Received 8 days ago, still queued (a paused account's events wait): the 7-day dedup index forgot it.
        received = int(time.time() * 1000) - 8 * 86_400_000
        await enqueue(
            redis,
            "acme",
            [pass_event("acme", "S1", 0)],
            high_water=1000,
            dedup_window_s=7 * 86_400,
            now_ms=received,
        )
        env = env_for(tmp_path / "state", secret_key, redis_url) | {"PASSBRIDGE_DEDUP_TTL_S": str(7 * 86_400)}

        lost = await cli_in_process(["event", "acme", "acme-S1-0"], env)
        assert lost.returncode == 1
        assert "an older event is found with its serial" in " ".join(lost.stderr.split())
        found = await cli_in_process(["event", "acme", "acme-S1-0", "--serial", "S1", "--json"], env)
        assert found.returncode == 0, output(found)
        doc = orjson.loads(found.stdout)
        assert (doc["where"], doc["serial"], doc["position"]) == ("pending", "S1", 1)
        assert "the account is paused since" in doc["detail"]
        assert "(operator: billing hold); nothing is sent until it resumes" in doc["detail"]
        assert "free worker" not in doc["detail"]

        text = " ".join(output(await cli_in_process(["serial", "acme", "S1"], env)).split())
        assert "waiting: the account is paused since" in text
        status = await cli_in_process(["status"], env)
        assert "1 (held)" in output(status)
        # The pause's kind, which the README's steps for a paused account start from.
        assert re.search(r"acme is paused since \S+ \(kind operator\): billing hold", output(status)), output(
            status
        )

    async def test_throttled_account(
        self, cli_in_process: InProcessCli, redis: Redis, redis_url: str, tmp_path: Path, secret_key: str
    ) -> None:
        await make_account(redis, cipher(secret_key, tmp_path), "acme")
        await put(redis, pass_event("acme", "S1", 0))
        # What the engine does after a 429 whose wait is long enough (Engine.defer_account).
        await redis.set(account_keys("acme").deferred, b"1", px=60_000)
        env = env_for(tmp_path / "state", secret_key, redis_url)

        doc = orjson.loads((await cli_in_process(["event", "acme", "acme-S1-0", "--json"], env)).stdout)
        assert doc["where"] == "pending"
        assert "Klaviyo throttled the account (429): no worker takes its serials before" in doc["detail"]
        status = await cli_in_process(["status", "--json"], env)
        (row,) = orjson.loads(status.stdout)["accounts"]
        assert row["throttled_until"] is not None
        text = " ".join(output(await cli_in_process(["status"], env)).split())
        assert "1 (throttled)" in text
        assert "acme is throttled by Klaviyo (429) until" in text


#: Loaded by every Python process that has its directory on PYTHONPATH: that process's wall clock (time.time)
#: runs ``PB_TEST_CLOCK_SKEW_S`` seconds off, like a host without NTP or a VM after a suspend.
SKEWED_CLOCK = """
import os, time
_skew = float(os.environ["PB_TEST_CLOCK_SKEW_S"])
_real = time.time
time.time = lambda: _real() + _skew
"""


class TestWorkerClocks:
    """Heartbeats, their pruning and every reader use Redis's clock: a worker host whose clock is off is
    neither shown silent nor prunes live workers."""

    @staticmethod
    def start_worker(
        tmp_path: Path, redis_url: str, secret_key: str, skew_s: float
    ) -> subprocess.Popen[bytes]:
        site = tmp_path / "skewed-clock"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(SKEWED_CLOCK)
        env = worker_env(redis_url, "http://127.0.0.1:9", secret_key, tmp_path / "state")
        env.update(
            PYTHONPATH=str(site),
            PB_TEST_CLOCK_SKEW_S=str(skew_s),
            PASSBRIDGE_WORKER_EXPRESS_LANE="false",
        )
        log = (tmp_path / f"worker{skew_s:+.0f}.log").open("wb")
        proc = subprocess.Popen(
            [PASSBRIDGE, "worker"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    async def beats(self, redis: Redis) -> dict[str, float]:
        return {w.decode(): s for w, s in await redis.zrange(WORKERS, 0, -1, withscores=True)}

    async def test_a_worker_ahead_prunes_no_live_worker_and_shows_no_negative_age(
        self, cli_in_process: InProcessCli, redis: Redis, redis_url: str, tmp_path: Path, secret_key: str
    ) -> None:
        await make_account(redis, cipher(secret_key, tmp_path), "acme")
        ahead = self.start_worker(tmp_path, redis_url, secret_key, 90)
        try:
            await async_wait_for(lambda: self.beats(redis), timeout=30)
            # Another worker that beat 20 s ago by Redis's clock: silent, but not yet for the 60 s that prune it.
            now = await pause.redis_now_ms(redis)
            await redis.zadd(WORKERS, {"other": now - 20_000})
            await redis.hset(WORKERS_INFO, "other", orjson.dumps({"worker": "other"}))
            await asyncio.sleep(2 * 5 + 1)  # two sweeps (every 5 s), run by the worker ahead
            assert "other" in await self.beats(redis)

            env = env_for(tmp_path / "state", secret_key, redis_url)
            status = orjson.loads((await cli_in_process(["status", "--json"], env)).stdout)
            ages = {w["worker"]: w["heartbeat_age_s"] for w in status["workers"]}
            (mine,) = [w for w in ages if w != "other"]
            assert 0 <= ages[mine] < 10, ages
            assert [w["alive"] for w in status["workers"] if w["worker"] == mine] == [True]
            engine = orjson.loads((await cli_in_process(["engine", "status", "--json"], env)).stdout)
            engine_ages = {w["worker"]: w["beat_age_s"] for w in engine["workers"]}
            assert 0 <= engine_ages[mine] < 10, engine_ages
            assert 20 <= engine_ages["other"] < 60, engine_ages
        finally:
            self.stop(ahead)

    async def test_a_worker_behind_is_alive_for_every_reader(
        self, cli_in_process: InProcessCli, redis: Redis, redis_url: str, tmp_path: Path, secret_key: str
    ) -> None:
        await make_account(redis, cipher(secret_key, tmp_path), "acme")
        await put(redis, pass_event("acme", "S1", 0))
        await pause.pause_account(redis, None, "acme", "held for the test", kind="operator")
        behind = self.start_worker(tmp_path, redis_url, secret_key, -30)
        try:
            await async_wait_for(lambda: self.beats(redis), timeout=30)
            env = env_for(tmp_path / "state", secret_key, redis_url)
            status = orjson.loads((await cli_in_process(["status", "--json"], env)).stdout)
            assert [(w["alive"], w["heartbeat_age_s"] < 10) for w in status["workers"]] == [(True, True)]
            engine = orjson.loads((await cli_in_process(["engine", "status", "--json"], env)).stdout)
            assert [w["beat_age_s"] < 10 for w in engine["workers"]] == [True]
            # `accounts check` counts live workers by the same clock.
            assert (await read_flow(redis, "acme")).live_workers == 1
        finally:
            self.stop(behind)


async def test_answers_into_a_pipe_are_never_cut_short(
    redis: Redis, redis_url: str, tmp_path: Path, secret_key: str
) -> None:
    """With no terminal and no COLUMNS (a pipe, a file, cron) tables take their natural width: at Rich's 80
    columns `passbridge status | grep acme-coffee-europe` found "acm…", and `dlq list > file` kept no whole id."""
    account, serial = "acme-coffee-europe", "SERIAL-0123456789-ABCDEFGHIJ-0123456789"
    await make_account(redis, cipher(secret_key, tmp_path), account)
    await put(redis, pass_event(account, serial, 0), pass_event(account, serial + "-2", 0))
    await dead_letter(redis, account, serial + "-2", reason="permanent error: HTTP 400 invalid", detail="bad")
    env = env_for(tmp_path / "state", secret_key, redis_url)
    del env["COLUMNS"]
    for args, wanted in (
        (["status"], [account]),
        (["dlq", "list"], [account, f"{account}-{serial}-2-0", serial + "-2"]),
        (["engine", "status"], [account]),
        (["accounts", "list"], [account]),
    ):
        result = run(args, env, tmp_path)
        assert result.returncode == 0, (args, output(result))
        for text in wanted:
            assert text in result.stdout, (args, text, result.stdout)
        assert "…" not in result.stdout, (args, result.stdout)
    # A width the operator asks for still holds.
    narrow = run(["accounts", "list"], env | {"COLUMNS": "60"}, tmp_path)
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 60, narrow.stdout


async def test_answers_go_to_stdout_and_a_mistyped_account_is_an_error(
    redis: Redis, redis_url: str, tmp_path: Path, secret_key: str
) -> None:
    """``passbridge status | grep acme`` and ``passbridge dlq list > file`` get the tables; errors stay on
    stderr."""
    await make_account(redis, cipher(secret_key, tmp_path), "acme")
    await put(redis, pass_event("acme", "S1", 0), pass_event("acme", "S2", 0))
    await dead_letter(redis, "acme", "S2", reason="permanent error: HTTP 400 invalid", detail="bad")
    env = env_for(tmp_path / "state", secret_key, redis_url)
    for args, wanted in (
        (["status"], "acme"),
        (["serial", "acme", "S1"], "acme-S1-0"),
        (["event", "acme", "acme-S1-0"], "queued, 1 of 1"),
        (["report", "acme"], "save rate"),
        (["dlq", "list"], "acme-S2-0"),
        (["dlq", "show", "acme-S2-0"], "permanent error"),
        (["engine", "status"], "acme"),
        (["engine", "history", "acme", "--serial", "S1"], "acme-S1-0"),
    ):
        result = run(args, env, tmp_path)
        assert result.returncode == 0, (args, output(result))
        assert wanted in result.stdout, (args, result.stdout, result.stderr)
        assert result.stderr == "", (args, result.stderr)

    typo = run(["status", "-a", "acme", "-a", "acmee"], env, tmp_path)
    assert typo.returncode == 1
    assert typo.stdout == ""
    assert " ".join(typo.stderr.split()) == (
        "error: no such account: 'acmee' (not registered, nothing queued or dead-lettered)"
    )
    assert run(["status", "-a", "acme"], env, tmp_path).returncode == 0
