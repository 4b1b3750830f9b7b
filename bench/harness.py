"""Shared pieces of the rate-limited benchmarks (``bench/fairness.py``, ``bench/drain.py``).

Everything runs on this machine as separate processes: an embedded Redis (AOF on, as in production), the
Klaviyo sandbox with Klaviyo's real rate tiers on a clock ``rate_scale`` times faster (``passbridge sandbox
--rate-scale``), and ``passbridge worker`` processes whose limiter runs on the same clock
(``PASSBRIDGE_KLAVIYO_RATE_SCALE``). Events are enqueued through the producer's own ``enqueue.lua`` (the
step the producer's routes end in), so "ingested" is the moment the event is durably queued.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cryptography.fernet import Fernet, MultiFernet  # noqa: E402
from redis.asyncio import Redis  # noqa: E402

from passbridge.accounts import Account, AccountSecrets, AccountStore  # noqa: E402
from passbridge.demo.stack import spawn_cli, stop_processes  # noqa: E402
from passbridge.event import EventIn, PassEvent, build_event  # noqa: E402
from passbridge.keys import ACTIVE_ACCOUNTS, WORKERS_INFO, account_keys  # noqa: E402
from passbridge.queue import enqueue  # noqa: E402
from passbridge.redis_server import free_port, start_redis  # noqa: E402
from passbridge.settings import Settings  # noqa: E402
from worker import history  # noqa: E402
from worker.klaviyo.client import KlaviyoClient  # noqa: E402
from worker.setup import provision  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its live children (a worker's express lane)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / TICK
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            with contextlib.suppress(OSError):
                total += cpu_s(int(child))
    return total


def klaviyo_key(account_id: str) -> str:
    """The sandbox private key of a bench account."""
    return f"pk_bench_{account_id}"


class Stack:
    """Redis, the sandbox and worker processes of one benchmark run."""

    def __init__(self, workdir: Path, rate_scale: float, **worker_env: str) -> None:
        self.workdir = workdir
        self.rate_scale = rate_scale
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.redis_server = start_redis(workdir / "redis")
        self.redis_url = self.redis_server.url
        self.secret_key = Fernet.generate_key().decode()
        self.sandbox_url = f"http://127.0.0.1:{free_port()}"
        #: Accounts served by a sandbox other than ``sandbox_url`` (``start_sandbox_per_account``).
        self.account_urls: dict[str, str] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PASSBRIDGE_")}
        self.env.update(
            {
                "REDIS_URL": self.redis_url,
                "PASSBRIDGE_SECRET_KEY": self.secret_key,
                "PASSBRIDGE_STATE_DIR": str(workdir / "state"),
                "PASSBRIDGE_KLAVIYO_BASE_URL": self.sandbox_url,
                "PASSBRIDGE_KLAVIYO_RATE_SCALE": f"{rate_scale:g}",
                "PASSBRIDGE_LOG_LEVEL": "warning",
                "PASSBRIDGE_LOG_FORMAT": "json",
                **worker_env,
            }
        )

    def account_store(self, redis: Redis) -> AccountStore:
        """The registry on ``redis`` with this run's secret key."""
        return AccountStore(redis, MultiFernet([Fernet(self.secret_key.encode())]))

    def spawn(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``passbridge ARGS`` with this run's environment plus ``env`` (``spawn_cli``: own session),
        output to ``<workdir>/<name>.log``."""
        proc = spawn_cli(list(args), {**self.env, **(env or {})}, self.workdir / f"{name}.log")
        self.procs[name] = proc
        return proc

    async def start_sandbox(self, accounts: Sequence[str], *extra: str) -> None:
        """The sandbox with one Klaviyo account per bench account, real tiers on the scaled clock."""
        await self._sandbox("sandbox", self.sandbox_url, accounts, extra)

    async def start_sandbox_per_account(self, accounts: Sequence[str], *extra: str) -> None:
        """One sandbox process per bench account (the first at ``sandbox_url``, the global base URL; the others
        on ports of their own, which ``setup_accounts`` stores as the accounts' ``klaviyo_base_url``).

        Each merchant account has a Klaviyo account of its own, and Klaviyo serves one account's requests
        independently of another's load. One sandbox process serving all of them would make account B's calls
        wait in the same event loop behind account A's bulk requests, a coupling of the stand-in only.
        """
        for i, account_id in enumerate(accounts):
            url = self.sandbox_url if i == 0 else f"http://127.0.0.1:{free_port()}"
            await self._sandbox(f"sandbox-{account_id}", url, [account_id], extra)
            if i:
                self.account_urls[account_id] = url

    async def _sandbox(self, name: str, url: str, accounts: Sequence[str], extra: Sequence[str]) -> None:
        args = ["sandbox", "--port", url.rsplit(":", 1)[1], "--rate-scale", f"{self.rate_scale:g}"]
        for account_id in accounts:
            args += ["--api-key", klaviyo_key(account_id)]
        self.spawn(name, *args, *extra)
        await wait_http(f"{url}/_sandbox/health")

    def klaviyo_url(self, account_id: str) -> str:
        """The sandbox that serves ``account_id``."""
        return self.account_urls.get(account_id, self.sandbox_url)

    async def start_workers(self, redis: Redis, n: int = 2, **env: str) -> list[subprocess.Popen[bytes]]:
        """``n`` worker processes; returns once all heart-beat (and their express lanes, unless disabled)."""
        before = await redis.zcard("pb:workers")
        procs = [self.spawn(f"worker-{len(self.procs)}-{i}", "worker", env=env) for i in range(n)]
        express = {**self.env, **env}.get("PASSBRIDGE_WORKER_EXPRESS_LANE", "true").lower() not in (
            "0",
            "false",
        )
        deadline = time.monotonic() + 30
        while await redis.zcard("pb:workers") < before + n * (2 if express else 1):
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not start")
            await asyncio.sleep(0.05)
        return procs

    async def stop_workers(self, redis: Redis, procs: Sequence[subprocess.Popen[bytes]]) -> None:
        """SIGTERM and wait (they release what they hold)."""
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=30)

    def stop(self) -> None:
        """Stop every process (``stop_processes``: workers first; SIGKILL after 20 s), then Redis."""
        stop_processes(self.procs, timeout=20)
        self.redis_server.stop()

    async def sandbox_counts(self) -> dict[str, dict[str, int]]:
        """Requests answered by the sandbox so far: operation → status → count."""
        async with httpx.AsyncClient(base_url=self.sandbox_url) as c:
            doc = (await c.get("/_sandbox/requests", params={"limit": 0})).json()
        return {op: {s: int(n) for s, n in by.items()} for op, by in doc["counts"].items()}


def print_results(result: dict[str, Any], figures: dict[str, Any], started: float) -> None:
    """A benchmark's closing lines: the machine, every detail, the time taken, then the one line of JSON."""
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"details: {json.dumps(result)}")
    print(f"total time: {time.monotonic() - started:.0f} s")
    print(json.dumps(figures))


async def wait_http(url: str, within_s: float = 30) -> None:
    """Wait until ``url`` answers below 500."""
    deadline = time.monotonic() + within_s
    async with httpx.AsyncClient() as c:
        while True:
            try:
                if (await c.get(url)).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up")
            await asyncio.sleep(0.1)


async def setup_accounts(stack: Stack, redis: Redis, accounts: Sequence[str]) -> None:
    """Register and provision each account (its own sandbox Klaviyo account, in the sandbox that serves it)."""
    store = stack.account_store(redis)
    settings = Settings(
        redis_url=stack.redis_url,
        klaviyo_base_url=stack.sandbox_url,
        klaviyo_rate_scale=stack.rate_scale,
        log_level="warning",
    )
    async with KlaviyoClient.from_settings(settings, redis, store) as client:
        for account_id in accounts:
            account = Account(
                account_id=account_id,
                klaviyo_base_url=stack.account_urls.get(account_id),
                secrets=AccountSecrets.model_validate({"klaviyo_api_key": klaviyo_key(account_id)}),
            )
            await store.put(account)
            await provision(client, redis, account)


BASE_TIME = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)


def event_doc(i: int, serial: int, kind: str = "updated") -> dict[str, Any]:
    """A realistic events-API item: email, phone, five properties (as ``bench/pipeline.py``)."""
    return {
        "event_id": f"evt-{i}",
        "kind": kind,
        "serial_number": f"SER{serial:08d}",
        "pass_type": "ptk_0x216",
        "platform": "apple" if i % 2 == 0 else "google",
        "email": f"holder{serial}@example.com",
        # Unique per serial (below 8M serials): every pass is its own profile, no identity conflicts.
        "phone_number": f"+1415{200 + (serial // 10000) % 800:03d}{serial % 10000:04d}",
        "occurred_at": (BASE_TIME + timedelta(milliseconds=i)).isoformat(),
        "properties": {
            "points": i * 10,
            "tier": "gold",
            "member_since": "2024-03-01",
            "store": "SF-01",
            "opt_in": True,
        },
    }


def build(account_id: str, doc: dict[str, Any]) -> PassEvent:
    """The canonical event the producer would enqueue for ``doc``."""
    return build_event(
        EventIn.model_validate(doc),
        account_id=account_id,
        source="api",
        received_at=datetime.now(UTC),
        default_region="US",
        pass_url_template="https://passninja.com/p/{serial_number}",
    )


def backlog(
    account_id: str, events: int, serials: int, *, seed: int = 1, first_id: int = 0
) -> list[PassEvent]:
    """``events`` realistic events over ``serials`` serials (each serial at least once, the first event of a
    serial a ``created``), in time order."""
    rng = random.Random(seed)
    order = list(range(serials)) + [rng.randrange(serials) for _ in range(events - serials)]
    rng.shuffle(order)
    seen: set[int] = set()
    out = []
    for n, serial in enumerate(order):
        kind = "updated" if serial in seen else "created"
        seen.add(serial)
        out.append(build(account_id, event_doc(first_id + n, serial, kind)))
    return out


async def put(redis: Redis, account_id: str, events: Sequence[PassEvent], chunk: int = 1000) -> None:
    """Enqueue through ``enqueue.lua`` in chunks (what the producer does per request)."""
    for i in range(0, len(events), chunk):
        await enqueue(
            redis,
            account_id,
            events[i : i + chunk],
            high_water=10_000_000,
            dedup_window_s=86_400,
        )


def log_summary(workdir: Path) -> dict[str, Any]:
    """What the worker logs of a run say: lines per event name, and retries/failures by endpoint and code."""
    events: dict[str, int] = {}
    why: dict[str, int] = {}
    for path in sorted(workdir.glob("worker-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                doc = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            name = str(doc.get("event"))
            events[name] = events.get(name, 0) + 1
            if name in ("event_retry_scheduled", "klaviyo_call_failed", "event_throttled", "batch_failed"):
                key = f"{name} {doc.get('endpoint')} {doc.get('status')} {doc.get('code')} {doc.get('error')}"
                why[key] = why.get(key, 0) + 1
    return {"events": events, "failures": why}


async def worker_stats(redis: Redis) -> dict[str, int]:
    """The engine counters of every live worker, summed (from their heartbeats)."""
    out: dict[str, int] = {}
    for raw in (await redis.hgetall(WORKERS_INFO)).values():
        info = orjson.loads(raw)
        info.update({f"sync_{k}": v for k, v in (info.pop("sync", None) or {}).items()})
        for k, v in info.items():
            if not isinstance(v, int) or isinstance(v, bool):
                continue
            if k in ("loop_lag_ms", "loop_lag_max_ms"):
                out[k] = max(out.get(k, 0), v)
            elif k not in ("pid", "started_ms", "beat_ms", "held", "max_serials"):
                out[k] = out.get(k, 0) + v
    return out


async def purge_account(redis: Redis, account_id: str) -> None:
    """Delete whatever the account still has queued, leased or scheduled (its keys and its place in
    ``pb:active``), so that a later phase of a benchmark does not drain it."""
    keys = account_keys(account_id)
    batch = []
    async for key in redis.scan_iter(match=keys.base + ":*", count=1000):
        if not key.endswith(b":cfg") and not key.endswith(b":klaviyo"):
            batch.append(key)
        if len(batch) >= 1000:
            await redis.delete(*batch)
            batch = []
    if batch:
        await redis.delete(*batch)
    await redis.zrem(ACTIVE_ACCOUNTS, account_id)


async def depth(redis: Redis, account_id: str) -> int:
    """Pending events of an account."""
    return int(await redis.get(account_keys(account_id).depth) or 0)


async def pending(redis: Redis, account_ids: Sequence[str]) -> int:
    """Pending events plus leased serials over the accounts (0 = drained)."""
    total = 0
    for account_id in account_ids:
        total += await depth(redis, account_id) + await redis.zcard(account_keys(account_id).leased)
    return total


async def latencies_ms(redis: Redis, account_id: str, events: Sequence[PassEvent]) -> list[int]:
    """Per event: its "written" history time minus its "ingested" one (events not yet written are left out)."""
    marks: dict[str, dict[str, int]] = {}
    for serial in {e.serial_number for e in events}:
        for h in await history.timeline(redis, account_id, serial):
            marks.setdefault(h.event_id, {})[h.kind] = h.at_ms
    out = []
    for e in events:
        m = marks.get(e.event_id, {})
        if "ingested" in m and "written" in m:
            out.append(m["written"] - m["ingested"])
    return sorted(out)


async def written_by_lane(redis: Redis, account_id: str, events: Sequence[PassEvent]) -> dict[str, int]:
    """How many of ``events`` each kind of worker lane wrote (``main``/``express``; ``gone`` for a worker
    no longer registered), from the "written" history entries and the workers' heartbeats."""
    lanes = {
        k.decode(): orjson.loads(v).get("lane", "main")
        for k, v in (await redis.hgetall(WORKERS_INFO)).items()
    }
    ids = {e.event_id for e in events}
    out: dict[str, int] = {}
    for serial in {e.serial_number for e in events}:
        for h in await history.timeline(redis, account_id, serial):
            if h.kind == "written" and h.event_id in ids:
                lane = lanes.get(str(h.detail.get("worker", "")), "gone")
                out[lane] = out.get(lane, 0) + 1
    return out


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of sorted ``values``."""
    if not values:
        return float("nan")
    return float(values[min(len(values) - 1, int(len(values) * q))])


def summary(values: Sequence[float]) -> dict[str, float]:
    """p50 / p99 / max of sorted ``values``."""
    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values), 1) if values else float("nan"),
        "p99_ms": round(pct(values, 0.99), 1),
        "max_ms": round(values[-1], 1) if values else float("nan"),
    }


async def trickle(
    redis: Redis, account_id: str, rate_per_s: float, seconds: float, *, first_id: int, serial_base: int
) -> list[PassEvent]:
    """Enqueue one event at a time at a steady ``rate_per_s`` (each a fresh serial); returns them."""
    sent: list[PassEvent] = []
    start = time.monotonic()
    n = int(rate_per_s * seconds)
    for i in range(n):
        delay = start + i / rate_per_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        ev = build(account_id, event_doc(first_id + i, serial_base + i, "created"))
        await put(redis, account_id, [ev])
        sent.append(ev)
    return sent


def add_worker_env_option(parser: argparse.ArgumentParser) -> None:
    """``--worker-env NAME=VALUE`` (repeatable): PASSBRIDGE_* settings for the benchmark's workers, to compare
    settings side by side; ``args.worker_env`` holds the pairs."""
    parser.add_argument(
        "--worker-env",
        action="append",
        default=[],
        type=_worker_setting,
        metavar="NAME=VALUE",
        help="a setting for the workers (repeatable), e.g. PASSBRIDGE_KLAVIYO_BACKLOG_PACING=false",
    )


def _worker_setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.startswith("PASSBRIDGE_"):
        raise argparse.ArgumentTypeError(f"expected PASSBRIDGE_NAME=VALUE, got {text!r}")
    return name, value
