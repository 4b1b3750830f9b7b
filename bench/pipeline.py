"""Benchmark the whole pipeline: producer → Redis → 2 worker processes → Klaviyo sandbox.

    python bench/pipeline.py [--throughput-events 6000] [--latency-seconds 15] [--memory-events 100000]

Everything runs on this machine as separate processes: an embedded Redis (AOF on, as in production), the
sandbox (``passbridge sandbox --unlimited``: Klaviyo's limits off), the producer (``passbridge producer``)
and two ``passbridge worker`` processes with the default settings (``max_jobs`` 64, ``poll_delay`` 0.5 s,
lease TTL 10 s). The workers' own limiter runs on a clock 1000× faster so it does not bind either.

1. **Throughput**: events posted to the producer's events API (batches of 100, 4 concurrent requests, serials
   repeating 2.5 times on average) as fast as it takes them; events/s from the first request until the last
   event is written to the sandbox.
2. **CPU per event**: the two workers' CPU time (``/proc/<pid>/stat``) during (1) per delivered event, beside
   arq's own CPU time per no-op job, measured in this run with an arq worker with the same ``max_jobs`` and
   ``poll_delay`` draining no-op jobs enqueued while it runs.
3. **Latency** at a steady 100 events/s (one event per request every 10 ms): per event, the time from its
   "ingested" history step (its receipt, derived from the mailbox entry and stored by the settle step)
   to its "written" entry (recorded by the worker right after Klaviyo's 2xx for the event's last write, in the
   settle step); p50 and p99.
4. **Takeover**: the sandbox slowed (200 ms per call) so both workers hold leases; one worker is SIGKILLed and
   the time until every serial it held is leased by the other worker (or done) is measured.
5. **Memory per queued event**: 100,000 realistic events (email, phone, five properties) over 40,000 serials
   enqueued through the producer's enqueue script into a fresh Redis of the same configuration; ``used_memory``
   growth per event, counting mailbox entries, dedup index, ready set and scheduling index, with the per-event
   history lists (not part of the queue) measured separately and left out of the figure.

The last line of output is one JSON object with the figures and the targets checked.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from redis.asyncio import Redis  # noqa: E402

from bench import harness  # noqa: E402
from bench.harness import print_results, wait_http  # noqa: E402
from passbridge.accounts import Account, AccountSecrets, hash_token  # noqa: E402
from passbridge.event import EventIn, build_event  # noqa: E402
from passbridge.keys import account_keys  # noqa: E402
from passbridge.queue import enqueue  # noqa: E402
from passbridge.redis_server import free_port, start_redis  # noqa: E402
from passbridge.settings import Settings  # noqa: E402
from worker import history  # noqa: E402
from worker.klaviyo.client import KlaviyoClient  # noqa: E402
from worker.setup import provision  # noqa: E402

ACCOUNT = "bench"
INGEST_TOKEN = "pbi_bench_token"
KLAVIYO_KEY = harness.klaviyo_key(ACCOUNT)
MAX_JOBS = 64
POLL_DELAY_S = 0.5
LEASE_TTL_S = 10.0
TARGET_P99_MS = 300.0
TARGET_BYTES_PER_EVENT = 600.0
TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def event_doc(i: int, serial: int) -> dict[str, Any]:
    """``harness.event_doc`` with every fifth event a ``created``: unique email and phone per serial, so no
    two passes claim one identifier (a conflict would add Klaviyo calls to the measured path)."""
    return harness.event_doc(i, serial, kind="updated" if i % 5 else "created")


class Stack(harness.Stack):
    """The processes of one run: ``bench/harness.py``'s stack plus the producer, the workers' limiter on a clock
    1000× faster and the worker settings this benchmark states."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(
            workdir,
            1000,
            PASSBRIDGE_WORKER_MAX_JOBS=str(MAX_JOBS),
            PASSBRIDGE_WORKER_POLL_DELAY_S=str(POLL_DELAY_S),
            PASSBRIDGE_WORKER_LEASE_TTL_S=str(LEASE_TTL_S),
        )
        self.producer_url = f"http://127.0.0.1:{free_port()}"


async def setup_account(stack: Stack, redis: Redis) -> None:
    store = stack.account_store(redis)
    account = Account(
        account_id=ACCOUNT,
        ingest_token_sha256=hash_token(INGEST_TOKEN),
        secrets=AccountSecrets.model_validate({"klaviyo_api_key": KLAVIYO_KEY}),
    )
    await store.put(account)
    settings = Settings(
        redis_url=stack.redis_url,
        klaviyo_base_url=stack.sandbox_url,
        klaviyo_rate_scale=1000,
        log_level="warning",
    )
    async with KlaviyoClient.from_settings(settings, redis, store) as client:
        await provision(client, redis, account)


async def depth(redis: Redis) -> int:
    return int(await redis.get(account_keys(ACCOUNT).depth) or 0)


async def wait_drained(redis: Redis, within_s: float = 240) -> float:
    """Wait until nothing is pending or leased; returns when that was observed (monotonic)."""
    keys = account_keys(ACCOUNT)
    deadline = time.monotonic() + within_s
    while await depth(redis) or await redis.zcard(keys.leased):
        if time.monotonic() > deadline:
            raise RuntimeError("the queue did not drain")
        await asyncio.sleep(0.02)
    return time.monotonic()


async def post(http: httpx.AsyncClient, url: str, items: list[dict[str, Any]]) -> None:
    r = await http.post(url, content=orjson.dumps(items), headers={"authorization": f"Bearer {INGEST_TOKEN}"})
    if r.status_code != 202 and r.status_code != 200:
        raise RuntimeError(f"producer answered {r.status_code}: {r.text[:300]}")


async def throughput(stack: Stack, redis: Redis, workers: list[int], n: int) -> dict[str, float]:
    """Phase 1 and 2: as fast as possible; events/s and worker CPU per event."""
    url = f"{stack.producer_url}/v1/accounts/{ACCOUNT}/events"
    serials = max(1, int(n / 2.5))
    rng = random.Random(1)
    docs = [event_doc(i, rng.randrange(serials)) for i in range(n)]
    batches = [docs[i : i + 100] for i in range(0, n, 100)]
    cpu0 = sum(cpu_s(p) for p in workers)
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=4)) as http:
        sem = asyncio.Semaphore(4)

        async def send(batch: list[dict[str, Any]]) -> None:
            async with sem:
                await post(http, url, batch)

        await asyncio.gather(*(send(b) for b in batches))
    posted = time.monotonic()
    done = await wait_drained(redis)
    cpu = sum(cpu_s(p) for p in workers) - cpu0
    return {
        "events": n,
        "events_per_s": n / (done - started),
        "ingest_s": posted - started,
        "worker_cpu_ms_per_event": cpu * 1000 / n,
    }


async def latency(stack: Stack, redis: Redis, seconds: float, offset: int) -> dict[str, float]:
    """Phase 3: a steady 100 events/s, one event per request."""
    url = f"{stack.producer_url}/v1/accounts/{ACCOUNT}/events"
    n = int(seconds * 100)
    serial_pool = 500
    ids = []
    async with httpx.AsyncClient(timeout=30) as http:
        start = time.monotonic()
        tasks = []
        for i in range(n):
            due = start + i / 100
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            doc = event_doc(offset + i, 1_000_000 + i % serial_pool)
            ids.append((doc["event_id"], doc["serial_number"]))
            tasks.append(asyncio.create_task(post(http, url, [doc])))
        await asyncio.gather(*tasks)
    await wait_drained(redis)
    by_serial: dict[str, dict[str, dict[str, int]]] = {}
    for serial in {s for _, s in ids}:
        marks: dict[str, dict[str, int]] = {}
        for h in await history.timeline(redis, ACCOUNT, serial):
            marks.setdefault(h.event_id, {})[h.kind] = h.at_ms
        by_serial[serial] = marks
    lat = []
    for event_id, serial in ids:
        m = by_serial[serial].get(event_id, {})
        if "ingested" in m and "written" in m:
            lat.append(m["written"] - m["ingested"])
    lat.sort()
    return {
        "events": n,
        "measured": len(lat),
        "p50_ms": statistics.median(lat),
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "max_ms": lat[-1],
    }


async def takeover(
    stack: Stack, redis: Redis, workers: list[subprocess.Popen[bytes]], offset: int
) -> dict[str, float]:
    """Phase 4: SIGKILL a worker holding leases; time until the other one holds its serials."""
    async with httpx.AsyncClient() as c:
        await c.put(f"{stack.sandbox_url}/_sandbox/faults", json={"latency_ms": 200})
    keys = account_keys(ACCOUNT)
    docs = [event_doc(offset + i, 2_000_000 + i % 200) for i in range(800)]
    async with httpx.AsyncClient(timeout=30) as http:
        for i in range(0, len(docs), 100):
            await post(http, f"{stack.producer_url}/v1/accounts/{ACCOUNT}/events", docs[i : i + 100])
    victim, rescuer = workers
    mark = f":{victim.pid}:"

    async def tokens() -> dict[str, str]:
        return {s.decode(): t.decode() for s, t in (await redis.hgetall(keys.lease_tokens)).items()}

    deadline = time.monotonic() + 30
    while sum(mark in t for t in (await tokens()).values()) < 10:
        if time.monotonic() > deadline:
            raise RuntimeError("the victim never held 10 serials")
        await asyncio.sleep(0.05)
    held = {s for s, t in (await tokens()).items() if mark in t}
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed = time.monotonic()
    rescue = f":{rescuer.pid}:"
    while True:
        now_tokens = await tokens()
        pending = [
            s
            for s in held
            if mark in now_tokens.get(s, "")
            or (rescue not in now_tokens.get(s, "") and await redis.exists(keys.mailbox(s)))
        ]
        if not pending:
            break
        if time.monotonic() - killed > 60:
            raise RuntimeError("serials were not taken over")
        await asyncio.sleep(0.01)
    took = time.monotonic() - killed
    async with httpx.AsyncClient() as c:
        await c.delete(f"{stack.sandbox_url}/_sandbox/faults")
    await wait_drained(redis)
    return {"serials": len(held), "takeover_s": took}


async def arq_noop(redis_url: str, jobs: int) -> dict[str, float]:
    """arq's own cost per no-op job, same max_jobs and poll_delay as passbridge's workers."""
    from arq import create_pool
    from arq.connections import RedisSettings

    proc = spawn_arq_noop_worker(redis_url)
    pool = await create_pool(RedisSettings.from_dsn(redis_url), default_queue_name="bench:arq")
    try:
        deadline = time.monotonic() + 30
        while not await pool.exists("bench:arq:health-check"):
            if time.monotonic() > deadline:
                raise RuntimeError("arq worker did not start")
            await asyncio.sleep(0.05)
        cpu0 = cpu_s(proc.pid)
        started = time.monotonic()
        for i in range(jobs):
            await pool.enqueue_job("noop", _job_id=f"noop-{i}")
        while await pool.zcard("bench:arq"):  # noqa: ASYNC110 - polling Redis, not a local condition
            await asyncio.sleep(0.02)
        elapsed = time.monotonic() - started
        cpu = cpu_s(proc.pid) - cpu0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        await pool.aclose()
    return {"jobs": jobs, "cpu_ms_per_job": cpu * 1000 / jobs, "jobs_per_s": jobs / elapsed}


def spawn_arq_noop_worker(redis_url: str) -> subprocess.Popen[bytes]:
    """This script again, as an arq worker for the no-op job (see ``run_arq_noop_worker``)."""
    return subprocess.Popen(
        [sys.executable, __file__, "--arq-noop-worker", redis_url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def run_arq_noop_worker(redis_url: str) -> None:
    from arq.connections import RedisSettings
    from arq.worker import run_worker

    async def noop(ctx: dict[str, Any]) -> None:
        return None

    run_worker(
        {
            "functions": [noop],
            "redis_settings": RedisSettings.from_dsn(redis_url),
            "queue_name": "bench:arq",
            "max_jobs": MAX_JOBS,
            "poll_delay": POLL_DELAY_S,
            "keep_result": 0,
            "health_check_interval": 1,
        }
    )


async def memory(workdir: Path, n: int, serials: int) -> dict[str, float]:
    """Phase 5: bytes per queued event in a fresh Redis (history measured apart and excluded)."""
    server = start_redis(workdir / "redis-mem", appendonly=False)
    redis = Redis.from_url(server.url)
    try:
        await redis.set("warm", 1)
        base = int((await redis.info("memory"))["used_memory"])
        rng = random.Random(2)
        received = time.time()
        from datetime import UTC, datetime

        now = datetime.fromtimestamp(received, UTC)
        events = []
        for i in range(n):
            item = EventIn.model_validate(event_doc(i, rng.randrange(serials)))
            events.append(
                build_event(
                    item,
                    account_id=ACCOUNT,
                    source="api",
                    received_at=now,
                    default_region="US",
                    pass_url_template="https://passninja.com/p/{serial_number}",
                )
            )
        for i in range(0, n, 1000):
            await enqueue(
                redis, ACCOUNT, events[i : i + 1000], high_water=10_000_000, dedup_window_s=7 * 86400
            )
        used = int((await redis.info("memory"))["used_memory"]) - base
        hist = 0
        keys = account_keys(ACCOUNT)
        async for key in redis.scan_iter(match=keys.history_prefix + "*", count=1000):
            hist += int(await redis.memory_usage(key, samples=0) or 0)
        mailboxes = await redis.dbsize()
    finally:
        await redis.aclose()
        server.stop()
    return {
        "events": n,
        "serials": serials,
        "keys": mailboxes,
        "bytes_per_event": (used - hist) / n,
        "history_bytes_per_event": hist / n,
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="pb-bench-"))
    stack = Stack(workdir)
    redis = Redis.from_url(stack.redis_url)
    out: dict[str, Any] = {}
    try:
        await stack.start_sandbox([ACCOUNT], "--unlimited")
        await setup_account(stack, redis)
        stack.spawn("producer", "producer", "--port", stack.producer_url.rsplit(":", 1)[1])
        await wait_http(f"{stack.producer_url}/healthz")

        print("arq no-op baseline ...", file=sys.stderr)
        out["arq"] = await arq_noop(stack.redis_url, args.arq_jobs)
        print(f"  {out['arq']}", file=sys.stderr)

        workers = await stack.start_workers(redis, 2)

        print("throughput ...", file=sys.stderr)
        out["throughput"] = await throughput(stack, redis, [w.pid for w in workers], args.throughput_events)
        print(f"  {out['throughput']}", file=sys.stderr)
        print("latency at 100 events/s ...", file=sys.stderr)
        out["latency"] = await latency(stack, redis, args.latency_seconds, 10_000_000)
        print(f"  {out['latency']}", file=sys.stderr)
        print("takeover after SIGKILL ...", file=sys.stderr)
        out["takeover"] = await takeover(stack, redis, workers, 20_000_000)
        print(f"  {out['takeover']}", file=sys.stderr)
    finally:
        await redis.aclose()
        stack.stop()
    print("memory per queued event ...", file=sys.stderr)
    out["memory"] = await memory(workdir, args.memory_events, args.memory_serials)
    print(f"  {out['memory']}", file=sys.stderr)
    return out


def report(out: dict[str, Any]) -> dict[str, Any]:
    t, lat, mem, to, arq = out["throughput"], out["latency"], out["memory"], out["takeover"], out["arq"]
    figures = {
        "events_per_s": round(t["events_per_s"], 1),
        "worker_cpu_ms_per_event": round(t["worker_cpu_ms_per_event"], 3),
        "arq_cpu_ms_per_noop_job": round(arq["cpu_ms_per_job"], 3),
        "latency_p50_ms": round(lat["p50_ms"], 1),
        "latency_p99_ms": round(lat["p99_ms"], 1),
        "target_latency_p99_ms": TARGET_P99_MS,
        "memory_bytes_per_event": round(mem["bytes_per_event"], 1),
        "target_memory_bytes_per_event": TARGET_BYTES_PER_EVENT,
        "history_bytes_per_event": round(mem["history_bytes_per_event"], 1),
        "takeover_s": round(to["takeover_s"], 2),
        "lease_ttl_s": LEASE_TTL_S,
        "target_takeover_s": LEASE_TTL_S + 1,
    }
    figures["ok"] = (
        figures["latency_p99_ms"] <= TARGET_P99_MS
        and figures["memory_bytes_per_event"] <= TARGET_BYTES_PER_EVENT
        and figures["takeover_s"] <= LEASE_TTL_S + 1
    )
    return figures


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--arq-noop-worker":
        run_arq_noop_worker(sys.argv[2])
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--throughput-events", type=int, default=6000)
    parser.add_argument("--latency-seconds", type=float, default=15.0)
    parser.add_argument("--memory-events", type=int, default=100_000)
    parser.add_argument("--memory-serials", type=int, default=40_000)
    parser.add_argument("--arq-jobs", type=int, default=3000)
    ns = parser.parse_args()
    t0 = time.monotonic()
    result = asyncio.run(main(ns))
    figures = report(result)
    print_results(result, figures, t0)
