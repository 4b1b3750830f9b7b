"""The event-loop helpers of :mod:`worker.bulk`: :class:`TickBatcher` (calls of one loop turn run as one batch)
and :class:`TurnGate` (at most N callers per loop turn, in arrival order). Pure asyncio, no servers."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from worker.bulk import TickBatcher, TurnGate


class Ticker:
    """Counts event-loop turns: one ``sleep(0)`` per turn."""

    def __init__(self) -> None:
        self.turn = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            self.turn += 1
            await asyncio.sleep(0)

    def __enter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def test_tick_batcher_runs_the_calls_of_one_turn_as_one_batch() -> None:
    batches: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        batches.append(list(items))
        await asyncio.sleep(0)
        return [i * 10 for i in items]

    batcher: TickBatcher[int, int] = TickBatcher(run, chunk=100)
    results = await asyncio.gather(*(batcher(i) for i in range(7)))
    assert results == [i * 10 for i in range(7)]
    assert batches == [list(range(7))]
    # A later turn is a new batch.
    assert await batcher(42) == 420
    assert batches[-1] == [42]


async def test_tick_batcher_splits_a_turn_into_chunks() -> None:
    batches: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        batches.append(list(items))
        return list(items)

    batcher: TickBatcher[int, int] = TickBatcher(run, chunk=3)
    assert await asyncio.gather(*(batcher(i) for i in range(8))) == list(range(8))
    assert batches == [[0, 1, 2], [3, 4, 5], [6, 7]]


async def test_tick_batcher_fails_every_call_of_a_failed_chunk_only() -> None:
    async def run(items: list[int]) -> list[int]:
        if 4 in items:
            raise RuntimeError("redis down")
        return list(items)

    batcher: TickBatcher[int, int] = TickBatcher(run, chunk=3)
    results = await asyncio.gather(*(batcher(i) for i in range(6)), return_exceptions=True)
    assert results[:3] == [0, 1, 2]
    assert all(isinstance(r, RuntimeError) for r in results[3:])


async def test_turn_gate_lets_per_turn_callers_through_each_turn_in_arrival_order() -> None:
    gate = TurnGate(per_turn=3)
    passed: list[tuple[int, int]] = []

    async def caller(i: int, ticker: Ticker) -> None:
        await gate()
        passed.append((i, ticker.turn))

    with Ticker() as ticker:
        await asyncio.gather(*(caller(i, ticker) for i in range(10)))
    assert [i for i, _ in passed] == list(range(10))
    per_turn: dict[int, int] = {}
    for _, turn in passed:
        per_turn[turn] = per_turn.get(turn, 0) + 1
    # Three per turn (the last turn takes the rest), and no turn left idle while callers wait (a waiter is
    # woken in the turn after it was let through: at most two turns apart).
    turns = sorted(per_turn)
    assert [per_turn[t] for t in turns] == [3, 3, 3, 1]
    assert all(b - a <= 2 for a, b in itertools.pairwise(turns))


async def test_turn_gate_passes_at_once_while_under_its_quota() -> None:
    gate = TurnGate(per_turn=5)
    with Ticker() as ticker:
        start = ticker.turn
        for _ in range(5):
            await gate()
        assert ticker.turn == start  # no turn went by


@pytest.mark.parametrize("per_turn", [1, 4])
async def test_turn_gate_wakes_waiters_after_a_cancelled_one(per_turn: int) -> None:
    gate = TurnGate(per_turn=per_turn)
    for _ in range(per_turn):
        await gate()
    waiter = asyncio.ensure_future(gate())
    after = asyncio.ensure_future(gate())
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.wait_for(after, timeout=1.0)
    assert after.done()
    assert not after.cancelled()
