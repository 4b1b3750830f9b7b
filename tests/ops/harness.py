"""A running passbridge for the operations tests: its own Redis, the Klaviyo sandbox, the real producer
(``passbridge producer`` as a subprocess, two processes to exercise multiprocess metrics) and a real worker
(``passbridge worker --metrics-port``). Queue state is built only by sending events through the producer's
HTTP API and letting the worker deliver them — never by writing keys.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis as redis_sync
from cryptography.fernet import Fernet
from prometheus_client.multiprocess import MultiProcessCollector
from redis.asyncio import Redis

from klaviyo_sandbox.client import SandboxClient
from klaviyo_sandbox.config import SandboxConfig
from klaviyo_sandbox.testing import SandboxServer, start_sandbox
from passbridge.accounts import hash_token
from passbridge.demo.stack import spawn_cli, stop_process
from passbridge.keys import account_keys
from passbridge.redis_server import RedisServer, free_port, start_redis
from passbridge.settings import Settings
from tests.worker.e2e import RATE_SCALE, Pipeline, Workers, worker_env

ADMIN_TOKEN = "adm-" + "7" * 24


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or raise AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def item(
    event_id: str,
    serial: str,
    kind: str,
    *,
    platform: str = "apple",
    pass_type: str = "loyalty",
    minute: int = 0,
    **extra: Any,
) -> dict[str, Any]:
    """One events-API item."""
    return {
        "event_id": event_id,
        "kind": kind,
        "serial_number": serial,
        "pass_type": pass_type,
        "platform": platform,
        "occurred_at": f"2026-11-25T10:{minute:02d}:00Z",
        "email": f"{serial.lower()}@example.com",
        "properties": {"points": minute},
        **extra,
    }


@dataclass
class Stack:
    """The running processes and the clients to drive and observe them."""

    tmp: Path
    redis_server: RedisServer
    sandbox_server: SandboxServer
    secret_key: str
    producer_port: int
    worker_metrics_port: int
    env: dict[str, str] = field(default_factory=dict)
    producer: subprocess.Popen[bytes] | None = None
    workers: Workers | None = None
    tokens: dict[str, str] = field(default_factory=dict)
    #: passbridge account → its sandbox (Klaviyo) account id
    sandbox_accounts: dict[str, str] = field(default_factory=dict)

    @property
    def redis_url(self) -> str:
        return self.redis_server.url

    @property
    def producer_url(self) -> str:
        return f"http://127.0.0.1:{self.producer_port}"

    @property
    def worker_metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.worker_metrics_port}/metrics"

    @property
    def sandbox(self) -> SandboxClient:
        return SandboxClient(self.sandbox_server.url)

    def settings(self) -> Settings:
        return Settings(
            redis_url=self.redis_url,
            state_dir=self.tmp / "state",
            secret_key=self.secret_key,  # type: ignore[arg-type]
            klaviyo_base_url=self.sandbox_server.url,
            klaviyo_rate_scale=RATE_SCALE,
            admin_token=ADMIN_TOKEN,  # type: ignore[arg-type]
        )

    def sync_redis(self) -> redis_sync.Redis:
        return redis_sync.Redis.from_url(self.redis_url)

    # --- processes --------------------------------------------------------------------------------------

    def start_producer(self, processes: int = 2) -> None:
        """``passbridge producer --workers N`` with the admin token set; waits until it answers."""
        env = {
            **self.env,
            "PASSBRIDGE_ADMIN_TOKEN": ADMIN_TOKEN,
            "PROMETHEUS_MULTIPROC_DIR": str(self.tmp / "prom"),
        }
        args = ["--host", "127.0.0.1", "--port", str(self.producer_port), "--workers", str(processes)]
        self.producer = spawn_cli(["producer", *args], env, self.tmp / "producer.log")

        def up() -> bool:
            assert self.producer is not None
            assert self.producer.poll() is None, self.logs()
            try:
                return httpx.get(f"{self.producer_url}/readyz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 30, "the producer")

    def start_worker(self) -> None:
        """One ``passbridge worker`` serving /metrics on its own port; waits for its heartbeat."""
        logs = self.tmp / "worker-logs"
        logs.mkdir(exist_ok=True)
        env = {**self.env, "PASSBRIDGE_WORKER_METRICS_PORT": str(self.worker_metrics_port)}
        self.workers = Workers(env, logs)
        self.workers.start(1)
        r = self.sync_redis()
        wait_until(lambda: r.zcard("pb:workers") >= 1, 30, "the worker's heartbeat")
        r.close()

    def stop(self) -> None:
        if self.workers is not None:
            self.workers.stop_all()
        if self.producer is not None:
            stop_process(self.producer, timeout=15)
        self.sandbox_server.stop()
        self.redis_server.stop()

    def logs(self) -> str:
        out = (
            (self.tmp / "producer.log").read_text(errors="replace")[-3000:]
            if (self.tmp / "producer.log").exists()
            else ""
        )
        if self.workers is not None:
            out += "\n" + self.workers.logs()
        return out

    # --- accounts and events ----------------------------------------------------------------------------

    def add_account(self, account_id: str, **fields: Any) -> str:
        """Register an account with its own sandbox account (provisioned) and an ingest token; returns it."""
        token = f"pbi_{account_id}_{os.urandom(4).hex()}"

        async def go() -> None:
            redis = Redis.from_url(self.redis_url)
            sandbox = self.sandbox
            try:
                pipeline = Pipeline(redis, sandbox, self.sandbox_server, self.secret_key, self.settings())
                await pipeline.add_account(
                    account_id, name=account_id.title(), ingest_token_sha256=hash_token(token), **fields
                )
                self.sandbox_accounts[account_id] = pipeline.accounts[account_id]
            finally:
                sandbox.close()
                await redis.aclose()

        # In a thread of its own: Playwright's sync API keeps an event loop running in this one.
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, go()).result()
        self.tokens[account_id] = token
        return token

    def post(
        self, account_id: str, items: list[dict[str, Any]], *, token: str | None = None
    ) -> httpx.Response:
        """POST the items to the events API (each request on a fresh connection)."""
        return httpx.post(
            f"{self.producer_url}/v1/accounts/{account_id}/events",
            content=orjson.dumps(items),
            headers={
                "authorization": f"Bearer {token or self.tokens[account_id]}",
                "content-type": "application/json",
            },
            timeout=10,
        )

    def post_ndjson(self, account_id: str, lines: Iterable[bytes]) -> httpx.Response:
        return httpx.post(
            f"{self.producer_url}/v1/accounts/{account_id}/events/ndjson",
            content=b"\n".join(lines) + b"\n",
            headers={
                "authorization": f"Bearer {self.tokens[account_id]}",
                "content-type": "application/x-ndjson",
            },
            timeout=10,
        )

    def stored_unique_ids(self, account_id: str) -> set[str]:
        """``unique_id`` of every metric event the sandbox holds for the account (= delivered event ids)."""
        state = self.sandbox_server.app.runtime.states[self.sandbox_accounts[account_id]]
        return {str(e.unique_id) for e in list(state.events.values())}

    def producer_pids_counting(self, metric: str) -> set[str]:
        """Pids of the producer processes whose multiprocess files hold a non-zero ``metric`` sample."""
        pids = set()
        # The producer counts in a directory of its own under the one it was given (passbridge.metrics).
        for path in (self.tmp / "prom").glob("producer-*/counter_*.db"):
            families = MultiProcessCollector.merge([str(path)], accumulate=True)
            if any(s.name == metric and s.value > 0 for f in families for s in f.samples):
                pids.add(path.stem.rsplit("_", 1)[1])
        return pids

    def drained(self, account_id: str) -> bool:
        r = self.sync_redis()
        try:
            keys = account_keys(account_id)
            return int(r.get(keys.depth) or 0) == 0 and r.zcard(keys.leased) == 0
        finally:
            r.close()

    def dlq_size(self, account_id: str) -> int:
        r = self.sync_redis()
        try:
            return int(r.zcard(account_keys(account_id).dlq))
        finally:
            r.close()


def new_stack(tmp: Path) -> Stack:
    """Redis, the sandbox and the environment of the producer and worker processes (not started yet)."""
    secret = Fernet.generate_key().decode()
    redis_server = start_redis(tmp / "redis", appendonly=False)
    sandbox = start_sandbox(SandboxConfig(rate_scale=RATE_SCALE, request_log_size=100))
    stack = Stack(tmp, redis_server, sandbox, secret, free_port(), free_port())
    stack.env = worker_env(redis_server.url, sandbox.url, secret, tmp / "state")
    return stack
