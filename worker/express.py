"""The express lane: a child process of every ``passbridge worker`` that works only accounts with a small
backlog, so a big account's backlog never delays another account's events (issue 9, README "Fair share").

Why a process: a worker draining a big backlog keeps its event loop busy in steps of tens of milliseconds
(bulk requests of hundreds of items to build and parse, thousands of leases to renew) and its garbage
collector pauses it for 50-100 ms now and then. Fair claiming already gives a small account a slot at once,
but its event still waits for that loop. The express lane is a second engine in its own process, so its loop
is idle when a small account's event comes in, and the operating system runs it at once (a process that
sleeps most of the time is scheduled ahead of busy ones).

How events reach it (``claim.lua``, ``_enqueue_core.lua``):

- a live express lane keeps ``keys.EXPRESS_ON`` set (three heartbeats) to the backlog up to which an account
  is *small* (``PASSBRIDGE_WORKER_EXPRESS_SMALL`` pending events); all of what follows applies only while
  some worker is busy with a backlog (``keys.EXPRESS_BUSY``, set by a worker holding at least
  ``PASSBRIDGE_WORKER_EXPRESS_BUSY_SERIALS``): with no backlog anywhere the workers take everything;
- while it is set, an enqueue that leaves the account small pushes the account onto ``keys.EXPRESS_NOTIFY``;
  an express lane blocked on that list claims the account's due serials at once;
- the other lanes leave a small account's serials alone until they have been due for
  ``PASSBRIDGE_WORKER_EXPRESS_GRACE_MS``: if every express lane is dead or busy, a small account's event
  waits at most that long more. Retries and serials handed back are found by the express lane's periodic
  claim (every idle second) or, after the grace, by any lane.

Leases, order, retries, the DLQ and metrics work exactly as in any worker: the lane is the same engine with
a claim that picks different serials. The child dies with its parent (``PR_SET_PDEATHSIG``): a killed worker
takes its express lane with it, whose leases then expire and are taken over like any others.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import structlog

from passbridge.settings import Settings

if TYPE_CHECKING:
    from worker.engine import EngineConfig

log = structlog.get_logger(__name__)

#: A child that exits this soon after it started is restarted only after this long (a crash loop must not
#: spin a CPU); one that ran longer is restarted at once.
RESTART_BACKOFF_S = 5.0


class Child(Protocol):
    """What the parent needs of a child process (``subprocess.Popen`` or :class:`ForkedChild`)."""

    @property
    def pid(self) -> int: ...

    def poll(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


@dataclasses.dataclass
class ForkedChild:
    """A child made with ``os.fork`` (what ``Popen`` offers, for a pid)."""

    pid: int
    returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
            time.sleep(0.02)
        return code

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


@dataclasses.dataclass
class ExpressProcess:
    """The parent's handle on its express-lane child: start, watch (restart when it dies), stop."""

    settings: Settings
    redis_url: str
    proc: Child
    started: float
    restarts: int = 0

    @classmethod
    def fork(cls, settings: Settings, redis_url: str) -> ExpressProcess:
        """Start the child as a copy of this process, which must not run an event loop or threads yet (call
        it before the worker's loop starts). The copy has every module loaded already: it works within
        milliseconds and costs no second of start-up CPU next to the worker's own start."""
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's life is measured by the express-lane tests
            code = 0
            try:
                _die_with_parent(parent)
                _own_session()
                _fresh_loop()
                asyncio.run(run(settings, redis_url, parent))
            except BaseException:
                log.exception("express_lane_failed")
                code = 1
            finally:
                # Never return into the parent's code (its cleanup, its arq worker) from the copy.
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        log.info("express_lane_started", pid=pid)
        return cls(settings, redis_url, ForkedChild(pid), time.monotonic())

    @staticmethod
    def _popen(settings: Settings, redis_url: str) -> subprocess.Popen[bytes]:
        """Start the child as a new program, for restarts: by then the worker runs its event loop, and forking
        a process with a running loop is not safe (a second or so of imports)."""
        # The child reads the same PASSBRIDGE_* environment; what `passbridge worker` got as options is
        # handed on explicitly. It serves no /metrics of its own: with PROMETHEUS_MULTIPROC_DIR (set by
        # `passbridge worker`) its counters land in the parent's scrape.
        env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "PASSBRIDGE_WORKER_LEASE_TTL_S": str(settings.worker_lease_ttl_s),
            "PASSBRIDGE_WORKER_GRACE_S": str(settings.worker_grace_s),
            "PASSBRIDGE_EXPRESS_PARENT_PID": str(os.getpid()),
        }
        env.pop("PASSBRIDGE_WORKER_METRICS_PORT", None)
        return subprocess.Popen([sys.executable, "-m", "worker.express"], env=env, start_new_session=True)

    async def supervise(self, every_s: float = 1.0) -> None:
        """Restart the child whenever it exits (it must not: a crash, an OOM kill); runs until cancelled."""
        while True:
            await asyncio.sleep(every_s)
            code = self.proc.poll()
            if code is None:
                continue
            ran = time.monotonic() - self.started
            log.error("express_lane_exited", pid=self.proc.pid, code=code, ran_s=round(ran, 1))
            if ran < RESTART_BACKOFF_S:
                await asyncio.sleep(RESTART_BACKOFF_S)
            self.proc = self._popen(self.settings, self.redis_url)
            self.started = time.monotonic()
            self.restarts += 1
            log.info("express_lane_started", pid=self.proc.pid, restarts=self.restarts)

    async def stop(self, grace_s: float) -> None:
        """SIGTERM: the child finishes its in-flight events (up to ``grace_s``) and hands the rest back."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.proc.wait, grace_s + 5)
        except subprocess.TimeoutExpired:
            log.warning("express_lane_killed", pid=self.proc.pid)
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)


def express_config(settings: Settings) -> EngineConfig:
    """The express lane's engine settings: a worker's, with the express claim and a small number of slots."""
    from worker.main import engine_config

    return dataclasses.replace(
        engine_config(settings),
        express=True,
        max_serials=settings.worker_express_max_serials,
        claim_batch=min(32, settings.worker_express_max_serials),
        fair_reserve=0,
        fresh_ms=0,
        fresh_take=0,
        heads_per_serial=8,
    )


def _die_with_parent(parent: int) -> None:
    """Ask Linux for SIGTERM when the parent dies (a SIGKILLed worker takes its express lane along)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    if parent and os.getppid() != parent:  # the parent died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


async def run(settings: Settings, redis_url: str, parent: int) -> None:
    """The child's life: start the express engine, work until SIGTERM or the parent is gone, stop cleanly."""
    from passbridge import metrics
    from passbridge.gc_tuning import tune_gc
    from worker.main import close_clients, open_engine

    # Every log line of the child says it comes from an express lane (tasks inherit the context).
    structlog.contextvars.bind_contextvars(lane="express")
    # The worker's sync mode: in adaptive mode a small backlog gets single calls anyway, and a serial with
    # several queued events still has them coalesced into one profile and one record write.
    ctx = open_engine(settings, redis_url, express_config(settings))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tune_gc()
    engine = ctx["engine"]
    await engine.start()
    flusher = metrics.start_flusher(ctx["pb_redis"])
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            if parent and os.getppid() != parent:
                log.warning("express_lane_orphaned", parent=parent)
                break
    finally:
        await engine.stop(settings.worker_grace_s)
        await metrics.stop_flusher(flusher, ctx["pb_redis"])
        await close_clients(ctx)


def main() -> None:
    """Entry point of the child (``python -m worker.express``, started by :class:`ExpressProcess`)."""
    from passbridge.logging import configure_logging
    from passbridge.settings import get_settings

    parent = int(os.environ.get("PASSBRIDGE_EXPRESS_PARENT_PID", "0"))
    _die_with_parent(parent)
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    if not settings.redis_url:
        raise SystemExit("the express lane needs REDIS_URL")
    _fresh_loop()
    asyncio.run(run(settings, settings.redis_url, parent))


def _own_session() -> None:
    """Leave the worker's session: where Linux groups CPU time by session (autogroup scheduling), the lane
    must not share the group its parent lowers to a backlog's priority (see ``lower_priority``)."""
    with contextlib.suppress(OSError):
        os.setsid()


def lower_priority(nice: int) -> bool:
    """Lower this process's CPU priority by ``nice``, across sessions too; returns whether the session's.

    Linux's autogroup scheduling (on by default on many desktops and VMs) first shares CPU time evenly
    between sessions and applies ``nice`` only among the processes of one session: a worker in a session of
    its own would still get as much CPU as Redis or an express lane in theirs. The session's nice
    (``/proc/self/autogroup``) ranks it among sessions. It is set only when this process leads its session
    (the express lane has left it), so a shell's session is never reniced with it.
    """
    os.nice(nice)
    autogroup = Path("/proc/self/autogroup")
    if os.getsid(0) != os.getpid() or not autogroup.exists():
        return False
    try:
        autogroup.write_text(str(nice))
    except OSError:
        return False
    return True


def _fresh_loop() -> None:
    """uvloop for the child's loop, as the worker uses (plain asyncio where it is not installed)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


if __name__ == "__main__":
    main()
