"""``passbridge producer --workers N``: uvicorn's worker processes, and a supervisor that stops listening when it
stops. (Its own module: importing it imports uvicorn, which ``passbridge --help`` must not.)"""

from __future__ import annotations

import contextlib

import uvicorn
from uvicorn.supervisors import Multiprocess


def serve_workers(config: uvicorn.Config) -> None:
    """Serve ``config`` (``workers`` > 1, the app as an import string) as ``uvicorn.run`` does."""
    sock = config.bind_socket()
    with contextlib.suppress(KeyboardInterrupt):
        Supervisor(config, sockets=[sock]).run()


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
