"""How ``passbridge producer`` and ``passbridge sandbox`` run uvicorn: on a socket bound before serving, so they can
say which port they listen on, and with ``--workers N`` under a supervisor that stops listening when it stops.
(Its own module: importing it imports uvicorn, which ``passbridge --help`` must not.)"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

import uvicorn
from uvicorn.supervisors import Multiprocess

#: uvicorn's exit code for a server that did not start (a bad app, a lifespan that failed).
STARTUP_FAILURE = 3


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
    it has told them to stop. The workers close theirs at once; with the supervisor's still open, the kernel
    would go on accepting connections that no one serves, reset only when the supervisor exits (up to the grace
    period later) instead of refused at once, which sends the sender's retry elsewhere or past the restart."""

    def terminate_all(self) -> None:
        """Tell every worker to stop, and stop listening."""
        super().terminate_all()
        for sock in self.sockets:
            sock.close()
