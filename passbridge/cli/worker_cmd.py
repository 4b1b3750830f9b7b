"""``passbridge worker``: run one engine worker process (arq), or check that workers are alive."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import typer

from passbridge.cli.common import fail, redis_url, settings


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

    s = settings()
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

    d = setup_multiprocess(state_dir / "prometheus" / f"worker-{os.getpid()}")
    os.environ[_OWN_METRICS_DIR] = str(d)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-c", _REEXEC, *sys.argv[1:]])  # noqa: S606 (same program)


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
