"""Instructions per request on the producer's webhook path, counted by callgrind: a deterministic yardstick.

``bench/ingest.py`` measures the webhook/bare ratio in a real server, where one phase of the same code can cost
30 % more than the next (other processes, Redis rewriting its AOF, the host), so a change of a few per cent to
the webhook's path cannot be told from noise there. This script counts instead. It drives the benchmark's app
(``bench/ingest_app.py``) in-process over ASGI, without uvicorn, against a real embedded Redis, with
``valgrind --tool=callgrind``; instrumentation is switched on only after a warm-up, for ``--requests`` signed
webhooks 32 at a time, as one producer worker holds them under load.

What it counts: the producer process's user-space instructions for those requests (the app, the publisher, the
Redis client). Not counted: Redis, the kernel, uvicorn's HTTP parsing and socket writes, cache misses. So the
figures compare versions of the same path, not the benchmark's ratio. The publisher's batches depend on timing
(Redis is not slowed by valgrind), so runs differ by about 1 %. (The bare endpoint is not counted: driven this
way under valgrind, its runs stalled before the end.)

Needs ``valgrind`` (with ``callgrind_control``); without it the script says so and reports ``ok: false``.
``python bench/ingest_instructions.py`` takes about 1 minute.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = 32


def _child(requests: int, warmup: int) -> None:
    """Runs under valgrind: start Redis, register the account, drive the app, toggle instrumentation."""
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    import random

    import uvloop
    from cryptography.fernet import Fernet
    from standardwebhooks import Webhook

    from passbridge.accounts import new_webhook_secret
    from passbridge.redis_server import start_redis

    tmp = Path(tempfile.mkdtemp(prefix="pb-instr-"))
    redis_server = start_redis(tmp / "redis", appendonly=True)
    try:
        secret_key = Fernet.generate_key().decode()
        secret = new_webhook_secret()
        import ingest as bench  # bench/ingest.py: the same events and account as the throughput benchmark

        os.environ.update(bench.producer_env(redis_server.url, secret_key, tmp))
        asyncio.run(bench.register_account(redis_server.url, secret_key, tmp, secret))
        signer = Webhook(secret)
        now = datetime.now(UTC)
        stamp = str(int(now.timestamp())).encode()
        rng = random.Random(1)
        run = f"i{os.getpid()}"
        items: list[tuple[bytes, list[tuple[bytes, bytes]]]] = []
        for i in range(warmup + requests):
            body = bench.webhook_body(rng, i, run)
            msg_id = f"msg_{run}_{i}"
            headers = [
                (b"host", b"bench"),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"webhook-id", msg_id.encode()),
                (b"webhook-timestamp", stamp),
                (b"webhook-signature", signer.sign(msg_id, now, body.decode()).encode()),
            ]
            items.append((body, headers))

        from ingest_app import app

        path = f"/webhooks/{bench.ACCOUNT}"
        statuses: list[int] = []

        async def one(body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
            scope = {
                "type": "http",
                "asgi": {"version": "3.0", "spec_version": "2.3"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": path,
                "raw_path": path.encode(),
                "query_string": b"",
                "root_path": "",
                "headers": headers,
                "client": ("127.0.0.1", 50000),
                "server": ("127.0.0.1", 8000),
                "state": {},
            }
            delivered = False

            async def receive() -> dict[str, Any]:
                nonlocal delivered
                if not delivered:
                    delivered = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await asyncio.Event().wait()  # a client that stays connected
                raise AssertionError("unreachable")

            async def send(message: MutableMapping[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])

            await app(scope, receive, send)

        async def drive(batch: list[tuple[bytes, list[tuple[bytes, bytes]]]]) -> None:
            gate = asyncio.Semaphore(CONCURRENCY)

            async def gated(body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
                async with gate:
                    await one(body, headers)

            await asyncio.gather(*(gated(b, h) for b, h in batch))

        def instrument(state: str) -> None:
            # Poll instead of blocking in waitpid(): valgrind takes the command between the guest's
            # instructions, so the guest keeps executing until callgrind_control has its answer.
            control = subprocess.Popen(
                ["callgrind_control", "-i", state, str(os.getpid())],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            while control.poll() is None:
                time.sleep(0)
            if control.returncode != 0:
                raise SystemExit(f"callgrind_control -i {state} failed")

        async def main() -> None:
            async with app.router.lifespan_context(app):
                await drive(items[:warmup])
                instrument("on")
                await drive(items[warmup:])
                instrument("off")

        uvloop.run(main())
        if set(statuses) != {202} or len(statuses) != warmup + requests:
            raise SystemExit(
                f"unexpected answers: {sorted(set(statuses))}, {len(statuses)} of {warmup + requests}"
            )
    finally:
        redis_server.stop()


def _count(requests: int, warmup: int) -> float:
    """Instructions per request of one run under callgrind."""
    with tempfile.TemporaryDirectory(prefix="pb-instr-") as tmp:
        try:
            proc = subprocess.run(
                [
                    "valgrind",
                    "--tool=callgrind",
                    "--instr-atstart=no",
                    f"--callgrind-out-file={tmp}/callgrind.out",
                    sys.executable,
                    __file__,
                    "--child",
                    "--requests",
                    str(requests),
                    "--warmup",
                    str(warmup),
                ],
                capture_output=True,
                text=True,
                timeout=300,
            )
        except subprocess.TimeoutExpired:
            raise SystemExit("the run did not finish within 300 s under valgrind; try again") from None
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if proc.returncode != 0 or found is None:
        raise SystemExit(f"the run failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return int(found.group(1)) / requests


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000, help="requests counted per run")
    parser.add_argument("--warmup", type=int, default=300, help="requests before counting starts")
    parser.add_argument("--runs", type=int, default=2, help="separate runs, each in a fresh process")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.requests, args.warmup)
        return
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        print(f"{' and '.join(missing)} not found: install valgrind (e.g. apt-get install valgrind) to count")
        print(orjson.dumps({"skipped": f"{', '.join(missing)} not installed", "ok": False}).decode())
        return
    runs: list[float] = []
    for run in range(1, args.runs + 1):
        runs.append(_count(args.requests, args.warmup))
        print(
            f"run {run}: {runs[-1] / 1000:.1f}k instructions per webhook request "
            f"({args.requests} after {args.warmup} warm-up, {CONCURRENCY} at a time)",
            flush=True,
        )
    summary = {
        "webhook_instructions_per_request": round(statistics.mean(runs)),
        "runs": [round(x) for x in runs],
        "requests": args.requests,
        "warmup": args.warmup,
        "ok": True,
    }
    print(orjson.dumps(summary).decode())


if __name__ == "__main__":
    main()
