"""arq's ``Worker``, kept running through Redis outages (see :mod:`passbridge.outage`).

arq ends its worker at the first failed Redis call of its poll loop: its health record, its cron (our sweep)
and its queue read all run there. A Redis restart would then stop every worker, and with them the engine
that runs inside the same process. Here an outage error in an iteration is reported and the loop goes on;
the engine's own loops ride the outage out the same way. ``passbridge worker`` runs this class
(``arq worker.main.WorkerSettings`` runs arq's own).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

import structlog
from arq.worker import Worker as ArqWorker
from arq.worker import get_kwargs

from passbridge.outage import OUTAGE_ERRORS, OutageLog

log = structlog.get_logger(__name__)

#: Extra pause after a failed iteration, on top of arq's poll delay: reconnecting costs little, but twice a
#: second is enough.
RETRY_PAUSE_S = 1.0


class Worker(ArqWorker):
    """arq's worker whose poll loop outlives Redis outages, and whose close does not fail on one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._outage = OutageLog("arq")

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except OUTAGE_ERRORS as exc:
            self._outage.failed(exc)
            await asyncio.sleep(RETRY_PAUSE_S)
            return
        self._outage.succeeded()

    async def close(self) -> None:
        """arq's ``close``, with the health record's deletion allowed to fail (a worker stopped while Redis is
        down must still run ``on_shutdown``: the engine's grace period, the express lane's stop), and jobs
        cancelled by the stop waited for without raising."""
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)
        if not self._pool:
            return
        # Jobs were just cancelled (handle_sig). One cancelled before its first step (a cron job arq had just
        # created when the signal came) raises CancelledError without arq's own handler running: returned here
        # instead of raised, or the stop would end in a traceback and exit 1 without on_shutdown.
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        with contextlib.suppress(*OUTAGE_ERRORS):
            await self.pool.delete(self.health_check_key)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        await self.pool.aclose(close_connection_pool=True)
        self._pool = None


def run_worker(settings: dict[str, Any]) -> Worker:
    """:func:`arq.worker.run_worker` with :class:`Worker`."""
    worker = Worker(**get_kwargs(settings))
    worker.run()
    return worker
