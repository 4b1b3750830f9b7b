"""How ``passbridge producer`` and ``passbridge sandbox`` run uvicorn: on a socket bound before serving, so they can
say which port they listen on, and with ``--workers N`` under a supervisor that stops listening when it stops and
never waits for its workers past the grace period. (Its own module: importing it imports uvicorn, which
``passbridge --help`` must not.)"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import structlog
import uvicorn
from uvicorn.supervisors import Multiprocess

#: uvicorn's exit code for a server that did not start (a bad app, a lifespan that failed).
STARTUP_FAILURE = 3

log = structlog.get_logger(__name__)

#: How long past the grace period the supervisor waits for a worker process it has told to stop. Within the
#: grace a worker finishes (or cuts off) its requests; then it flushes its counts and closes its Redis
#: connections, which takes milliseconds while Redis answers (up to Redis's timeouts, 7 s, when it does not).
#: One still running after this is stuck or waiting on Redis, and is killed: a stop must end before the
#: orchestrator's own timeout (compose: 15 s, for the default grace of 8 s).
STOP_MARGIN_S = 2.0

#: What a worker still running at the deadline is sent first: it then writes its stacks to stderr, so the log
#: shows where it was stuck (:func:`install_stack_dump`, which ``producer.main`` calls).
DUMP_SIGNAL = signal.SIGUSR1

#: How long a worker gets to write its stacks before it is killed.
DUMP_WAIT_S = 0.5


def serve(config: uvicorn.Config, announce: Callable[[int], None]) -> None:
    """Serve ``config`` as ``uvicorn.run`` does, on a socket bound first: ``announce`` gets the port it listens
    on (with port 0, the free port the system chose; uvicorn names it only in a line at info level, which
    passbridge's servers keep quiet) before the app starts."""
    sock = config.bind_socket()
    announce(int(sock.getsockname()[1]))
    if config.workers > 1:
        with contextlib.suppress(KeyboardInterrupt):
            Supervisor(config, sockets=[sock]).run()
        return
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])
    if not server.started:
        sys.exit(STARTUP_FAILURE)


class Supervisor(Multiprocess):
    """uvicorn's supervisor of the worker processes, which also closes its own copy of the listening socket once
    it has told them to stop, and waits for them only until the grace period and :data:`STOP_MARGIN_S` have run
    out (uvicorn waits for each without a limit, so one stuck worker held the stop until docker's SIGKILL).

    The workers close their sockets at once; with the supervisor's still open, the kernel would go on accepting
    connections that no one serves, reset only when the supervisor exits (up to the grace period later) instead
    of refused at once, which sends the sender's retry elsewhere or past the restart."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)
        self._stop_deadline: float | None = None

    @property
    def stop_timeout_s(self) -> float | None:
        """How long the workers may take to exit once told to stop; None: as long as they take (no grace)."""
        grace = self.config.timeout_graceful_shutdown
        return None if grace is None else grace + STOP_MARGIN_S

    def terminate_all(self) -> None:
        """Tell every worker to stop, and stop listening."""
        timeout = self.stop_timeout_s
        self._stop_deadline = None if timeout is None else time.monotonic() + timeout
        super().terminate_all()
        for sock in self.sockets:
            sock.close()

    def join_all(self) -> None:
        """Wait for the workers until the stop's deadline, then have those still running dump their stacks and
        kill them."""
        deadline = self._stop_deadline
        if deadline is None:
            super().join_all()
            return
        for process in self.processes:
            process.process.join(max(0.0, deadline - time.monotonic()))
        stuck = [p.process for p in self.processes if p.process.exitcode is None]
        for proc in stuck:
            log.error(
                "producer_worker_killed",
                pid=proc.pid,
                waited_s=self.stop_timeout_s,
                reason="still running past the shutdown grace period and margin; its threads' stacks follow",
            )
            if proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, DUMP_SIGNAL)
        if not stuck:
            return
        time.sleep(DUMP_WAIT_S)
        for proc in stuck:
            proc.kill()
        for proc in stuck:
            proc.join(5)
            if proc.exitcode is None:  # in the kernel (uninterruptible I/O): nothing more to do from here
                log.error("producer_worker_not_reaped", pid=proc.pid)


def install_stack_dump() -> None:
    """In a worker process: on :data:`DUMP_SIGNAL`, write every thread's stack to stderr (faulthandler, which does
    so even while the main thread is blocked in a call), then, if the event loop still runs, every asyncio task's
    chain of awaits: a worker stuck in an ``await`` shows only the loop in its threads' stacks."""
    signal.signal(DUMP_SIGNAL, _dump_tasks)
    faulthandler.register(DUMP_SIGNAL, all_threads=True, chain=True)  # then the handler above, from the loop


def _dump_tasks(signum: int, frame: FrameType | None) -> None:
    try:
        tasks = asyncio.all_tasks()
    except RuntimeError:  # no loop running (yet, or any more)
        return
    lines = [f"{len(tasks)} asyncio tasks (innermost await last):"]
    for task in tasks:
        lines.append(f"{task!r}")
        lines.extend(_await_chain(task.get_coro()))
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()


def _await_chain(awaitable: Any) -> list[str]:
    """Where a coroutine waits, one line per frame from the task's outermost coroutine to the innermost await."""
    lines: list[str] = []
    for _ in range(100):  # a bound, should a chain ever loop
        frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "gi_frame", None)
        frame = frame or getattr(awaitable, "ag_frame", None)
        if frame is None:
            if awaitable is not None:
                lines.append(f"  awaiting {awaitable!r}")
            break
        code = frame.f_code
        lines.append(f'  File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}')
        inner = getattr(awaitable, "cr_await", None) or getattr(awaitable, "gi_yieldfrom", None)
        inner = inner or getattr(awaitable, "ag_await", None)
        if type(inner).__name__ in ("async_generator_asend", "async_generator_athrow"):
            # contextlib's __aexit__ (an asynccontextmanager, such as the app's lifespan) awaits its generator
            # through an object that does not point back to it; the generator is the manager's ``gen``.
            inner = getattr(frame.f_locals.get("self"), "gen", inner)
        awaitable = inner
    return lines
