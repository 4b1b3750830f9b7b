"""``passbridge worker``: run one engine worker process (arq), or check that workers are alive."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from passbridge.cli.common import fail, redis_url, settings

if TYPE_CHECKING:
    from passbridge.settings import Settings


def worker(
    concurrency: int = typer.Option(
        None,
        "--concurrency",
        "-c",
        min=1,
        help="Serials worked on at once in single sync mode (default PASSBRIDGE_WORKER_MAX_JOBS); "
        "adaptive/bulk mode (the default) holds up to PASSBRIDGE_WORKER_BULK_MAX_SERIALS instead.",
    ),
    lease_ttl: float = typer.Option(
        None, min=0.5, help="Lease TTL in seconds (default PASSBRIDGE_WORKER_LEASE_TTL_S)."
    ),
    grace: float = typer.Option(
        None, min=0, help="Seconds to finish in-flight events on SIGTERM (default PASSBRIDGE_WORKER_GRACE_S)."
    ),
    metrics_port: int = typer.Option(
        None,
        "--metrics-port",
        min=0,
        help="Serve Prometheus /metrics on this port (0 = any free port; default PASSBRIDGE_WORKER_METRICS_PORT).",
    ),
    check: bool = typer.Option(
        False, "--check", help="Exit 0 if a worker recorded its health in the last few seconds, else 1."
    ),
) -> None:
    """Run a worker: claims serials, writes their events to Klaviyo in order, retries and dead-letters.

    Start as many as you like, on one machine or many, against the same Redis. SIGTERM stops claiming,
    lets in-flight events finish (up to --grace) and hands the rest back at once.
    """
    from arq.worker import check_health

    from passbridge.outage import StillUnreachable, wait_until_reachable
    from worker.arq_worker import run_worker
    from worker.main import worker_settings

    s = settings(server=True)
    updates = {
        k: v
        for k, v in {
            "worker_max_jobs": concurrency,
            "worker_lease_ttl_s": lease_ttl,
            "worker_grace_s": grace,
            "worker_metrics_port": metrics_port,
        }.items()
        if v is not None
    }
    s = s.model_copy(update=updates)
    if s.worker_express_lane and not check:
        _multiprocess_metrics(s.state_dir)
    url = redis_url(s, start=not check)
    if check:
        raise typer.Exit(check_health(worker_settings(s, url)))
    try:
        # Before the express lane is forked: both processes need Redis from their first step.
        wait_until_reachable(url, s.worker_redis_wait_s)
    except StillUnreachable as exc:
        fail(str(exc))
    _check_secret_key(s, url)
    express = None
    if s.worker_express_lane:
        from worker.express import ExpressProcess

        # Before the event loop exists: the child is a copy of this process with everything imported.
        express = ExpressProcess.fork(s, url)
        if s.worker_backlog_nice > 0:
            # Backlogs are throughput work, paced by Klaviyo's limits rather than by this CPU: when the host
            # is busy, the express lane (and Redis, the producer) should run first. The child keeps its
            # priority (forked before this, into a session of its own).
            import structlog

            from worker.express import lower_priority

            session = lower_priority(s.worker_backlog_nice)
            structlog.get_logger(__name__).info("worker_niced", nice=s.worker_backlog_nice, session=session)
    kwargs = worker_settings(s, url, express=express)
    _use_uvloop()
    try:
        run_worker(kwargs)
    finally:
        if s.worker_express_lane and (d := os.environ.get(_OWN_METRICS_DIR)):
            shutil.rmtree(d, ignore_errors=True)


#: Set (to the directory) by the worker for itself when it switched to multiprocess metrics.
_OWN_METRICS_DIR = "PASSBRIDGE_WORKER_METRICS_DIR"


def _multiprocess_metrics(state_dir: Path) -> None:
    """Count metrics in files shared with the express-lane child, so one scrape of this worker adds both up.

    prometheus-client picks its storage when first imported, which the CLI already did: the process
    re-executes itself once with ``PROMETHEUS_MULTIPROC_DIR`` set (same pid, same arguments). A directory set
    by the operator needs no re-execution: importing :mod:`passbridge.metrics` already moved this process into
    a subdirectory of its own there, which the express-lane child inherits.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    from passbridge.metrics import setup_multiprocess

    try:
        d = setup_multiprocess(state_dir / "prometheus" / f"worker-{os.getpid()}")
    except OSError as exc:
        fail(
            f"cannot write the worker's metrics files under PASSBRIDGE_STATE_DIR {state_dir} "
            f"({exc.strerror or exc}): point it at a writable directory with room, or set "
            "PROMETHEUS_MULTIPROC_DIR"
        )
    os.environ[_OWN_METRICS_DIR] = str(d)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-c", _REEXEC, *sys.argv[1:]])  # noqa: S606 (same program)


def _check_secret_key(s: Settings, url: str) -> None:
    """Fail with one line, before any engine starts, when this worker could decrypt no account's secrets.

    Without ``PASSBRIDGE_SECRET_KEY`` a process uses ``<state dir>/secret.key``, generating it if missing. A
    worker on another host or container than the producer (its own state dir) would generate a key of its
    own, then fail every batch of every account with a traceback while their events wait: a key generated
    now cannot decrypt secrets stored before. So a worker that had to generate its key while accounts exist
    stops here, and removes that key so the next start with the right settings does not find it.
    """
    import redis

    from passbridge.crypto import SecretKeyError, load_cipher
    from passbridge.keys import ACCOUNTS_INDEX

    secret = s.secret_key.get_secret_value() if s.secret_key else None
    key_file = s.state_dir / "secret.key"
    generating = not secret and not key_file.exists()
    try:
        load_cipher(secret, s.state_dir)
    except SecretKeyError as exc:
        fail(str(exc))
    if not generating:
        return
    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)
    try:
        accounts = int(client.scard(ACCOUNTS_INDEX))
    except redis.RedisError:
        return  # the outage is the engine's to wait out; the batches will say what is wrong
    finally:
        client.close()
    if accounts:
        key_file.unlink(missing_ok=True)
        fail(
            f"no PASSBRIDGE_SECRET_KEY is set and {key_file} did not exist: a key generated now cannot decrypt "
            f"the secrets of the {accounts} account(s) in Redis; set PASSBRIDGE_SECRET_KEY to the producer's "
            "key (or share its PASSBRIDGE_STATE_DIR)"
        )


_REEXEC = "import sys; sys.argv[0] = 'passbridge'; from passbridge.cli import main; main()"


def _use_uvloop() -> None:
    """Run arq's loop on uvloop, as the producer's and the sandbox's uvicorn do: the worker is CPU-bound on
    the event loop (HTTP to Klaviyo, Redis round trips), and uvloop makes the same work cheaper. arq takes
    whatever loop ``asyncio.get_event_loop()`` gives, so a policy set here is enough."""
    import asyncio

    try:
        import uvloop
    except ImportError:  # not on every platform (uvicorn[standard] installs it where it builds)
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.set_event_loop(asyncio.new_event_loop())
