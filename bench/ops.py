"""What operations cost the pipeline: the instrumentation hooks on the hot paths, and one /metrics scrape.

    python bench/ops.py [--events 1500] [--accounts 100] [--serials 20]

1. **The pipeline's own cost per event**, in this run: ``bench/pipeline.py``'s set-up (embedded Redis with AOF,
   the sandbox with limits off, ``passbridge producer``, here one ``passbridge worker``) takes ``--events``
   events over the events API (batches of 100, 4 in flight); the producer's and the worker's CPU time
   (``/proc/<pid>/stat``) per event.
2. **The hooks' cost per event**, in this process: the producer's ``metrics.events_ingested`` (counters, the
   recorder's buffer, the report tally) per event of a 100-event request, and the worker's
   ``metrics.events_written`` (counter, recorder, latency histogram: one JSON parse) plus three
   ``klaviyo_response`` (one per Klaviyo call of an event). Their share of (1) is the overhead.
3. **Recorder flush**: one flush after activity in ``--accounts`` accounts (one pipelined round trip).
4. **Scrape**: ``worker.exporter.render`` (every gauge read from Redis through ``worker.inspect``) with
   ``--accounts`` accounts each holding ``--serials`` queued serials of 2 events; median of 10 scrapes.

The last line of output is one JSON object with the figures and the targets checked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cryptography.fernet import Fernet, MultiFernet  # noqa: E402
from redis.asyncio import Redis  # noqa: E402

from passbridge import metrics  # noqa: E402
from passbridge.accounts import Account, AccountStore  # noqa: E402
from passbridge.event import PassEvent  # noqa: E402
from passbridge.queue import enqueue  # noqa: E402
from passbridge.redis_server import start_redis  # noqa: E402
from worker import exporter  # noqa: E402

#: Targets: the hooks under 5 % of the producer's and 2 % of the worker's CPU per event, a scrape of 100 accounts
#: under half a second.
TARGET_PRODUCER_RATIO = 0.05
TARGET_WORKER_RATIO = 0.02
TARGET_SCRAPE_MS = 500.0


def make_events(account_id: str, n: int, serials: int, start: int = 0) -> list[PassEvent]:
    now = datetime.now(UTC)
    return [
        PassEvent.model_validate(
            {
                "event_id": f"{account_id}-{start + i}",
                "account_id": account_id,
                "kind": ("created", "installed", "updated")[i % 3],
                "serial_number": f"S{i % serials}",
                "pass_type": "loyalty" if i % 2 else "coupon",
                "platform": "apple" if i % 3 else "google",
                "occurred_at": now,
                "received_at": now,
                "source": "api",
                "pass_url": f"https://passninja.com/p/S{i % serials}",
                "email": f"holder{i}@example.com",
                "phone_number": "+14155550123",
                "properties": {
                    "points": i,
                    "tier": "gold",
                    "member_since": "2024-03-01",
                    "city": "Oslo",
                    "n": 5,
                },
            }
        )
        for i in range(n)
    ]


def per_event_us(fn: object, events: int, rounds: int) -> float:
    """Median µs per event of ``rounds`` calls of ``fn`` (each handling ``events`` events)."""
    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        samples.append((time.perf_counter() - t) / events * 1e6)
    return statistics.median(samples)


async def pipeline_cpu(events: int) -> dict[str, float]:
    """Producer and worker CPU per event for ``events`` events through the real pipeline (one worker)."""
    import pipeline as pl  # bench/pipeline.py: the same set-up as the pipeline benchmark

    workdir = Path(tempfile.mkdtemp(prefix="bench-ops-pipeline-"))
    stack = pl.Stack(workdir)
    redis = Redis.from_url(stack.redis_url)
    try:
        port = stack.sandbox_url.rsplit(":", 1)[1]
        stack.spawn("sandbox", "sandbox", "--port", port, "--api-key", pl.KLAVIYO_KEY, "--unlimited")
        await pl.wait_http(f"{stack.sandbox_url}/_sandbox/health")
        await pl.setup_account(stack, redis)
        producer = stack.spawn("producer", "producer", "--port", stack.producer_url.rsplit(":", 1)[1])
        await pl.wait_http(f"{stack.producer_url}/healthz")
        worker = stack.spawn("worker-1", "worker")
        for _ in range(300):  # the worker's first heartbeat
            if await redis.zcard("pb:workers"):
                break
            await asyncio.sleep(0.1)
        producer_cpu0 = pl.cpu_s(producer.pid)
        run = await pl.throughput(stack, redis, [worker.pid], events)
        producer_cpu = pl.cpu_s(producer.pid) - producer_cpu0
    finally:
        await redis.aclose()
        stack.stop()
    return {
        "producer_cpu_us_per_event": producer_cpu * 1e6 / events,
        "worker_cpu_us_per_event": run["worker_cpu_ms_per_event"] * 1000,
        "events_per_s": run["events_per_s"],
    }


async def main(events: int, accounts: int, serials: int) -> dict[str, object]:
    print("pipeline CPU per event ...", file=sys.stderr)
    base = await pipeline_cpu(events)
    tmp = Path(tempfile.mkdtemp(prefix="bench-ops-"))
    server = start_redis(tmp / "redis", appendonly=True)
    redis = Redis.from_url(server.url)
    try:
        batch = make_events("bench", 100, 40)
        flags = [True] * len(batch)
        ingest_hook_us = per_event_us(lambda: metrics.events_ingested("bench", batch, flags), len(batch), 300)
        members = [b"%012x" % i + e.to_wire() for i, e in enumerate(batch)]

        def worker_hooks() -> None:
            metrics.events_written("bench", members)
            for _ in members:
                metrics.klaviyo_response("bench", "create_or_update_profile", 202)
                metrics.klaviyo_response("bench", "create_event", 202)
                metrics.klaviyo_response("bench", "create_data_source_record", 202)

        worker_hook_us = per_event_us(worker_hooks, len(members), 300)

        store = AccountStore(redis, MultiFernet([Fernet(Fernet.generate_key())]))
        for a in range(accounts):
            account_id = f"acct{a:04d}"
            await store.put(Account(account_id=account_id))
            await enqueue(
                redis,
                account_id,
                make_events(account_id, serials * 2, serials),
                high_water=10**9,
                dedup_window_s=3600,
            )
            metrics.RECORDER.count(account_id, "in", serials * 2)
            metrics.RECORDER.count(account_id, "out", serials)
        t = time.perf_counter()
        await metrics.RECORDER.flush(redis)
        flush_ms = (time.perf_counter() - t) * 1000
        scrapes = []
        for _ in range(10):
            t = time.perf_counter()
            body = await exporter.render(redis)
            scrapes.append((time.perf_counter() - t) * 1000)
        assert b'passbridge_queue_depth{account="acct0000"}' in body
        scrape_ms = statistics.median(scrapes)
    finally:
        await redis.aclose()
        server.stop()

    producer_ratio = ingest_hook_us / base["producer_cpu_us_per_event"]
    worker_ratio = worker_hook_us / base["worker_cpu_us_per_event"]
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(
        f"producer: {base['producer_cpu_us_per_event']:.0f} µs CPU/event, ingest hook "
        f"{ingest_hook_us:.2f} µs/event ({producer_ratio:.2%})"
    )
    print(
        f"worker: {base['worker_cpu_us_per_event']:.0f} µs CPU/event, hooks {worker_hook_us:.2f} µs/event "
        f"({worker_ratio:.2%})"
    )
    print(f"flush of {accounts} accounts' activity: {flush_ms:.1f} ms")
    print(f"scrape with {accounts} accounts × {serials} queued serials: median {scrape_ms:.1f} ms")
    return {
        "events": events,
        "pipeline_events_per_s": round(base["events_per_s"], 1),
        "producer_cpu_us_per_event": round(base["producer_cpu_us_per_event"], 1),
        "ingest_hook_us_per_event": round(ingest_hook_us, 2),
        "producer_hook_share": round(producer_ratio, 4),
        "target_producer_hook_share": TARGET_PRODUCER_RATIO,
        "worker_cpu_us_per_event": round(base["worker_cpu_us_per_event"], 1),
        "worker_hooks_us_per_event": round(worker_hook_us, 2),
        "worker_hook_share": round(worker_ratio, 4),
        "target_worker_hook_share": TARGET_WORKER_RATIO,
        "flush_ms": round(flush_ms, 1),
        "accounts": accounts,
        "scrape_ms": round(scrape_ms, 1),
        "target_scrape_ms": TARGET_SCRAPE_MS,
        "ok": producer_ratio <= TARGET_PRODUCER_RATIO
        and worker_ratio <= TARGET_WORKER_RATIO
        and scrape_ms <= TARGET_SCRAPE_MS,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1500)
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--serials", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.events, args.accounts, args.serials))))
