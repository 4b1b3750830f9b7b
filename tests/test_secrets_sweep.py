"""Every secret passbridge holds, looked for everywhere an operator or an attacker could see it, with the whole
product running as real processes.

The stack: an embedded Redis with its append-only file on (every command also goes to its slow log), the
Klaviyo sandbox (``passbridge sandbox``), the producer and two workers (each with its express lane), every
process's stdout and stderr captured to a file, all at DEBUG: the producer and the first worker log JSON, the
second worker and the CLI the pretty console format. Three accounts, made with the CLI: ``alpha`` (a Klaviyo
private key, Apple and Google sources), ``oauthco`` (connected with OAuth against the sandbox through the
producer's callback) and ``revoked`` (a key Klaviyo does not know). Traffic through every ingest source, right
and wrong; then Klaviyo failing: 429s, 503s, a refused item (dead-lettered), an expired access token (refreshed),
a revoked grant (disconnected), a rejected key (paused), a full backlog (503); last, a key rotation run before
the processes were given the new key.

Then everything anyone could read is collected — the log files, CLI output (tables and ``--json``, errors of bad
commands and bad files included), every dashboard page reachable when logged in and its error pages,
``/metrics`` of the producer and of both workers, every answer the producer gave, the processes' command lines,
every Redis key and value, every command Redis ran, the files on disk (the AOF, Redis's log, the state dir) —
and no secret may appear in any of it: as is, base64-, URL-, JSON- or hex-encoded, or folded across the lines of
a table.

Left out by design: what ``accounts add`` shows once (``shown_once``: the credentials it generated, for the
operator to hand over) and the ``Set-Cookie`` header that hands the browser its session (the session cookie is
looked for everywhere else).
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets as pysecrets
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import unescape
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, quote, quote_plus, urlsplit

import httpx
import orjson
import pytest
import redis as redis_sync
import structlog
from cryptography.fernet import Fernet
from pydantic import SecretStr
from redis.asyncio import Redis
from standardwebhooks.webhooks import Webhook
from typer.testing import CliRunner, Result

from klaviyo_sandbox.client import SandboxClient
from passbridge.accounts import Account, AccountSecrets, AccountState, AccountStore
from passbridge.cli.main import app as cli_app
from passbridge.crypto import load_cipher
from passbridge.demo.stack import spawn_cli, stop_process
from passbridge.keys import WORKERS, account_keys
from passbridge.redis_server import RedisServer, free_port, start_redis
from passbridge.settings import get_settings
from producer.sources.apple import pass_token
from producer.sources.google_sign import GoogleSigner
from tests.accounts.conftest import configure_uncached
from tests.worker.e2e import RATE_SCALE, worker_env

T = TypeVar("T")
ISSUER = "3388000000022999001"
APPLE_PASS_TYPE = "pass.com.alpha.loyalty"
OAUTH_CLIENT_ID = "passbridge-sweep-app"
#: Most dashboard pages the crawl reads (it finds about 20).
MAX_PAGES = 150
#: A paused account's backlog fills at this many events (the producer's PASSBRIDGE_BACKLOG_HIGH_WATER).
HIGH_WATER = 20

_ANSI = re.compile(rb"\x1b\[[0-9;]*m")
#: Blanks and box-drawing characters (U+2500-U+257F in UTF-8): what lies between the parts of a folded cell.
_BLANKS = re.compile(rb"\s+|\xe2[\x94\x95][\x80-\xbf]")


def wait_until(predicate: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


def encodings(value: str) -> dict[str, bytes]:
    """The forms a secret could take in output: as is, base64 (standard and URL-safe, padded or not),
    URL-encoded, JSON-escaped and hex."""
    raw = value.encode()
    forms = {
        "raw": raw,
        "base64": base64.b64encode(raw),
        "base64 unpadded": base64.b64encode(raw).rstrip(b"="),
        "base64url": base64.urlsafe_b64encode(raw).rstrip(b"="),
        "url-encoded": quote(value, safe="").encode(),
        "form-encoded": quote_plus(value).encode(),
        "json-escaped": orjson.dumps(value)[1:-1],
        "hex": raw.hex().encode(),
    }
    out: dict[str, bytes] = {}
    for name, form in forms.items():
        if form not in out.values():
            out[name] = form
    return out


@dataclass
class Sweep:
    """The secrets to look for, and everything seen as (where, what)."""

    secrets: dict[str, str] = field(default_factory=dict)
    seen: list[tuple[str, bytes]] = field(default_factory=list)

    def secret(self, label: str, value: str) -> str:
        assert len(value) >= 8, f"{label} is too short to look for without false alarms"
        self.secrets.setdefault(label, value)
        return value

    def saw(self, where: str, what: str | bytes) -> None:
        for label, value in self.secrets.items():  # a command line may hold one: name it instead
            where = where.replace(value, f"<{label}>")
        self.seen.append((where, what.encode() if isinstance(what, str) else what))

    def leaks(self) -> list[str]:
        """Each secret found, once per place: where, in which encoding, and the text around it."""
        found = []
        for where, seen in self.seen:
            # Also without colours, blanks and borders: a table folds a long value onto its next line.
            flat = _BLANKS.sub(b"", _ANSI.sub(b"", seen))
            for label, value in self.secrets.items():
                for name, form in encodings(value).items():
                    text, at = seen, seen.find(form)
                    if at < 0:
                        text, at = flat, flat.find(form)
                    if at >= 0:
                        around = text[max(0, at - 80) : at + len(form) + 40]
                        around = _ANSI.sub(b"", around.replace(form, f"<<{label}>>".encode()))
                        found.append(f"{label} ({name}) in {where}: …{around.decode(errors='replace')}…")
                        break
        return found


@dataclass
class Cli:
    """``passbridge`` commands run in this process (typer's runner) with the stack's environment; every output
    is recorded."""

    env: dict[str, str]
    sweep: Sweep
    runner: CliRunner = field(default_factory=CliRunner)

    def run(self, args: list[str], input: str | None, env: dict[str, str] | None) -> Result:
        get_settings.cache_clear()  # settings are read once per process; each command is a "process" here
        try:
            result = self.runner.invoke(cli_app, args, input=input, env={**self.env, **(env or {})})
        finally:
            get_settings.cache_clear()
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        assert "Traceback" not in result.stderr, result.stderr
        return result

    def __call__(self, *args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
        result = self.run(list(args), input, env)
        self.sweep.saw(f"`passbridge {' '.join(args)}` stdout", result.stdout)
        self.sweep.saw(f"`passbridge {' '.join(args)}` stderr", result.stderr)
        return result

    def ok(self, *args: str, input: str | None = None, env: dict[str, str] | None = None) -> Result:
        result = self(*args, input=input, env=env)
        assert result.exit_code == 0, f"{args}: exit {result.exit_code}\n{result.stdout}\n{result.stderr}"
        return result

    def json(self, *args: str) -> Any:
        return orjson.loads(self.ok(*args, "--json").stdout)

    def fails(self, *args: str, env: dict[str, str] | None = None) -> None:
        result = self(*args, env=env)
        assert result.exit_code != 0, f"{args} succeeded:\n{result.stdout}"

    def add(self, account_id: str, *args: str, secret: str) -> dict[str, Any]:
        """``accounts add --json`` with ``secret`` on stdin: what it shows once (recorded is the rest)."""
        result = self.run(["accounts", "add", account_id, *args, "--json"], secret + "\n", None)
        assert result.exit_code == 0, f"exit {result.exit_code}\n{result.stdout}\n{result.stderr}"
        doc: dict[str, Any] = orjson.loads(result.stdout)
        shown: dict[str, Any] = doc.pop("shown_once")
        self.sweep.saw(f"`passbridge accounts add {account_id}` stdout but shown_once", orjson.dumps(doc))
        self.sweep.saw(f"`passbridge accounts add {account_id}` stderr", result.stderr)
        return shown


@dataclass
class Stack:
    """The processes, their environment and where they log."""

    tmp: Path
    redis: RedisServer
    env: dict[str, str]
    sandbox_url: str
    producer_url: str
    worker_metrics: list[int]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def redis_url(self) -> str:
        """Redis's URL, with its password."""
        return self.env["REDIS_URL"]

    @property
    def logs(self) -> Path:
        return self.tmp / "logs"

    @property
    def state_dir(self) -> Path:
        return Path(self.env["PASSBRIDGE_STATE_DIR"])

    def tail(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.logs.glob("*.log"))
        )

    def account(self, account_id: str) -> Account:
        """The stored account, decrypted."""
        return asyncio.run(self._registry(lambda store: store.get(account_id)))

    def put(self, account: Account) -> None:
        """Store ``account`` as it is (past the checks of ``accounts add``)."""
        asyncio.run(self._registry(lambda store: store.put(account)))

    async def _registry(self, use: Callable[[AccountStore], Awaitable[T]]) -> T:
        redis = Redis.from_url(self.redis_url)
        try:
            return await use(
                AccountStore(redis, load_cipher(self.env["PASSBRIDGE_SECRET_KEY"], self.state_dir))
            )
        finally:
            await redis.aclose()

    def stop(self) -> None:
        for name in sorted(self.procs, key=lambda n: (not n.startswith("worker"), n)):
            stop_process(self.procs[name], timeout=15)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """Redis, the sandbox, the producer and two workers, all started at once (the test waits for them)."""
    redis = start_redis(tmp_path / "redis", appendonly=True)
    # Every command goes to the slow log, arguments included: what MONITOR would have shown, read at the end.
    # And a password, which belongs in REDIS_URL only.
    password = pysecrets.token_urlsafe(18)
    with redis_sync.Redis.from_url(redis.url) as r:
        r.config_set("slowlog-log-slower-than", 0)
        r.config_set("slowlog-max-len", 1_000_000)
        r.config_set("requirepass", password)
    sandbox_port, producer_port = free_port(), free_port()
    env = worker_env(
        f"redis://:{password}@127.0.0.1:{redis.port}/0",
        f"http://127.0.0.1:{sandbox_port}",
        Fernet.generate_key().decode(),
        tmp_path / "state",
        PASSBRIDGE_LOG_LEVEL="debug",
        PASSBRIDGE_ADMIN_TOKEN="adm_" + pysecrets.token_urlsafe(24),
        PASSBRIDGE_METRICS_TOKEN="mtk_" + pysecrets.token_urlsafe(24),
        PASSBRIDGE_PAUSE_PROBE_INTERVAL_S="1",
    )
    stack = Stack(
        tmp_path,
        redis,
        env,
        f"http://127.0.0.1:{sandbox_port}",
        f"http://127.0.0.1:{producer_port}",
        [free_port(), free_port()],
    )
    procs, logs = stack.procs, stack.logs
    try:
        sandbox = ["sandbox", "--port", str(sandbox_port), "--rate-scale", str(RATE_SCALE)]
        procs["sandbox"] = spawn_cli(sandbox, env, logs / "sandbox.log")
        producer = ["producer", "--host", "127.0.0.1", "--port", str(producer_port)]
        penv = {**env, "PASSBRIDGE_BACKLOG_HIGH_WATER": str(HIGH_WATER)}
        procs["producer"] = spawn_cli(producer, penv, logs / "producer.log")
        for i, (port, fmt) in enumerate(zip(stack.worker_metrics, ("json", "console"), strict=True), 1):
            wenv = {**env, "PASSBRIDGE_WORKER_METRICS_PORT": str(port), "PASSBRIDGE_LOG_FORMAT": fmt}
            procs[f"worker-{i}"] = spawn_cli(["worker"], wenv, logs / f"worker-{i}.log")
        # A worker given a damaged key: it must refuse to start, without quoting the key.
        bad = {**env, "PASSBRIDGE_SECRET_KEY": env["PASSBRIDGE_SECRET_KEY"][:-6]}
        procs["worker-badkey"] = spawn_cli(["worker"], bad, logs / "worker-badkey.log")
        yield stack
    finally:
        stack.stop()
        redis.stop()


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _item(event_id: str, serial: str, kind: str = "created") -> dict[str, Any]:
    return {
        "event_id": event_id,
        "kind": kind,
        "serial_number": serial,
        "pass_type": "loyalty",
        "platform": "apple",
        "occurred_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "email": f"{serial.lower()}@example.com",
        "properties": {"points": 1},
    }


@dataclass
class World:
    """The running stack and the clients a test drives and observes it with (every answer recorded)."""

    stack: Stack
    sweep: Sweep
    cli: Cli
    sandbox: SandboxClient
    redis: redis_sync.Redis
    producer: httpx.Client = field(init=False)
    #: account → its ingest token / webhook secret / Apple token secret
    shown: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.producer = self.http()

    def http(self) -> httpx.Client:
        """A client of the producer whose every answer (but a session cookie) the sweep sees."""

        def record(response: httpx.Response) -> None:
            response.read()
            request = response.request
            headers = "".join(f"{k}: {v}\n" for k, v in response.headers.items() if k != "set-cookie")
            self.sweep.saw(f"answer to {request.method} {request.url.path}", headers + response.text)

        return httpx.Client(base_url=self.stack.producer_url, timeout=10, event_hooks={"response": [record]})

    def post(self, account_id: str, items: list[dict[str, Any]], bearer: str | None = None) -> httpx.Response:
        token = bearer or self.shown[account_id]["ingest_token"]
        return self.producer.post(
            f"/v1/accounts/{account_id}/events",
            content=orjson.dumps(items),
            headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
        )

    def drained(self, account_id: str) -> bool:
        keys = account_keys(account_id)
        return int(self.redis.get(keys.depth) or 0) == 0 and self.redis.zcard(keys.leased) == 0


def _accounts(w: World, tmp_path: Path) -> GoogleSigner:
    """alpha (private key, Apple, Google), oauthco (connected with OAuth), revoked (a key Klaviyo refuses)."""
    sweep, cli = w.sweep, w.cli
    alpha_key = sweep.secret("alpha Klaviyo key", "pk_" + pysecrets.token_hex(17))
    oauth_key = sweep.secret("oauth sandbox account's key", "pk_" + pysecrets.token_hex(17))
    revoked_key = sweep.secret("revoked Klaviyo key", "pk_" + pysecrets.token_hex(17))
    client_secret = sweep.secret("OAuth client secret", "cs_" + pysecrets.token_urlsafe(24))
    basic = base64.b64encode(f"{OAUTH_CLIENT_ID}:{client_secret}".encode()).decode()
    sweep.secret("OAuth client Basic credentials", basic)
    google = GoogleSigner(ISSUER)
    keys_file = google.write_keys_file(tmp_path / "google-keys.json")
    w.shown["alpha"] = cli.add(
        "alpha",
        "--name", "Alpha",
        "--klaviyo-api-key", "-",
        "--apple-pass-type", f"{APPLE_PASS_TYPE}=loyalty",
        "--google-issuer-id", ISSUER,
        "--google-keys-file", str(keys_file),
        "--google-class", f"{ISSUER}.loyalty=loyalty",
        secret=alpha_key,
    )  # fmt: skip
    w.shown["oauthco"] = cli.add(
        "oauthco",
        "--klaviyo-oauth-client-id", OAUTH_CLIENT_ID,
        "--klaviyo-oauth-client-secret", "-",
        secret=client_secret,
    )  # fmt: skip
    w.shown["revoked"] = cli.add("revoked", "--klaviyo-api-key", "-", secret=revoked_key)
    for account_id, shown in w.shown.items():
        sweep.secret(f"{account_id} ingest token", shown["ingest_token"])
        sweep.secret(f"{account_id} webhook secret", shown["webhook_secret"][0])
        # whsec_ + base64 of the signing key: the part after the prefix is secret on its own.
        sweep.secret(f"{account_id} webhook key", shown["webhook_secret"][0].removeprefix("whsec_"))
        sweep.secret(f"{account_id} Apple token secret", shown["apple_token_secret"])

    wait_until(lambda: _up(f"{w.stack.sandbox_url}/_sandbox/health"), "the sandbox", 30)
    w.sandbox.add_account("KALPHA", [alpha_key])
    client = {"client_id": OAUTH_CLIENT_ID, "client_secret": client_secret}
    w.sandbox.add_account("KOAUTH", [oauth_key], oauth_clients=[client])
    cli.ok("klaviyo", "setup", "--account", "alpha")
    cli.fails("klaviyo", "setup", "--account", "revoked")  # Klaviyo refuses the key

    # OAuth: `accounts connect`, the merchant approves at Klaviyo, Klaviyo sends the browser to the callback.
    wait_until(lambda: _up(f"{w.stack.producer_url}/readyz"), "the producer", 30)
    callback_url = f"{w.stack.producer_url}/oauth/klaviyo/callback"
    doc = cli.json("accounts", "connect", "oauthco", "--redirect-uri", callback_url)
    [pending] = w.redis.scan_iter(match=account_keys("oauthco").oauth_pending_pattern)
    cipher = load_cipher(w.stack.env["PASSBRIDGE_SECRET_KEY"], w.stack.state_dir)
    sweep.secret("PKCE code verifier", orjson.loads(cipher.decrypt(w.redis.get(pending) or b""))["verifier"])
    approved = httpx.get(doc["authorize_url"], timeout=10)
    assert approved.status_code == 302, approved.text
    callback = urlsplit(approved.headers["location"])
    sweep.secret("OAuth authorization code", parse_qs(callback.query)["code"][0])
    assert w.producer.get(f"{callback.path}?{callback.query}").status_code == 200
    assert w.producer.get(f"{callback.path}?{callback.query}").status_code == 400  # a code works once
    cli.ok("klaviyo", "setup", "--account", "oauthco")
    grant = w.stack.account("oauthco").secrets.klaviyo_oauth
    assert grant is not None
    assert grant.access_token is not None
    assert grant.refresh_token is not None
    sweep.secret("OAuth access token", grant.access_token.get_secret_value())
    sweep.secret("OAuth refresh token", grant.refresh_token.get_secret_value())
    return google


def _ingest(w: World, google: GoogleSigner) -> None:
    """Every source, with right and wrong credentials."""
    alpha, producer = w.shown["alpha"], w.producer
    assert w.post("alpha", [_item("a1-c", "A1"), _item("a1-i", "A1", "installed")]).status_code == 202
    assert w.post("alpha", [_item("x", "X")], bearer=w.shown["oauthco"]["ingest_token"]).status_code == 401
    assert w.post("alpha", [{"event_id": "bad", "kind": "nope"}]).status_code == 422
    assert w.post("nosuch", [_item("x", "X")], bearer=alpha["ingest_token"]).status_code == 404
    nd = producer.post(
        "/v1/accounts/alpha/events/ndjson",
        content=orjson.dumps(_item("a5-c", "A5")) + b"\n{not json\n",
        headers={"authorization": f"Bearer {alpha['ingest_token']}", "content-type": "application/x-ndjson"},
    )
    assert (nd.status_code, nd.json()["accepted"]) == (200, 1), nd.text

    body = orjson.dumps(
        {
            "type": "pass.created",
            "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
            "data": {"serialNumber": "W1", "passType": "loyalty", "platform": "google"},
        }
    ).decode()
    wrong = "whsec_" + base64.b64encode(b"w" * 32).decode()
    for secret, status in ((alpha["webhook_secret"][0], 202), (wrong, 401)):
        now = datetime.now(UTC)
        headers = {
            "webhook-id": "msg-w1",
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": Webhook(secret).sign("msg-w1", now, body),
            "content-type": "application/json",
        }
        hook = producer.post("/webhooks/alpha", content=body, headers=headers)
        assert hook.status_code == status, hook.text

    token = pass_token(alpha["apple_token_secret"], APPLE_PASS_TYPE, "P1")
    right = {"authorization": f"ApplePass {w.sweep.secret('ApplePass token', token)}"}
    forged = {"authorization": f"ApplePass {pass_token('not-the-secret', APPLE_PASS_TYPE, 'P1')}"}
    path = f"/apple/alpha/v1/devices/dev0001/registrations/{APPLE_PASS_TYPE}/P1"
    assert producer.post(path, json={"pushToken": "push-1"}, headers=forged).status_code == 401
    assert producer.post(path, json={"pushToken": "push-1"}, headers=right).status_code == 201
    assert producer.delete(path, headers=forged).status_code == 401
    assert producer.delete(path, headers=right).status_code == 200
    assert producer.post("/apple/alpha/v1/log", json={"logs": ["device says hello"]}).status_code == 200

    json_body = {"content-type": "application/json"}
    signed = google.sign(google.message("save", "G1", "loyalty", "nonce-g1"))
    assert producer.post("/google/alpha/callback", content=signed, headers=json_body).status_code == 200
    other_keys = GoogleSigner(ISSUER).sign(google.message("save", "G2", "loyalty", "nonce-g2"))
    assert producer.post("/google/alpha/callback", content=other_keys, headers=json_body).status_code == 401

    assert w.post("oauthco", [_item("o1-c", "O1")]).status_code == 202
    assert w.post("revoked", [_item("r1-c", "R1")]).status_code == 202
    forged_state = {"state": "oauthco.forged", "code": "c0de-forged"}
    assert producer.get("/oauth/klaviyo/callback", params=forged_state).status_code == 400
    wait_until(lambda: w.drained("alpha") and w.drained("oauthco"), "alpha and oauthco delivered", 30)


def _klaviyo_fails(w: World) -> None:
    """A refresh, 429s and 503s, a dead letter, a revoked grant, a rejected key, a full backlog."""
    sandbox, stack = w.sandbox, w.stack
    before = stack.account("oauthco").secrets.klaviyo_oauth
    assert before is not None
    # An expired access token: a 401, one refresh, the event delivered with the new token.
    assert sandbox.expire_access_tokens() >= 1
    assert w.post("oauthco", [_item("o2-c", "O2")]).status_code == 202
    wait_until(lambda: w.drained("oauthco"), "oauthco delivered after a refresh", 20)
    after = stack.account("oauthco").secrets.klaviyo_oauth
    assert after is not None
    assert after.access_token is not None
    assert after.refresh_token is not None
    assert after.access_token != before.access_token, "no refresh"
    w.sweep.secret("refreshed OAuth access token", after.access_token.get_secret_value())

    # 503s, then 429s, retried until delivered (whichever endpoint the workers pick for the events).
    sends = ["create_event", "bulk_create_events"]

    def answered(status: int) -> int:
        return sum(sandbox.count(operation, status) for operation in sends)

    sandbox.set_faults(error_rates={503: 1.0}, operations=sends)
    assert w.post("alpha", [_item(f"f{i}-c", f"F{i}") for i in range(6)]).status_code == 202
    wait_until(lambda: answered(503), "503s")
    sandbox.set_faults(error_rates={429: 1.0}, operations=sends)
    wait_until(lambda: answered(429), "429s")
    # An item Klaviyo refuses, dead-lettered.
    sandbox.set_faults(reject_external_ids=["DEAD-1"])
    assert w.post("alpha", [_item("dead-1-c", "DEAD-1")]).status_code == 202
    wait_until(lambda: w.redis.zcard(account_keys("alpha").dlq) >= 1, "the refused event dead-lettered")
    sandbox.clear_faults()
    wait_until(lambda: w.drained("alpha"), "alpha delivered after the 503s and 429s")

    # The merchant revokes the grant: the refresh is refused and the account disconnected.
    revoke = httpx.post(
        f"{stack.sandbox_url}/oauth/revoke",
        data={"token": after.refresh_token.get_secret_value()},
        auth=(OAUTH_CLIENT_ID, w.sweep.secrets["OAuth client secret"]),
    )
    assert revoke.status_code == 200
    sandbox.expire_access_tokens()
    assert w.post("oauthco", [_item("o3-c", "O3")]).status_code == 202
    wait_until(lambda: stack.account("oauthco").state is AccountState.disconnected, "oauthco disconnected")
    # The rejected key: the engine pauses the account (and its probe keeps asking Klaviyo), its backlog fills.
    wait_until(lambda: w.redis.exists(account_keys("revoked").paused), "revoked paused")
    full = w.post("revoked", [_item(f"r{i}-c", f"R{i}") for i in range(2, HIGH_WATER + 2)])
    assert full.status_code == 503, full.text


def _cli_views(w: World, tmp_path: Path) -> None:
    """What an operator's commands print, and their errors (some given a secret where it does not belong)."""
    sweep, cli, env = w.sweep, w.cli, w.stack.env
    [dead] = [e for e in cli.json("dlq", "list")["entries"] if e["account"] == "alpha"]
    for args in (
        ("status",),
        ("dlq", "list"),
        ("dlq", "show", dead["dlq_id"]),
        ("accounts", "list"),
        ("engine", "status"),
        ("engine", "history", "alpha", "--serial", "DEAD-1"),
        ("engine", "history", "oauthco", "--serial", "O3"),
        ("engine", "history", "revoked", "--serial", "R1"),
        ("serial", "alpha", "DEAD-1"),
        ("serial", "oauthco", "O2"),
        ("event", "alpha", "dead-1-c"),
        ("event", "oauthco", "o3-c"),
        ("report", "alpha"),
    ):
        cli.ok(*args)
        cli.ok(*args, "--json")
    for account_id in ("alpha", "oauthco", "revoked"):
        cli.ok("accounts", "show", account_id)
        cli.ok("accounts", "show", account_id, "--json")
        cli("accounts", "check", account_id)  # exit 1 for the broken ones
        cli("accounts", "check", account_id, "--json")

    # A key stored before the registry refused keys HTTP cannot carry (a paste that broke the line).
    broken = sweep.secret(
        "a stored key with a line break", "pk_" + pysecrets.token_hex(8) + "\n" + pysecrets.token_hex(8)
    )
    for part in broken.split("\n"):
        sweep.secret(f"part of a stored key ({part[-4:]})", part)
    w.stack.put(Account(account_id="garbled", secrets=AccountSecrets(klaviyo_api_key=SecretStr(broken))))
    cli("accounts", "check", "garbled")
    cli("accounts", "check", "garbled", "--json")

    typo_key = sweep.secret("a mistyped Klaviyo key", "sk_" + pysecrets.token_hex(17))
    bad_hook = sweep.secret("a malformed webhook secret", "whs_" + pysecrets.token_urlsafe(20))
    cli.fails("accounts", "update", "alpha", "--klaviyo-api-key", typo_key + " ")  # pasted with a blank
    cli.fails("accounts", "add", "beta", "--webhook-secret", bad_hook)
    alpha_hook, other_hook = (w.shown[a]["webhook_secret"][0] for a in ("alpha", "oauthco"))
    cli.fails("accounts", "update", "alpha", "--add-webhook-secret", alpha_hook)  # listed twice
    cli.fails("accounts", "update", "alpha", "--remove-webhook-secret", other_hook)  # not alpha's
    cli.fails("accounts", "add", "alpha", "--klaviyo-api-key", sweep.secrets["alpha Klaviyo key"])  # exists
    cli.fails("accounts", "show", "nosuch")
    cli.fails("dlq", "show", "nosuch")
    cli.fails("event", "alpha", "nosuch")
    cli.fails("engine", "resume", "nosuch")
    cli.fails("accounts", "list", env={"PASSBRIDGE_SECRET_KEY": Fernet.generate_key().decode()})
    wrong = sweep.secret("a wrong Redis password", pysecrets.token_urlsafe(18))
    cli.fails(
        "status",
        env={"REDIS_URL": w.stack.redis_url.replace(urlsplit(w.stack.redis_url).password or "", wrong)},
    )
    truncated = sweep.secret("a damaged PASSBRIDGE_SECRET_KEY", env["PASSBRIDGE_SECRET_KEY"][:-6])
    cli.fails("accounts", "list", env={"PASSBRIDGE_SECRET_KEY": truncated})
    # A secret pasted into the wrong variable: the settings error names the variable, never its value.
    cli.fails("status", env={"PASSBRIDGE_LOG_LEVEL": env["PASSBRIDGE_ADMIN_TOKEN"]})
    # accounts.yaml files holding a literal secret, each wrong in its own way.
    secret = sweep.secret("a client secret in accounts.yaml", "cs_" + pysecrets.token_urlsafe(20))
    for i, settings in enumerate(
        (
            f"klaviyo_oauth_client_secret: {secret}",  # without a client id
            f"webhook_secrets: [{bad_hook}]",
            f"klaviyo_oauth_client_secret: {secret}: x",  # a YAML syntax error on the secret's line
            f"klaviyo_api_key: *{secret}",  # an alias: PyYAML names it in its error
            f"klaviyo_api_key: !{secret} x",  # a tag: the same
        )
    ):
        path = tmp_path / f"accounts-{i}.yaml"
        path.write_text(f"accounts:\n  gamma:\n    {settings}\n")
        cli.fails("accounts", "apply", str(path))


def _crawl(admin: httpx.Client) -> set[str]:
    """Every dashboard page reachable from the overview (links and GET forms are followed)."""
    seen: set[str] = set()
    todo = ["/dashboard"]
    link = re.compile(r'(?:href|action)="(/dashboard[^"#]*)"')
    while todo and len(seen) < MAX_PAGES:
        path = todo.pop(0)
        if path in seen:
            continue
        seen.add(path)
        r = admin.get(path)
        assert r.status_code < 500, (path, r.text[:2000])
        for found in map(unescape, link.findall(r.text)):
            if not found.startswith(("/dashboard/static", "/dashboard/logout")) and found not in seen:
                todo.append(found)
    return seen


def _web_views(w: World) -> None:
    """The dashboard (a wrong password, every page reachable when logged in, error pages), the public pages and
    every /metrics."""
    env, producer = w.stack.env, w.producer
    token = env["PASSBRIDGE_ADMIN_TOKEN"]
    # The last character changed, to one it is not: a token ending in "x" made "+ 'x'" no typo at all.
    typo = w.sweep.secret("a mistyped admin password", token[:-1] + ("y" if token.endswith("x") else "x"))
    assert producer.post("/dashboard/login", data={"token": typo}).status_code == 401
    assert producer.get("/dashboard").status_code == 401
    with w.http() as admin:
        login = admin.post("/dashboard/login", data={"token": env["PASSBRIDGE_ADMIN_TOKEN"]})
        assert login.status_code == 303, login.text
        w.sweep.secret("dashboard session cookie", admin.cookies["pb_dashboard"])
        pages = _crawl(admin)
        assert any(p.startswith("/dashboard/dlq/entry") for p in pages), pages
        assert any(p.startswith("/dashboard/account") for p in pages), pages
        assert admin.get("/dashboard/fragment/overview", headers={"x-dashboard-fragment": "1"}).is_success
        for path in (
            "/dashboard/serial?account=alpha",
            "/dashboard/dlq?since=someday",
            "/dashboard/dlq/entry?account=alpha&id=nope",
            "/dashboard/account",
            "/dashboard/nope",
        ):
            assert admin.get(path).is_client_error, path
        with w.http() as copy:  # the cookie copied elsewhere, then the session ended: a marker in Redis
            copy.cookies = {"pb_dashboard": admin.cookies["pb_dashboard"]}
            assert copy.get("/dashboard").status_code == 200
            assert admin.post("/dashboard/logout").status_code == 303
            assert copy.get("/dashboard").status_code == 401

    for public in ("/healthz", "/readyz", "/docs", "/openapi.json"):
        assert producer.get(public).status_code == 200, public
    bearer = {"authorization": f"Bearer {env['PASSBRIDGE_METRICS_TOKEN']}"}
    assert producer.get("/metrics").status_code == 401
    assert producer.get("/metrics", headers=bearer).status_code == 200
    for i, port in enumerate(w.stack.worker_metrics, 1):
        for headers in (bearer, {}):
            m = httpx.get(f"http://127.0.0.1:{port}/metrics", headers=headers, timeout=10)
            assert m.status_code == (200 if headers else 401), m.text
            w.sweep.saw(f"worker-{i} /metrics {m.status_code}", m.text)


def _redis_values(r: redis_sync.Redis, key: bytes, kind: str) -> list[bytes]:
    """Everything a key holds, read as its type is read."""
    if kind == "string":
        return [r.get(key) or b""]
    if kind == "hash":
        return [k + b" " + v for k, v in r.hgetall(key).items()]
    if kind == "list":
        return list(r.lrange(key, 0, -1))
    if kind == "set":
        return list(r.smembers(key))
    if kind == "zset":
        return [m for m, _ in r.zrange(key, 0, -1, withscores=True)]
    assert kind == "stream", kind
    return [repr(entry).encode() for entry in r.xrange(key)]


def _rotation_too_early(w: World) -> None:
    """A key rotation run while the processes still hold only the old key: their errors are seen too."""
    old = w.stack.env["PASSBRIDGE_SECRET_KEY"]
    new = w.sweep.secret("the new PASSBRIDGE_SECRET_KEY", Fernet.generate_key().decode())
    w.cli.ok("accounts", "rotate-key", env={"PASSBRIDGE_SECRET_KEY": f"{new},{old}"})
    # Once its copy of the account expires (2 s), the producer refuses what it cannot check.
    wait_until(
        lambda: w.post("alpha", [_item("late-c", "LATE")]).status_code == 503, "the producer's 503", 10
    )


def _raw_state(w: World) -> None:
    """What a shell on the host shows: command lines, every Redis key and command, the state dir."""
    for name, proc in w.stack.procs.items():
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        pids = [str(proc.pid), *(children.read_text().split() if children.exists() else [])]
        for pid in pids:  # a worker's express lane is its child
            cmdline = Path(f"/proc/{pid}/cmdline")
            if cmdline.exists():
                w.sweep.saw(f"command line of {name} ({pid})", cmdline.read_bytes())

    r, keys = w.redis, 0
    for key in r.scan_iter(count=1000):
        keys += 1
        kind = r.type(key).decode()
        values = _redis_values(r, key, kind)
        w.sweep.saw(f"redis {kind} {key.decode(errors='replace')}", key + b"\n" + b"\n".join(values))
    assert keys > 40, keys  # accounts, queues, history, DLQ, markers...
    slow = r.execute_command("SLOWLOG", "GET", "-1")
    assert len(slow) > 1000, len(slow)
    w.sweep.saw("redis SLOWLOG (every command)", b"\n".join(b" ".join(entry[3]) for entry in slow))
    for path in sorted(w.stack.state_dir.rglob("*")):
        if path.is_file():
            w.sweep.saw(f"file {path.relative_to(w.stack.tmp)}", path.read_bytes())


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_no_secret_shows_anywhere(stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env
    monkeypatch.setattr("passbridge.cli.common.configure_logging", configure_uncached)
    sweep = Sweep()
    for name in ("PASSBRIDGE_SECRET_KEY", "PASSBRIDGE_ADMIN_TOKEN", "PASSBRIDGE_METRICS_TOKEN"):
        sweep.secret(name, stack.env[name])
    sweep.secret("Redis password", urlsplit(stack.redis_url).password or "")
    # The Fernet key's 32 bytes (signing key, then encryption key), each half as well.
    key = base64.urlsafe_b64decode(stack.env["PASSBRIDGE_SECRET_KEY"])
    sweep.secret("PASSBRIDGE_SECRET_KEY bytes, base64", base64.b64encode(key).decode())
    sweep.secret("Fernet signing key, hex", key[:16].hex())
    sweep.secret("Fernet encryption key, hex", key[16:].hex())
    cli = Cli({**stack.env, "PASSBRIDGE_LOG_FORMAT": "console"}, sweep)
    w = World(stack, sweep, cli, SandboxClient(stack.sandbox_url), redis_sync.Redis.from_url(stack.redis_url))
    try:
        google = _accounts(w, tmp_path)
        wait_until(lambda: w.redis.zcard(WORKERS) >= 2, "the workers' heartbeats", 30)
        _ingest(w, google)
        _klaviyo_fails(w)
        _cli_views(w, tmp_path)
        _web_views(w)
        _rotation_too_early(w)
        _raw_state(w)
    except BaseException:
        print(stack.tail())
        raise
    finally:
        w.producer.close()
        w.sandbox.close()
        w.redis.close()
        structlog.reset_defaults()

    stack.stop()  # what processes log on their way out counts too
    stack.redis.stop()
    assert stack.procs["worker-badkey"].returncode not in (0, None)
    for path in sorted((tmp_path / "redis").rglob("*")):
        if path.is_file():
            sweep.saw(f"file {path.relative_to(tmp_path)}", path.read_bytes())
    for path in sorted(stack.logs.glob("*.log")):
        sweep.saw(f"log {path.name}", path.read_bytes())
    assert any(where.endswith(".aof") for where, _ in sweep.seen), "no append-only file read"
    # Logged at DEBUG (the producer has no debug lines of its own), in both formats.
    assert b'"level": "debug"' in (stack.logs / "worker-1.log").read_bytes()
    assert b"debug    \x1b[0m] \x1b[1mklaviyo_call" in (stack.logs / "worker-2.log").read_bytes()

    leaks = sweep.leaks()
    assert not leaks, f"{len(leaks)} secret(s) visible:\n" + "\n".join(leaks[:40])
