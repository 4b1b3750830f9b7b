"""The ``passbridge`` command as a real process: ingest, the embedded Redis, state-file discovery."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import redis as redis_sync
from cryptography.fernet import MultiFernet
from redis.asyncio import Redis

from passbridge.crypto import load_cipher
from passbridge.keys import account_keys
from tests.factories import event, make_account

PASSBRIDGE = str(Path(sys.executable).parent / "passbridge")


def cli_env(state_dir: Path, secret_key: str, redis_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PASSBRIDGE_") and k != "REDIS_URL"}
    env.update(
        PASSBRIDGE_STATE_DIR=str(state_dir),
        PASSBRIDGE_SECRET_KEY=secret_key,
        PASSBRIDGE_LOG_FORMAT="console",
        COLUMNS="120",
    )
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PASSBRIDGE, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def start_until(
    args: list[str], env: dict[str, str], cwd: Path, ready: Callable[[str], bool]
) -> tuple[subprocess.Popen[str], list[str]]:
    """``passbridge ARGS``, its stderr read line by line until a line is ``ready``; the process and the lines.

    A process that ends first fails the test with what it printed; one still running then is killed."""
    proc = subprocess.Popen(
        [PASSBRIDGE, *args],
        env=env,
        cwd=cwd,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stderr is not None
    lines: list[str] = []
    try:
        while not lines or not ready(lines[-1]):
            line = proc.stderr.readline()
            assert line, "".join(lines)  # it ended before the line came
            lines.append(line)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    return proc, lines


def start_up(args: list[str], env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen[str], str]:
    """``passbridge up ARGS``, read until it says it is up; the process and what it printed (on stderr)."""
    up, lines = start_until(["up", *args], env, cwd, lambda line: "Ctrl-C stops everything" in line)
    return up, "".join(lines)


def stop_up(up: subprocess.Popen[str]) -> None:
    """SIGTERM, as Ctrl-C would: ``up`` stops everything it started."""
    up.send_signal(signal.SIGTERM)
    up.communicate(timeout=60)  # waits, and closes the pipe


def exported(printed: str, env: dict[str, str]) -> dict[str, str]:
    """``env`` with the assignments of the ``export`` line ``up`` printed applied."""
    [export] = [x.strip() for x in printed.splitlines() if x.strip().startswith("export ")]
    cli = dict(env)
    for assignment in shlex.split(export)[1:]:
        name, _, value = assignment.partition("=")
        cli[name] = value
    return cli


def ndjson(path: Path, n: int, bad: dict[int, bytes] | None = None) -> Path:
    lines = [orjson.dumps(event(i)) for i in range(n)]
    for number, line in (bad or {}).items():
        lines[number - 1] = line
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def cipher(secret_key: str, state_dir: Path) -> MultiFernet:
    return load_cipher(secret_key, state_dir)


class TestIngest:
    """``passbridge ingest FILE --account A`` against the test Redis (REDIS_URL set)."""

    async def test_reports_rejected_lines_with_numbers_and_exits_non_zero(
        self, redis: Redis, redis_url: str, tmp_path: Path, secret_key: str
    ) -> None:
        await make_account(redis, cipher(secret_key, tmp_path / "state"))
        bad = {11: b"{broken", 21: orjson.dumps(event(20, email="nope@")), 40: orjson.dumps(event(0))}
        path = ndjson(tmp_path / "backfill.ndjson", 1200, bad)
        result = run(
            ["ingest", str(path), "--account", "acme"],
            cli_env(tmp_path / "state", secret_key, redis_url),
            tmp_path,
        )
        assert result.returncode == 2, result.stderr
        assert "1197 accepted, 1 duplicates, 0 skipped, 2 rejected" in result.stderr
        assert "line 11: (line):" in result.stderr
        assert "line 21: email:" in result.stderr
        assert "1200/1200" in result.stderr  # the progress bar's final state
        assert int(await redis.get(account_keys("acme").depth)) == 1197

    async def test_json_summary_and_clean_exit(
        self, redis: Redis, redis_url: str, tmp_path: Path, secret_key: str
    ) -> None:
        await make_account(redis, cipher(secret_key, tmp_path / "state"))
        path = ndjson(tmp_path / "ok.ndjson", 50)
        env = cli_env(tmp_path / "state", secret_key, redis_url)
        result = run(["ingest", str(path), "--account", "acme", "--json"], env, tmp_path)
        assert result.returncode == 0, result.stderr
        doc = orjson.loads(result.stdout)
        assert (doc["lines"], doc["accepted"], doc["rejected"]) == (50, 50, [])
        again = orjson.loads(run(["ingest", str(path), "-a", "acme", "--json"], env, tmp_path).stdout)
        assert (again["accepted"], again["duplicates"]) == (0, 50)

    async def test_json_lists_rejections(
        self, redis: Redis, redis_url: str, tmp_path: Path, secret_key: str
    ) -> None:
        await make_account(redis, cipher(secret_key, tmp_path / "state"))
        path = ndjson(tmp_path / "b.ndjson", 5, {3: orjson.dumps(event(2, kind="exploded"))})
        result = run(
            ["ingest", str(path), "-a", "acme", "--json"],
            cli_env(tmp_path / "state", secret_key, redis_url),
            tmp_path,
        )
        assert result.returncode == 2
        [rejected] = orjson.loads(result.stdout)["rejected"]
        assert rejected["line"] == 3
        assert rejected["errors"][0]["pointer"] == "/kind"

    async def test_lists_every_rejected_line_with_errors_for_the_first_n(
        self, redis: Redis, redis_url: str, tmp_path: Path, secret_key: str
    ) -> None:
        """As the NDJSON route: every rejected line by number, errors for the first
        PASSBRIDGE_NDJSON_REJECTED_DETAILS, counts that say so."""
        await make_account(redis, cipher(secret_key, tmp_path / "state"))
        bad = {3: b"{broken", 5: orjson.dumps(event(4, kind="exploded")), 7: b"{}", 8: b"{broken", 40: b"{}"}
        path = ndjson(tmp_path / "b.ndjson", 50, bad)
        env = cli_env(tmp_path / "state", secret_key, redis_url) | {"PASSBRIDGE_NDJSON_REJECTED_DETAILS": "2"}
        result = run(["ingest", str(path), "-a", "acme", "--json"], env, tmp_path)
        assert result.returncode == 2, result.stderr
        doc = orjson.loads(result.stdout)
        assert (doc["lines"], doc["accepted"], doc["rejected_count"], doc["rejected_details_omitted"]) == (
            50,
            45,
            5,
            3,
        )
        first, second, *rest = doc["rejected"]
        assert (first["line"], first["errors"][0]["field"]) == (
            3,
            "(line)",
        )  # the JSON error, not "not an object"
        assert (second["line"], second["errors"][0]["pointer"]) == (5, "/kind")
        assert rest == [{"line": 7}, {"line": 8}, {"line": 40}]
        assert int(await redis.get(account_keys("acme").depth)) == 45

        plain = run(["ingest", str(path), "-a", "acme"], env, tmp_path)
        assert plain.returncode == 2, plain.stderr
        assert "0 accepted, 45 duplicates, 0 skipped, 5 rejected" in plain.stderr
        assert "line 5: kind:" in plain.stderr
        assert "line 7: (errors listed for the first 2 rejected lines only)" in plain.stderr

    async def test_a_gzip_file_is_read_decompressed_and_a_cut_one_says_where_to_resume(
        self, redis: Redis, redis_url: str, tmp_path: Path, secret_key: str
    ) -> None:
        """A backfill compressed for the NDJSON route (`gzip -k`) is taken as it is, whatever its name; one cut
        short keeps its whole lines and says where to resume (it was read as text: every line "not UTF-8")."""
        import gzip

        await make_account(redis, cipher(secret_key, tmp_path / "state"))
        env = cli_env(tmp_path / "state", secret_key, redis_url)
        plain = ndjson(tmp_path / "backfill.ndjson", 300).read_bytes()
        # Two members, as `cat a.gz b.gz` makes: gzip -d reads them as one stream.
        (tmp_path / "backfill.ndjson.gz").write_bytes(
            gzip.compress(plain[: plain.index(b"\n") + 1]) + gzip.compress(plain[plain.index(b"\n") + 1 :])
        )
        result = run(["ingest", str(tmp_path / "backfill.ndjson.gz"), "-a", "acme", "--json"], env, tmp_path)
        assert result.returncode == 0, result.stderr
        doc = orjson.loads(result.stdout)
        assert (doc["lines"], doc["accepted"], doc["rejected"]) == (300, 300, []), doc

        more = ndjson(tmp_path / "more.ndjson", 600).read_bytes()[len(plain) :]  # events 300..599
        packed = gzip.compress(more)
        (tmp_path / "cut.gz").write_bytes(packed[: len(packed) * 2 // 3])
        result = run(["ingest", str(tmp_path / "cut.gz"), "-a", "acme"], env, tmp_path)
        assert result.returncode == 1, result.stderr
        err = " ".join(result.stderr.split())
        depth = int(await redis.get(account_keys("acme").depth))
        taken = depth - 300
        assert 0 < taken < 300, taken
        assert f"error: stopped after line {taken}: the gzip data is cut short after line {taken}" in err, err
        rest = f"gzip -dc {tmp_path / 'cut.gz'} | tail -n +{taken + 1} > rest.ndjson"
        assert f"resume after line {taken} (e.g. {rest})" in err, err
        assert "Traceback" not in result.stderr

    def test_unknown_account_and_missing_file(self, redis_url: str, tmp_path: Path, secret_key: str) -> None:
        env = cli_env(tmp_path / "state", secret_key, redis_url)
        path = ndjson(tmp_path / "x.ndjson", 1)
        result = run(["ingest", str(path), "--account", "nobody"], env, tmp_path)
        assert result.returncode == 1
        assert "no account 'nobody'" in result.stderr
        result = run(["ingest", str(tmp_path / "missing.ndjson"), "--account", "acme"], env, tmp_path)
        assert result.returncode == 2
        assert "Invalid value for 'file'" in result.stderr


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A state dir whose embedded Redis is stopped after the test whatever happens."""
    state = tmp_path / "state"
    yield state
    record = state / "redis.json"
    if record.exists():
        pid = int(orjson.loads(record.read_bytes())["pid"])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 15)


def test_embedded_redis_lifecycle_and_state_file_discovery(
    state_dir: Path, tmp_path: Path, secret_key: str
) -> None:
    """With REDIS_URL unset every command finds the server ``redis start`` recorded in the state dir."""
    env = cli_env(state_dir, secret_key, None)
    status = run(["redis", "status"], env, tmp_path)
    assert status.returncode == 1
    assert "not running" in status.stdout
    # A script (--json) gets the exit code a person does.
    status = run(["redis", "status", "--json"], env, tmp_path)
    assert (status.returncode, orjson.loads(status.stdout)["running"]) == (1, False), status.stderr

    started = run(["redis", "start"], env, tmp_path)
    assert started.returncode == 0, started.stderr
    url = started.stdout.strip()
    assert url.startswith("redis://127.0.0.1:")
    assert not url.startswith("redis://127.0.0.1:6379/")
    status = run(["redis", "status", "--json"], env, tmp_path)
    doc = orjson.loads(status.stdout)
    assert (status.returncode, doc["running"], doc["url"]) == (0, True, url)
    assert run(["redis", "start"], env, tmp_path).stdout.strip() == url  # idempotent: finds it

    added = run(["accounts", "add", "acme", "--ingest-token", "tok", "--json"], env, tmp_path)
    assert added.returncode == 0, added.stderr
    path = ndjson(tmp_path / "in.ndjson", 20)
    ingested = run(["ingest", str(path), "--account", "acme", "--json"], env, tmp_path)
    assert ingested.returncode == 0, ingested.stderr
    client = redis_sync.Redis.from_url(url)
    try:
        assert int(client.get(account_keys("acme").depth)) == 20
        assert client.config_get("appendonly")["appendonly"] == "yes"
    finally:
        client.close()

    stopped = run(["redis", "stop"], env, tmp_path)
    assert stopped.returncode == 0
    assert "stopped" in stopped.stderr
    assert run(["redis", "status"], env, tmp_path).returncode == 1
    assert "no embedded Redis" in run(["redis", "stop"], env, tmp_path).stderr


async def test_apple_token_command(redis: Redis, redis_url: str, tmp_path: Path, secret_key: str) -> None:
    """The token printed is the one the Apple routes accept for that pass."""
    from producer.sources.apple import pass_token

    await make_account(redis, cipher(secret_key, tmp_path / "state"))
    env = cli_env(tmp_path / "state", secret_key, redis_url)
    result = run(
        ["apple", "token", "SER 1", "-a", "acme", "--pass-type-id", "pass.com.acme.loyalty"], env, tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == pass_token("apple-secret-acme", "pass.com.acme.loyalty", "SER 1")
    other = run(["apple", "token", "S", "-a", "acme", "--pass-type-id", "pass.com.other"], env, tmp_path)
    assert other.returncode == 1
    assert "not one of the account's Apple pass types" in other.stderr


class TestDemoStateDir:
    """``passbridge demo --state-dir DIR`` only ever removes what the demo itself created."""

    def test_refuses_a_directory_that_holds_anything(self, tmp_path: Path, secret_key: str) -> None:
        state = tmp_path / ".passbridge"
        (state / "redis").mkdir(parents=True)
        (state / "secret.key").write_text("the deployment's key")
        (state / "redis" / "appendonly.aof").write_text("every account")
        env = cli_env(tmp_path / "other", secret_key, "redis://127.0.0.1:1/0")
        result = run(["demo", "--state-dir", str(state), "--passes", "10"], env, tmp_path)
        assert result.returncode == 2, result.stderr
        assert "already exists and is not empty" in " ".join(result.stderr.split())
        assert "Traceback" not in result.stderr
        assert (state / "secret.key").read_text() == "the deployment's key"
        assert (state / "redis" / "appendonly.aof").read_text() == "every account"

    def test_an_empty_directory_given_keeps_existing_and_a_new_one_goes(self, tmp_path: Path) -> None:
        from passbridge.demo.run import _check_state_dir, _release_state_dir

        given = tmp_path / "given"
        given.mkdir()
        _check_state_dir(given)  # empty: accepted
        (given / "logs").mkdir()
        (given / "logs" / "producer.log").write_text("x")
        (given / "redis.json").write_text("{}")
        _release_state_dir(given, created=False)
        assert given.is_dir()
        assert not any(given.iterdir())

        made = tmp_path / "made"
        (made / "logs").mkdir(parents=True)
        _release_state_dir(made, created=True)
        assert not made.exists()

        a_file = tmp_path / "file"
        a_file.write_text("mine")
        with pytest.raises(Exception, match="not a directory"):
            _check_state_dir(a_file)


class TestCleanFailures:
    """An unreachable Redis or an unusable secret key is one ``error:`` line and a non-zero exit."""

    COMMANDS = (
        ["accounts", "list"],
        ["accounts", "show", "acme"],
        ["apple", "token", "S", "-a", "acme", "--pass-type-id", "pass.com.acme"],
        ["klaviyo", "setup", "--account", "acme"],
        ["engine", "status"],
        ["dlq", "list"],
        ["ingest", "IN", "-a", "acme"],
    )

    @pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a[:2]))
    def test_unreachable_redis(self, args: list[str], tmp_path: Path, secret_key: str) -> None:
        from passbridge.redis_server import free_port

        port = free_port()  # nothing listens there
        env = cli_env(tmp_path / "state", secret_key, f"redis://user:hunter2pw@127.0.0.1:{port}/0")
        args = [str(ndjson(tmp_path / "in.ndjson", 3)) if a == "IN" else a for a in args]
        result = run(args, env, tmp_path)
        assert result.returncode == 1, (result.stdout, result.stderr)
        err = " ".join(result.stderr.split())
        assert err.startswith(f"error: Redis at 127.0.0.1:{port} is unreachable"), err
        assert "Traceback" not in result.stderr
        assert "hunter2pw" not in result.stderr + result.stdout
        assert len(result.stderr.strip().splitlines()) <= 3  # one line, wrapped at most by the terminal width

    #: Commands that read secrets (``dlq`` and ``engine status`` read none and need no key).
    SECRET_COMMANDS = (*(c for c in COMMANDS if c[0] not in ("engine", "dlq")), ["engine", "resume", "acme"])

    @pytest.mark.parametrize("args", SECRET_COMMANDS, ids=lambda a: " ".join(a[:2]))
    def test_bad_secret_key(self, args: list[str], redis_url: str, tmp_path: Path) -> None:
        env = cli_env(tmp_path / "state", "notakey", redis_url)
        args = [str(ndjson(tmp_path / "in.ndjson", 3)) if a == "IN" else a for a in args]
        result = run(args, env, tmp_path)
        assert result.returncode == 1, (result.stdout, result.stderr)
        err = " ".join(result.stderr.split())
        assert err == "error: PASSBRIDGE_SECRET_KEY must be urlsafe-base64 Fernet keys, comma-separated", err

    @pytest.mark.parametrize("args", [["engine", "status"], ["dlq", "list"]], ids=" ".join)
    def test_commands_without_secrets_need_no_key(
        self, args: list[str], redis_url: str, tmp_path: Path
    ) -> None:
        result = run(args, cli_env(tmp_path / "state", "notakey", redis_url), tmp_path)
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert not (tmp_path / "state" / "secret.key").exists()

    async def test_ingest_over_the_high_water_mark_says_where_to_resume(
        self, redis: Redis, redis_url: str, tmp_path: Path, secret_key: str
    ) -> None:
        await make_account(redis, cipher(secret_key, tmp_path / "state"))
        # Batches of 500: the first fits under 700, the second would not and is refused whole.
        path = ndjson(tmp_path / "big.ndjson", 1200, {3: b"{broken", 600: b"{broken"})
        env = cli_env(tmp_path / "state", secret_key, redis_url) | {"PASSBRIDGE_BACKLOG_HIGH_WATER": "700"}
        result = run(["ingest", str(path), "-a", "acme"], env, tmp_path)
        assert result.returncode == 1, result.stderr
        err = " ".join(result.stderr.split())
        assert (
            "error: stopped after line 501: account acme has 500 pending events; the new events would take it "
            "over its high-water mark of 700; let the workers drain it" in err
        )
        assert "500 accepted, 0 duplicates, 1 rejected so far; resume after line 501" in err
        assert "Traceback" not in result.stderr
        assert int(await redis.get(account_keys("acme").depth)) == 500

        as_json = run(["ingest", str(path), "-a", "acme", "--json"], env, tmp_path)
        assert as_json.returncode == 1
        doc = orjson.loads(as_json.stdout)
        assert (doc["resume_after_line"], doc["accepted"], doc["duplicates"]) == (501, 0, 500)
        assert [r["line"] for r in doc["rejected"]] == [3]
        assert (doc["rejected_count"], doc["rejected_details_omitted"]) == (1, 0)


@pytest.mark.timeout(180)
def test_up_prints_the_exports_cli_commands_need(tmp_path: Path) -> None:
    """``passbridge up`` keeps its own state dir and generated key; the line it prints lets the CLI read the
    stack's accounts (without it, `accounts list` would use another key and fail to decrypt them). It does not
    print an admin token the operator set."""
    from passbridge.redis_server import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("PASSBRIDGE_") and k != "REDIS_URL"}
    admin_token = "adm_" + "q7" * 16
    env.update(COLUMNS="80", PASSBRIDGE_LOG_FORMAT="console", PASSBRIDGE_ADMIN_TOKEN=admin_token)
    sandbox_port = free_port()
    args = ["--workers", "1", "--producer-port", str(free_port()), "--sandbox-port", str(sandbox_port)]
    up, printed = start_up([*args, "--state-dir", str(tmp_path / "up")], env, tmp_path)
    try:
        # The operator's admin token is theirs: it is named, never printed.
        assert "admin token: as set in PASSBRIDGE_ADMIN_TOKEN" in " ".join(
            printed.split()
        )  # lines wrap at 80
        assert admin_token not in printed
        cli = exported(printed, env)
        assert cli["PASSBRIDGE_STATE_DIR"] == str((tmp_path / "up").resolve())
        listed = run(["accounts", "list", "--json"], cli, tmp_path)
        assert listed.returncode == 0, listed.stderr
        assert [a["account_id"] for a in orjson.loads(listed.stdout)] == ["local"]
        # The stack's Klaviyo is its sandbox: the CLI's Klaviyo calls go there, not to the real Klaviyo with the
        # sandbox's key.
        assert cli["PASSBRIDGE_KLAVIYO_BASE_URL"] == f"http://127.0.0.1:{sandbox_port}"
        checked = run(["accounts", "check", "local", "--json"], cli, tmp_path)
        findings = {f["topic"]: f for f in orjson.loads(checked.stdout)["findings"]}
        assert findings["credentials"]["status"] == "ok", findings["credentials"]
        # Only the Redis URL: this directory's own generated key cannot read the stack's account.
        only_url = {**env, "REDIS_URL": cli["REDIS_URL"]}
        assert "do not decrypt" in run(["accounts", "list"], only_url, tmp_path).stderr
    finally:
        stop_up(up)


@pytest.mark.timeout(240)
def test_up_started_again_sets_its_account_up_in_the_new_sandbox(tmp_path: Path) -> None:
    """`make run` twice: the account and its stored Klaviyo ids outlive the first stack in its Redis, but the
    sandbox keeps everything in memory. The second start sets the account up again, so its events are delivered
    (they paused the account: "the account's provisioned data source no longer exists")."""
    import re

    import httpx

    from passbridge.redis_server import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("PASSBRIDGE_") and k != "REDIS_URL"}
    env.update(COLUMNS="200", PASSBRIDGE_LOG_FORMAT="console")
    producer_port = free_port()
    args = ["--workers", "1", "--producer-port", str(producer_port), "--sandbox-port", str(free_port())]
    args += ["--state-dir", str(tmp_path / "up")]

    up, printed = start_up(args, env, tmp_path)
    try:
        found = re.search(r"ingest token (pbi_\S+)", printed)
        assert found, printed
        token = found.group(1)
    finally:
        stop_up(up)
    up, printed = start_up(args, env, tmp_path)
    try:
        cli = exported(printed, env)
        item = {
            "event_id": "again-1",
            "kind": "created",
            "serial_number": "S1",
            "pass_type": "p",
            "platform": "apple",
        }
        r = httpx.post(
            f"http://127.0.0.1:{producer_port}/v1/accounts/local/events",
            json=item,
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 60
        while True:
            found_event = run(["event", "local", "again-1", "--json"], cli, tmp_path)
            doc = orjson.loads(found_event.stdout)
            if doc["where"] == "delivered":
                break
            assert "paused" not in doc["detail"], doc
            assert time.monotonic() < deadline, doc
            time.sleep(0.5)
    finally:
        stop_up(up)


@pytest.mark.parametrize("command", ["sandbox", "producer"])
def test_a_server_on_a_port_in_use_says_so_before_announcing_itself(
    command: str, tmp_path: Path, secret_key: str
) -> None:
    """`passbridge sandbox --port 8089` beside a running `passbridge up` printed "Klaviyo sandbox on
    http://127.0.0.1:8089" and only then uvicorn's bind error (exit 3): one `error:` line, exit 1, instead."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = cli_env(tmp_path / "state", secret_key, "redis://127.0.0.1:1/0")  # never reached
        result = run([command, "--port", str(port)], env, tmp_path)
    assert result.returncode == 1, (result.stdout, result.stderr)
    said = " ".join((result.stdout + result.stderr).split())
    assert (
        said
        == f"error: cannot listen on 127.0.0.1:{port}: Address already in use (is another server running there?)"
    )


def _announced_port(line: str) -> int | None:
    """The port a server's start-up line names: the sandbox's printed URL, the producer's JSON log line."""
    import re

    if found := re.search(r"Klaviyo sandbox on http://127\.0\.0\.1:(\d+) ", line):
        return int(found.group(1))
    with contextlib.suppress(orjson.JSONDecodeError):
        doc = orjson.loads(line)
        if isinstance(doc, dict) and doc.get("event") == "producer_listening":
            return int(doc["port"])
    return None


@pytest.mark.parametrize(("command", "path"), [("sandbox", "/_sandbox/health"), ("producer", "/healthz")])
def test_port_0_listens_on_a_free_port_and_names_it(
    command: str, path: str, redis_url: str, tmp_path: Path, secret_key: str
) -> None:
    """`--port 0` means any free port, as the worker's `--metrics-port 0` does, and the server says which; the
    producer took PASSBRIDGE_PRODUCER_PORT instead (0 counted as unset): here a port in use, so it failed."""
    import socket

    import httpx

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = cli_env(tmp_path / "state", secret_key, redis_url) | {
            "PASSBRIDGE_LOG_FORMAT": "json",
            "PASSBRIDGE_PRODUCER_PORT": str(taken.getsockname()[1]),
        }
        # Read until it says where it listens.
        server, lines = start_until(
            [command, "--host", "127.0.0.1", "--port", "0"],
            env,
            tmp_path,
            lambda line: _announced_port(line) is not None,
        )
        try:
            port = _announced_port(lines[-1])
            assert port is not None
            assert port not in (0, taken.getsockname()[1]), lines
            deadline = time.monotonic() + 30
            while True:  # the port is announced once bound; the app answers once its start-up is done
                try:
                    answer = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=5)
                    break
                except httpx.TransportError:
                    assert server.poll() is None, "".join(lines)
                    assert time.monotonic() < deadline, "".join(lines)
                    time.sleep(0.1)
            assert answer.status_code == 200, answer.text
        finally:
            server.send_signal(signal.SIGTERM)
            server.communicate(timeout=30)


def test_up_takes_the_klaviyo_url_from_dotenv_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Klaviyo URL set only in ``.env`` counts, as for every other setting: `up` then starts no sandbox."""
    from passbridge.cli.up_cmd import external_klaviyo
    from passbridge.settings import Settings

    monkeypatch.delenv("PASSBRIDGE_KLAVIYO_BASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    assert external_klaviyo(Settings()) is None
    (tmp_path / ".env").write_text("PASSBRIDGE_KLAVIYO_BASE_URL=https://a.klaviyo.com\n")
    assert external_klaviyo(Settings()) == "https://a.klaviyo.com"


#: What a command imports only when it runs: loaded at start-up, they cost every invocation (even ``--help``)
#: most of a second. The CLI itself needs typer and rich.
HEAVY_PACKAGES = {
    "asyncio",
    "cryptography",
    "email_validator",
    "fastapi",
    "httpx",
    "klaviyo_sandbox",
    "orjson",
    "phonenumbers",
    "producer",
    "prometheus_client",
    "pydantic",
    "pydantic_settings",
    "redis",
    "starlette",
    "structlog",
    "uvicorn",
    "worker",
}
#: The passbridge modules start-up may load: the commands and the light modules their options need.
LIGHT_PASSBRIDGE = {"passbridge", "passbridge.account_state", "passbridge.demo", "passbridge.demo.defaults"}

STARTUP_PROBE = """
import contextlib, io, sys
from passbridge.cli.main import app
with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
    app(["--help"])  # builds every command, so every option's type and default is resolved
print("\\n".join(sorted(sys.modules)))
"""


def test_help_imports_no_heavy_module() -> None:
    """``passbridge --help`` (and so the start of every command) loads neither the producer, the worker, Redis,
    HTTP nor pydantic: each command imports what it needs when it runs."""
    result = subprocess.run(
        [sys.executable, "-c", STARTUP_PROBE], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    loaded = result.stdout.split()
    heavy = sorted(
        m
        for m in loaded
        if m.split(".")[0] in HEAVY_PACKAGES
        or (
            m.split(".")[0] == "passbridge"
            and not m.startswith("passbridge.cli")
            and m not in LIGHT_PASSBRIDGE
        )
    )
    assert heavy == []


def _bad_settings_env(tmp_path: Path) -> dict[str, str]:
    env = cli_env(tmp_path / "state", "unused", None)
    env.update(PASSBRIDGE_PRODUCER_PORT="sk_live_not_a_port", PASSBRIDGE_REDIS_APPENDFSYNC="sometimes")
    return env


@pytest.mark.parametrize("command", [["redis", "status"], ["status"], ["producer"]])
def test_an_invalid_setting_is_one_clear_error_naming_the_variable_not_its_value(
    tmp_path: Path, command: list[str]
) -> None:
    """A typo in .env or the environment gets a message naming the variable and why, with no traceback, and
    without echoing the value: it may be a secret pasted into the wrong variable."""
    result = run(command, _bad_settings_env(tmp_path), tmp_path)
    assert result.returncode == 1
    assert "invalid configuration" in result.stderr
    assert "PASSBRIDGE_PRODUCER_PORT: Input should be a valid integer" in result.stderr
    assert "PASSBRIDGE_REDIS_APPENDFSYNC: Input should be 'everysec' or 'always'" in result.stderr
    assert "sk_live_not_a_port" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_help_works_with_an_invalid_setting(tmp_path: Path) -> None:
    """The operator fixing a bad .env can still read what each command takes."""
    result = run(["producer", "--help"], _bad_settings_env(tmp_path), tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


@pytest.mark.parametrize(
    ("variable", "value", "why"),
    [
        ("PASSBRIDGE_WORKER_LEASE_TTL_S", "0", "greater than 0"),
        ("PASSBRIDGE_BACKLOG_HIGH_WATER", "-5", "greater than or equal to 1"),
        ("PASSBRIDGE_REPLAY_RESERVE", "1", "less than 1"),
        ("PASSBRIDGE_REPLAY_RESERVE", "-0.1", "greater than or equal to 0"),
        ("PASSBRIDGE_LOG_LEVEL", "verbose", "'debug', 'info', 'warning', 'error' or 'critical'"),
        ("PASSBRIDGE_LOG_FORMAT", "xml", "'auto', 'json' or 'console'"),
        ("PASSBRIDGE_PRODUCER_PORT", "70000", "less than or equal to 65535"),
    ],
)
def test_a_nonsensical_setting_is_refused_not_run_with(
    tmp_path: Path, variable: str, value: str, why: str
) -> None:
    """A zero lease TTL or a negative high-water mark would run, and misbehave in ways far from their cause."""
    env = cli_env(tmp_path / "state", "unused", None)
    env[variable] = value
    result = run(["redis", "status"], env, tmp_path)
    assert result.returncode == 1
    assert f"{variable}: Input should be" in result.stderr
    assert why in " ".join(result.stderr.split())


def test_a_replay_reserve_that_leaves_replays_no_room_is_refused(tmp_path: Path) -> None:
    """A reserve that rounds a small mark's replay limit down to 0 would make every replay wait forever."""
    env = cli_env(tmp_path / "state", "unused", None)
    env.update(PASSBRIDGE_BACKLOG_HIGH_WATER="9", PASSBRIDGE_REPLAY_RESERVE="0.9")
    result = run(["dlq", "replay", "--all", "--yes"], env, tmp_path)
    assert result.returncode == 1
    assert (
        "PASSBRIDGE_REPLAY_RESERVE: leaves a DLQ replay no room under PASSBRIDGE_BACKLOG_HIGH_WATER=9: a replay "
        "fills a backlog up to 9 x (1 - 0.9) rounded down, which is 0; lower it"
    ) in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr
    env.update(PASSBRIDGE_BACKLOG_HIGH_WATER="10")  # 10 x 0.1 leaves 1
    assert "invalid configuration" not in run(["redis", "status"], env, tmp_path).stderr


def test_log_level_and_format_are_read_in_any_case(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "state", "unused", None)
    env.update(PASSBRIDGE_LOG_LEVEL="WARNING", PASSBRIDGE_LOG_FORMAT="JSON")
    result = run(["redis", "status"], env, tmp_path)
    assert "invalid configuration" not in result.stderr
    assert result.stdout.strip() == "not running"
