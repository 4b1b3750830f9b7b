"""Stopping an asyncio task that runs a loop, when one cancellation may not be enough."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

#: How often :func:`cancel_until_done` cancels a task that is still running.
RECANCEL_S = 0.1


async def cancel_until_done(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait for it to end, cancelling it again every :data:`RECANCEL_S` while it runs; then
    raise what it raised, unless that was the cancellation.

    One cancellation is not always enough on Python 3.11: ``asyncio.wait_for`` returns its inner result instead
    of raising CancelledError when that result arrives in the same instant as the cancellation (CPython
    gh-86296, fixed in 3.12), and redis-py sends every command through it. A loop cancelled in that instant
    (the activity flusher, the publisher) goes on as if nothing had happened, and a bare ``await task`` then
    waits for ever: a producer worker stuck at shutdown. The caller's own cancellation is not swallowed.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait((task,), timeout=RECANCEL_S)
    if not task.cancelled():
        task.result()


async def cancel_all_until_done(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """:func:`cancel_until_done` for each of ``tasks`` at once; what they raised other than the cancellation is
    dropped, as ``asyncio.gather(..., return_exceptions=True)`` drops it."""
    await asyncio.gather(*(cancel_until_done(task) for task in tasks), return_exceptions=True)
