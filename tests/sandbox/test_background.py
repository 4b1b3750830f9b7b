"""The sandbox's background processing (Klaviyo's jobs) runs in short turns shared by every job in progress, so
another account's request never waits for a whole job."""

from __future__ import annotations

import asyncio
import time

from klaviyo_sandbox.runtime import Runtime

from .conftest import config

STEP_S = 0.0005
ITEMS = 400


def busy(seconds: float) -> None:
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        pass


async def test_jobs_run_in_order_in_short_shared_turns() -> None:
    runtime = Runtime(config())
    applied: list[tuple[str, int]] = []

    def apply(item: tuple[str, int]) -> None:
        busy(STEP_S)
        applied.append(item)

    # Two jobs of 0.2 s of work each: run in one go, a request would wait 0.4 s.
    runtime.later_in_turns(0.0, [("a", i) for i in range(ITEMS)], apply)
    runtime.later_in_turns(0.0, [("b", i) for i in range(ITEMS)], apply)
    assert runtime.pending == 2
    waits = []
    while runtime.pending:
        # CPU time of this thread (the loop's): what the turn itself took, without the time the machine gave
        # other processes meanwhile (seen at 34 ms of wall time with the test suite in two processes).
        started = time.thread_time()
        await asyncio.sleep(0)  # a request's turn on the loop
        waits.append(time.thread_time() - started)

    assert [i for job, i in applied if job == "a"] == list(range(ITEMS))
    assert [i for job, i in applied if job == "b"] == list(range(ITEMS))
    # Taking turns: b started long before a finished.
    assert applied.index(("b", 0)) < applied.index(("a", ITEMS - 1)) / 2
    # A turn is 2 ms of work; the bound is still 8x below one job's length.
    assert max(waits) < 0.025, max(waits)


async def test_a_reset_drops_background_work() -> None:
    runtime = Runtime(config())
    applied: list[int] = []
    runtime.later_in_turns(0.0, list(range(ITEMS)), lambda i: (busy(STEP_S), applied.append(i)))
    await asyncio.sleep(0.01)
    runtime.reset()
    done = len(applied)
    await asyncio.sleep(0.05)
    assert 0 < done < ITEMS
    assert len(applied) == done
    assert runtime.pending == 0
