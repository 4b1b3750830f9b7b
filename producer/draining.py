"""SIGTERM (or SIGINT) while requests are in flight: tell the app at once, while uvicorn lets them finish.

uvicorn stops accepting connections at the signal and waits up to ``PASSBRIDGE_PRODUCER_SHUTDOWN_GRACE_S`` for
the requests in flight; the app itself hears of the stop only afterwards (the lifespan's shutdown). A request
that could run for long, an NDJSON upload trickling in, needs to know sooner: it stops reading and answers with
where to resume, instead of being cut off without an answer when the grace runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

#: The signals uvicorn shuts down on.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def on_stop_signal(stopping: asyncio.Event) -> Callable[[], None]:
    """Set ``stopping`` when a stop signal arrives, after running the handler installed before (uvicorn's, which
    starts the graceful shutdown); returns the function that puts that handler back.

    Called from the running loop of the main thread (the lifespan's start-up). Elsewhere (a server in a test's
    thread) signals never reach the loop, and this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def handler(sig: int, frame: FrameType | None) -> None:
        # A signal handler runs between two bytecodes of whatever the loop was doing: hand the event over to
        # the loop rather than waking its waiters from here. (A loop already closed has no one left to tell.)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(stopping.set)
        before = previous[sig]
        if callable(before):
            before(sig, frame)
        elif before != signal.SIG_IGN:
            # Not under uvicorn: what the signal did before (SIG_DFL ends the process).
            signal.signal(sig, before or signal.SIG_DFL)
            signal.raise_signal(sig)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)

    def restore() -> None:
        for sig, before in previous.items():
            if signal.getsignal(sig) is handler:
                signal.signal(sig, before or signal.SIG_DFL)

    return restore
