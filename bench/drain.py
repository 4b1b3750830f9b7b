"""Drain a backlog at Klaviyo's limits: bulk endpoints, coalescing and both budgets vs one call per operation.

    python bench/drain.py [--rate-scale 5] [--five-rate-scale 1] [--events 100000] [--serials 40000]
                          [--worker-env PASSBRIDGE_NAME=VALUE ...]

Everything runs on this machine as separate processes (``bench/harness.py``): an embedded Redis with AOF, the
Klaviyo sandbox with Klaviyo's real rate tiers on a clock ``--rate-scale`` times faster (``passbridge sandbox
--rate-scale``) and two ``passbridge worker`` processes with the same factor in ``PASSBRIDGE_KLAVIYO_RATE_SCALE``
and otherwise default settings (``PASSBRIDGE_WORKER_SYNC_MODE=adaptive``, ``max_jobs`` 64, ``poll_delay``
0.5 s). Backlogs are realistic events (email, phone, five properties; ``bench/harness.py``) enqueued through
the producer's ``enqueue.lua`` before the workers start; a drain is timed from the first serial leased to
the last event written (worker start-up is left out).

1. **arq baseline**: arq's CPU per no-op job with the same ``max_jobs`` and ``poll_delay`` (``bench/pipeline.py``).
2. **One call per operation** (``PASSBRIDGE_WORKER_SYNC_MODE=single``) on a sample of the same backlog (the
   first ``--single-events`` events of the generator, in an account of its own), run for exactly two Klaviyo
   minutes (2 × 60 / scale s, so each rate-limit window is counted once): events written per second.
3. **One account**, ``--events`` over ``--serials`` serials, adaptive mode: events/s ÷ the ceiling the tiers
   allow for that backlog (:func:`worker.batching.drain_ceiling`: every event a metric event, every serial
   one profile and one record write, each kind spending its single and bulk budgets); ÷ the single-call rate
   of (2); share of requests the sandbox answered 429; the workers' CPU per delivered event ÷ arq's per no-op
   job; and, while it drains, one fresh event every ``1 / --probe-rate`` s for the same account (a new serial)
   whose ingest-to-Klaviyo latency (``ingested`` → ``written`` history entries) is reported as p50/p99.
4. **Five accounts**, ``--events / 5`` over ``--serials / 5`` each, drained at once on a clock
   ``--five-rate-scale`` times faster (five accounts spend five budgets: the same machine drains them at a
   lower scale), vs five times the per-account ceiling.

The last line of output is one JSON object with the figures and the targets checked.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from redis.asyncio import Redis

from bench.harness import (
    Stack,
    add_worker_env_option,
    backlog,
    cpu_s,
    latencies_ms,
    log_summary,
    pending,
    print_results,
    purge_account,
    put,
    setup_accounts,
    summary,
    trickle,
    worker_stats,
)
from bench.pipeline import arq_noop
from passbridge.event import PassEvent
from passbridge.keys import account_keys
from worker.batching import drain_ceiling

TARGET_CEILING = 0.9
TARGET_VS_SINGLE = 10.0
TARGET_429 = 0.01
TARGET_CPU_VS_ARQ = 1.0


async def first_lease(redis: Redis, accounts: list[str], within_s: float = 60) -> float:
    """Wait until a serial of one of ``accounts`` is leased; returns that moment (monotonic)."""
    deadline = time.monotonic() + within_s
    while True:
        for a in accounts:
            if await redis.zcard(account_keys(a).leased):
                return time.monotonic()
        if time.monotonic() > deadline:
            raise RuntimeError("no serial was ever leased")
        await asyncio.sleep(0.005)


def delta(after: dict[str, dict[str, int]], before: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Requests answered between two snapshots of the sandbox's counters."""
    out: dict[str, dict[str, int]] = {}
    for op, by in after.items():
        d = {s: n - before.get(op, {}).get(s, 0) for s, n in by.items()}
        d = {s: n for s, n in d.items() if n}
        if d:
            out[op] = d
    return out


def share_429(counts: dict[str, dict[str, int]]) -> tuple[int, int]:
    """(429 answers, all answers)."""
    total = sum(n for by in counts.values() for n in by.values())
    return sum(by.get("429", 0) for by in counts.values()), total


async def single_phase(stack: Stack, redis: Redis, args: argparse.Namespace) -> dict[str, Any]:
    """One call per operation for exactly two Klaviyo minutes."""
    account = "one-single"
    events = backlog(account, args.events, args.serials)[: args.single_events]
    await put(redis, account, events)
    before = await stack.sandbox_counts()
    workers = await stack.start_workers(redis, 2, PASSBRIDGE_WORKER_SYNC_MODE="single")
    t0 = await first_lease(redis, [account])
    window = 2 * 60 / stack.rate_scale
    await asyncio.sleep(max(0.0, t0 + window - time.monotonic()))
    left = await pending(redis, [account])
    elapsed = time.monotonic() - t0
    await stack.stop_workers(redis, workers)
    written = args.single_events - int(await redis.get(account_keys(account).depth) or 0)
    counts = delta(await stack.sandbox_counts(), before)
    # The rest of the sample must not be drained by the next phase's workers.
    await purge_account(redis, account)
    return {
        "events": args.single_events,
        "written": written,
        "seconds": round(elapsed, 2),
        "events_per_s": written / elapsed,
        "left_pending": left,
        "requests": counts,
    }


async def trace(stack: Stack, t0: float) -> None:
    """``--trace``: the writes per kind each second of the drain (where a drain loses time)."""
    prev = await stack.sandbox_counts()
    while True:
        await asyncio.sleep(1.0)
        now = await stack.sandbox_counts()
        d = delta(now, prev)
        prev = now
        row = {
            op.replace("create_", "").replace("data_source_", "ds_"): sum(by.values()) for op, by in d.items()
        }
        print(f"  t={time.monotonic() - t0:5.1f}s {row}", file=sys.stderr)


async def one_account(stack: Stack, redis: Redis, args: argparse.Namespace) -> dict[str, Any]:
    """The one-account backlog in adaptive mode, with fresh probe events while it drains."""
    account = "one"
    events = backlog(account, args.events, args.serials)
    t = time.monotonic()
    await put(redis, account, events)
    enqueue_s = time.monotonic() - t
    before = await stack.sandbox_counts()
    workers = await stack.start_workers(redis, 2, PASSBRIDGE_LOG_LEVEL="info")
    pids = [w.pid for w in workers]
    t0 = await first_lease(redis, [account])
    cpu0 = {p: cpu_s(p) for p in pids}
    probes: list[PassEvent] = []
    stop = asyncio.Event()

    async def probe() -> None:
        n = 0
        while not stop.is_set():
            probes.extend(
                await trickle(
                    redis, account, args.probe_rate, 1.0, first_id=50_000_000 + n, serial_base=50_000_000 + n
                )
            )
            n += int(args.probe_rate)

    prober = asyncio.create_task(probe())
    tracer = asyncio.create_task(trace(stack, t0)) if args.trace else None
    keys = account_keys(account)
    while True:
        depth = int(await redis.get(keys.depth) or 0)
        if depth <= args.probe_rate * 2 and not stop.is_set():
            stop.set()
            await prober
        if stop.is_set() and not await pending(redis, [account]):
            break
        await asyncio.sleep(0.01)
    elapsed = time.monotonic() - t0
    if tracer is not None:
        tracer.cancel()
    cpu = sum(cpu_s(p) - cpu0[p] for p in pids)
    delivered = args.events + len(probes)
    counts = delta(await stack.sandbox_counts(), before)
    lat = summary(await latencies_ms(redis, account, probes))
    await asyncio.sleep(2.5)  # one more heartbeat with the final counters
    engine = await worker_stats(redis)
    await stack.stop_workers(redis, workers)
    return {
        "events": args.events,
        "serials": args.serials,
        "enqueue_s": round(enqueue_s, 1),
        "drain_s": round(elapsed, 2),
        "events_per_s": args.events / elapsed,
        "probes": len(probes),
        "probe_latency": lat,
        "worker_cpu_ms_per_event": cpu * 1000 / delivered,
        "requests": counts,
        "engine": engine,
        "logs": log_summary(stack.workdir),
    }


async def trace_accounts(redis: Redis, accounts: list[str], t0: float) -> None:
    """``--trace`` in the five-account phase: per account, queued events and serials leased, every 2 s."""
    while True:
        await asyncio.sleep(2.0)
        row = []
        for account in accounts:
            keys = account_keys(account)
            depth = int(await redis.get(keys.depth) or 0)
            row.append(f"{account[-1]}:{depth:>6}/{await redis.zcard(keys.leased):>5}")
        print(f"  t={time.monotonic() - t0:5.1f}s depth/leased " + "  ".join(row), file=sys.stderr)


async def five_accounts(stack: Stack, redis: Redis, args: argparse.Namespace) -> dict[str, Any]:
    """Five accounts' backlogs drained at once."""
    accounts = [f"five-{i}" for i in range(1, 6)]
    n, s = args.events // 5, args.serials // 5
    t = time.monotonic()
    for i, account in enumerate(accounts):
        await put(redis, account, backlog(account, n, s, seed=10 + i))
    enqueue_s = time.monotonic() - t
    before = await stack.sandbox_counts()
    workers = await stack.start_workers(redis, 2, PASSBRIDGE_LOG_LEVEL="info")
    pids = [w.pid for w in workers]
    t0 = await first_lease(redis, accounts)
    cpu0 = {p: cpu_s(p) for p in pids}
    tracer = asyncio.create_task(trace_accounts(redis, accounts, t0)) if args.trace else None
    done: dict[str, float] = {}
    while len(done) < len(accounts):
        for account in accounts:
            if account not in done and not await pending(redis, [account]):
                done[account] = time.monotonic() - t0
        await asyncio.sleep(0.01)
    elapsed = max(done.values())
    if tracer is not None:
        tracer.cancel()
    cpu = sum(cpu_s(p) - cpu0[p] for p in pids)
    counts = delta(await stack.sandbox_counts(), before)
    await asyncio.sleep(2.5)  # one more heartbeat with the final counters
    engine = await worker_stats(redis)
    await stack.stop_workers(redis, workers)
    return {
        "accounts": len(accounts),
        "events_per_account": n,
        "serials_per_account": s,
        "enqueue_s": round(enqueue_s, 1),
        "drain_s": round(elapsed, 2),
        "drain_s_by_account": {a: round(v, 2) for a, v in done.items()},
        "events_per_s": n * len(accounts) / elapsed,
        "worker_cpu_ms_per_event": cpu * 1000 / (n * len(accounts)),
        "requests": counts,
        "engine": engine,
        "logs": log_summary(stack.workdir),
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="pb-drain-"))
    out: dict[str, Any] = {
        "rate_scale": args.rate_scale,
        "five_rate_scale": args.five_rate_scale,
        "root": str(root),
        "worker_env": dict(args.worker_env),
    }
    if args.only_five:
        return await five_only(root, args, out)
    if args.only_one:
        (root / "one").mkdir()
        stack = Stack(root / "one", args.rate_scale, **dict(args.worker_env))
        redis = Redis.from_url(stack.redis_url)
        try:
            await stack.start_sandbox(["one"])
            await setup_accounts(stack, redis, ["one"])
            out["one"] = await one_account(stack, redis, args)
            print(f"  {out['one']}", file=sys.stderr)
        finally:
            await redis.aclose()
            stack.stop()
        return out
    (root / "one").mkdir()
    stack = Stack(root / "one", args.rate_scale, **dict(args.worker_env))
    redis = Redis.from_url(stack.redis_url)
    try:
        await stack.start_sandbox(["one", "one-single"])
        await setup_accounts(stack, redis, ["one", "one-single"])
        print("arq no-op baseline ...", file=sys.stderr)
        out["arq"] = await arq_noop(stack.redis_url, args.arq_jobs)
        print(f"  {out['arq']}", file=sys.stderr)
        print(f"one call per operation, 2 Klaviyo minutes at scale {args.rate_scale:g} ...", file=sys.stderr)
        out["single"] = await single_phase(stack, redis, args)
        print(f"  {out['single']}", file=sys.stderr)
        print(f"one account: {args.events} events / {args.serials} serials, adaptive ...", file=sys.stderr)
        out["one"] = await one_account(stack, redis, args)
        print(f"  {out['one']}", file=sys.stderr)
    finally:
        await redis.aclose()
        stack.stop()
    if args.skip_five:
        return out
    return await five_only(root, args, out)


async def five_only(root: Path, args: argparse.Namespace, out: dict[str, Any]) -> dict[str, Any]:
    """Phase 4 on its own stack (its own Redis and sandbox, on its own rate scale)."""
    (root / "five").mkdir()
    stack = Stack(root / "five", args.five_rate_scale, **dict(args.worker_env))
    redis = Redis.from_url(stack.redis_url)
    try:
        accounts = [f"five-{i}" for i in range(1, 6)]
        await stack.start_sandbox(accounts)
        await setup_accounts(stack, redis, accounts)
        print(f"five accounts at scale {args.five_rate_scale:g} ...", file=sys.stderr)
        out["five"] = await five_accounts(stack, redis, args)
        print(f"  {out['five']}", file=sys.stderr)
    finally:
        await redis.aclose()
        stack.stop()
    return out


def report(out: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    if "one" not in out or "single" not in out:
        return {k: out[k] for k in ("one", "five") if k in out}
    one, single, arq = out["one"], out["single"], out["arq"]
    ceiling = drain_ceiling(args.events, args.serials, rate_scale=args.rate_scale)
    n429, total = share_429(one["requests"])
    fig: dict[str, Any] = {
        "rate_scale": args.rate_scale,
        "one_events_per_s": round(one["events_per_s"], 1),
        "one_ceiling_events_per_s": round(ceiling.events_per_s, 1),
        "one_ceiling_bound_by": ceiling.bound_by,
        "one_vs_ceiling": round(one["events_per_s"] / ceiling.events_per_s, 3),
        "single_events_per_s": round(single["events_per_s"], 1),
        "one_vs_single": round(one["events_per_s"] / single["events_per_s"], 1),
        "one_429_share": round(n429 / total, 4) if total else 0.0,
        "one_requests": total,
        "worker_cpu_ms_per_event": round(one["worker_cpu_ms_per_event"], 3),
        "arq_cpu_ms_per_noop_job": round(arq["cpu_ms_per_job"], 3),
        "cpu_vs_arq": round(one["worker_cpu_ms_per_event"] / arq["cpu_ms_per_job"], 3),
        "probe_p50_ms": one["probe_latency"]["p50_ms"],
        "probe_p99_ms": one["probe_latency"]["p99_ms"],
    }
    ok = (
        fig["one_vs_ceiling"] >= TARGET_CEILING
        and fig["one_vs_single"] >= TARGET_VS_SINGLE
        and fig["one_429_share"] < TARGET_429
        and fig["cpu_vs_arq"] <= TARGET_CPU_VS_ARQ
    )
    if "five" in out:
        five = out["five"]
        per = drain_ceiling(
            five["events_per_account"], five["serials_per_account"], rate_scale=args.five_rate_scale
        )
        n5, t5 = share_429(five["requests"])
        fig.update(
            {
                "five_rate_scale": args.five_rate_scale,
                "five_events_per_s": round(five["events_per_s"], 1),
                "five_ceiling_events_per_s": round(per.events_per_s * five["accounts"], 1),
                "five_vs_ceiling": round(five["events_per_s"] / (per.events_per_s * five["accounts"]), 3),
                "five_429_share": round(n5 / t5, 4) if t5 else 0.0,
                "five_worker_cpu_ms_per_event": round(five["worker_cpu_ms_per_event"], 3),
            }
        )
        ok = ok and fig["five_vs_ceiling"] >= TARGET_CEILING and fig["five_429_share"] < TARGET_429
    fig.update(
        {
            "target_vs_ceiling": TARGET_CEILING,
            "target_vs_single": TARGET_VS_SINGLE,
            "target_429_share": TARGET_429,
            "target_cpu_vs_arq": TARGET_CPU_VS_ARQ,
            "ok": ok,
        }
    )
    return fig


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate-scale", type=float, default=5.0)
    parser.add_argument("--five-rate-scale", type=float, default=1.0)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--serials", type=int, default=40_000)
    parser.add_argument("--single-events", type=int, default=10_000)
    parser.add_argument("--probe-rate", type=float, default=2.0)
    parser.add_argument("--arq-jobs", type=int, default=3000)
    parser.add_argument("--skip-five", action="store_true", help="only phases 1-3")
    parser.add_argument("--only-five", action="store_true", help="only phase 4 (development)")
    parser.add_argument("--only-one", action="store_true", help="only phase 3 (development)")
    parser.add_argument("--trace", action="store_true", help="print the writes per kind each second")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (worker logs, Redis data)")
    add_worker_env_option(parser)
    ns = parser.parse_args()
    t0 = time.monotonic()
    result = asyncio.run(main(ns))
    if not ns.keep:
        shutil.rmtree(result.pop("root"), ignore_errors=True)
    figures = report(result, ns)
    print(
        f"rate scale: Klaviyo's tiers {ns.rate_scale:g}x faster in the sandbox and the workers alike "
        f"(five accounts: {ns.five_rate_scale:g}x)"
    )
    print_results(result, figures, t0)
