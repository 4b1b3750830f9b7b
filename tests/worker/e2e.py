"""End-to-end harness: real ``passbridge worker`` processes, the Klaviyo sandbox over HTTP, a real Redis.

- :class:`Pipeline` registers passbridge accounts whose Klaviyo API keys belong to sandbox accounts,
  provisions them (``worker.setup.provision``, what ``passbridge klaviyo setup`` runs) and enqueues events
  through the producer's own ``enqueue`` script;
- :class:`Workers` starts, SIGKILLs, SIGTERMs and restarts worker processes (logs under the test's tmp dir).
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.fernet import Fernet, MultiFernet
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from klaviyo_sandbox.client import SandboxClient
from klaviyo_sandbox.testing import SandboxServer
from passbridge.accounts import Account, AccountSecrets, AccountStore
from passbridge.event import PassEvent
from passbridge.keys import EXPRESS_ON, WORKERS, account_keys
from passbridge.queue import enqueue
from passbridge.settings import Settings
from tests.conftest import async_wait_for
from worker.klaviyo.client import KlaviyoClient
from worker.setup import provision

#: The Klaviyo rate-limit clock runs this much faster in the sandbox and in the workers' limiter alike.
RATE_SCALE = 100.0


#: Sandbox account ids, unique in this process (the sandbox server lives in it): random ones of five hex digits
#: collided once in a CI run ("account K2A6F6 exists") after a few hundred property-test examples.
_SANDBOX_IDS = itertools.count(int.from_bytes(os.urandom(2), "big"))


@dataclass
class Workers:
    """Worker processes sharing one environment."""

    env: dict[str, str]
    log_dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    started: int = 0

    def start(self, n: int = 1) -> list[subprocess.Popen[bytes]]:
        """Start ``n`` more workers."""
        out = []
        for _ in range(n):
            self.started += 1
            log = (self.log_dir / f"worker-{self.started}.log").open("wb")
            proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "passbridge"), "worker"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            log.close()
            self.procs.append(proc)
            out.append(proc)
        return out

    def wait_express(self, timeout: float = 30) -> None:
        """Wait until an express lane is up (no-op when disabled): a test whose timing matters starts its
        events only after the workers' start-up work (the child's imports) is over."""
        if self.env.get("PASSBRIDGE_WORKER_EXPRESS_LANE", "true").lower() in ("0", "false"):
            return
        client = SyncRedis.from_url(self.env["REDIS_URL"])
        try:
            deadline = time.monotonic() + timeout
            while not client.exists(EXPRESS_ON):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no express lane after {timeout} s\n{self.logs()}")
                time.sleep(0.05)
        finally:
            client.close()

    @staticmethod
    def family(proc: subprocess.Popen[bytes]) -> set[int]:
        """The worker's pid and its live children's (its express lane): either may hold a lease."""
        pids = {proc.pid}
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        if children.exists():
            pids |= {int(p) for p in children.read_text().split()}
        return pids

    @property
    def alive(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs if p.poll() is None]

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL: no cleanup at all; its leases must expire and be taken over."""
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def terminate(self, proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
        """SIGTERM and wait: the graceful path."""
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=timeout)

    def stop_all(self) -> None:
        for proc in self.alive:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=5)

    def logs(self) -> str:
        """The tail of each worker's log, for failure messages."""
        return "\n".join(
            p.read_text(errors="replace")[-4000:] for p in sorted(self.log_dir.glob("worker-*.log"))
        )

    def text(self) -> str:
        """Every worker's log in full, for assertions that search or count lines (:meth:`logs` is a tail)."""
        return "".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("worker-*.log")))


def worker_env(
    redis_url: str, sandbox_url: str, secret_key: str, state_dir: Path, **extra: str
) -> dict[str, str]:
    """The environment of a worker process in these tests."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PASSBRIDGE_")}
    env.update(
        {
            "REDIS_URL": redis_url,
            "PASSBRIDGE_SECRET_KEY": secret_key,
            "PASSBRIDGE_STATE_DIR": str(state_dir),
            "PASSBRIDGE_KLAVIYO_BASE_URL": sandbox_url,
            "PASSBRIDGE_KLAVIYO_RATE_SCALE": str(RATE_SCALE),
            "PASSBRIDGE_LOG_FORMAT": "json",
            "PASSBRIDGE_WORKER_LEASE_TTL_S": "2",
            "PASSBRIDGE_WORKER_GRACE_S": "5",
            "PASSBRIDGE_RETRY_BASE_DELAY_S": "0.05",
            "PASSBRIDGE_RETRY_MAX_DELAY_S": "0.5",
            "PASSBRIDGE_RETRY_MAX_ATTEMPTS": "12",
            **extra,
        }
    )
    return env


@dataclass
class Pipeline:
    """Accounts wired to the sandbox, and the producer-side enqueue."""

    redis: Redis
    sandbox: SandboxClient
    server: SandboxServer
    secret_key: str
    settings: Settings
    accounts: dict[str, str] = field(default_factory=dict)  # passbridge account → sandbox account

    @property
    def store(self) -> AccountStore:
        return AccountStore(self.redis, MultiFernet([Fernet(self.secret_key.encode())]))

    async def add_account(self, account_id: str, **fields: object) -> Account:
        """A passbridge account with its own sandbox account and key, provisioned for WalletPass records."""
        key = f"pk_{account_id.replace('-', '_')}_{os.urandom(6).hex()}"
        sandbox_id = f"K{next(_SANDBOX_IDS) % 0x100000:05X}"
        self.sandbox.add_account(sandbox_id, [key])
        account = Account(
            account_id=account_id,
            secrets=AccountSecrets.model_validate({"klaviyo_api_key": key}),
            **fields,  # type: ignore[arg-type]
        )
        await self.store.put(account)
        async with KlaviyoClient.from_settings(self.settings, self.redis, self.store) as client:
            await provision(client, self.redis, account)
        self.accounts[account_id] = sandbox_id
        return account

    async def put(self, events: Iterable[PassEvent]) -> None:
        """Enqueue like the producer does (one atomic call per account)."""
        by_account: dict[str, list[PassEvent]] = {}
        for ev in events:
            by_account.setdefault(ev.account_id, []).append(ev)
        for account_id, evs in by_account.items():
            result = await enqueue(self.redis, account_id, evs, high_water=10_000_000, dedup_window_s=3600)
            assert all(result.accepted)

    def stored_unique_ids(self, account_id: str) -> list[str]:
        """The ``unique_id`` of every metric event the sandbox stored for the account (it dedups on it)."""
        state = self.server.app.runtime.states[self.accounts[account_id]]
        return [str(e.unique_id) for e in list(state.events.values())]

    def duplicate_events(self, account_id: str) -> int:
        """Metric events the sandbox accepted but dropped as duplicates (a send repeated after a kill or a
        lost answer), whichever endpoint carried them."""
        return self.server.app.runtime.states[self.accounts[account_id]].duplicate_events

    def records(self, account_id: str) -> dict[str, dict[str, object]]:
        """WalletPass records the sandbox ingested, by serial."""
        docs = self.sandbox.object_records(self.accounts[account_id], object_type="WalletPass")
        out = {}
        for doc in docs:
            record = doc["attributes"]["record_properties"]
            out[str(record["serial_number"])] = record
        return out

    async def drained(self) -> bool:
        """No pending event and no lease left in any of the accounts."""
        for account_id in self.accounts:
            keys = account_keys(account_id)
            if int(await self.redis.get(keys.depth) or 0) or await self.redis.zcard(keys.leased):
                return False
        return True


async def engines_running(redis: Redis, engines: int, timeout: float = 60) -> None:
    """Wait until ``engines`` engines are registered (a worker and its express lane are two): all past their
    start-up."""

    async def registered() -> bool:
        return bool(await redis.zcard(WORKERS) == engines)

    await async_wait_for(registered, timeout=timeout)


async def drained(
    pipeline: Pipeline, workers: Workers, timeout: float = 60, idle_timeout: float = 10.0
) -> None:
    """Wait until the pipeline has nothing pending or leased (printing the workers' logs if it never does), then
    until the sandbox has applied its background jobs."""
    try:
        await async_wait_for(pipeline.drained, timeout=timeout, interval=0.05)
    except BaseException:
        print(workers.logs())
        raise
    pipeline.sandbox.wait_idle(timeout=idle_timeout)
