"""The engine's guarantees as a property, with real worker processes against the Klaviyo sandbox.

Each example: fresh accounts (so examples share the workers but not their data), random events over several
serials (random kinds, ``occurred_at`` with ties), enqueued in a random order in random batches while two
worker processes run; random transient faults, 429s and answers lost after the sandbox stored the request;
random SIGKILLs of workers (each replaced by a fresh process). After the queue drains:

- every accepted event is stored at the sandbox exactly once by ``unique_id`` (the sandbox dedups; the
  duplicate *sends* are counted, reported, and must be zero when nothing was killed or dropped);
- each serial's events were written in order: if ``E`` was in the mailbox before ``F`` was written and ``E``
  sorts before ``F`` (``occurred_at``, then arrival), ``E`` was written first — read from the serial's
  history list, where ``enqueue.lua`` and ``settle.lua`` append atomically with the mailbox change;
- each serial's final Klaviyo record and stored state are those of the sorted fold of its events;
- no pending event, lease, token, parked serial or retry record is left; the DLQ is empty.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from passbridge.event import PassEvent
from passbridge.keys import ACTIVE_ACCOUNTS, account_keys
from tests.conftest import async_wait_for
from worker import dlq, history
from worker.plan import next_state
from worker.state import PassState

from .e2e import Pipeline, Workers
from .helpers import pass_event

pytestmark = pytest.mark.slow

KINDS = ["created", "installed", "updated", "updated", "uninstalled", "deleted"]
_examples = itertools.count()


@dataclass(frozen=True)
class Scenario:
    """One example: event layout, enqueue order and batching, faults and kills."""

    layout: list[list[list[tuple[int, str]]]]  # account → serial → [(offset_s, kind)]
    seed: int
    batches: int
    kill_after: frozenset[int]
    error_503: float
    error_429: float
    drop_after_processing: float
    latency_ms: float


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    layout = draw(
        st.lists(
            st.lists(
                st.lists(st.tuples(st.integers(0, 6), st.sampled_from(KINDS)), min_size=1, max_size=6),
                min_size=2,
                max_size=8,
            ),
            min_size=1,
            max_size=3,
        )
    )
    batches = draw(st.integers(1, 5))
    kills = draw(st.frozensets(st.integers(0, batches - 1), max_size=2))
    return Scenario(
        layout=layout,
        seed=draw(st.integers(0, 2**32 - 1)),
        batches=batches,
        kill_after=kills,
        error_503=draw(st.sampled_from([0.0, 0.05, 0.1])),
        error_429=draw(st.sampled_from([0.0, 0.03])),
        drop_after_processing=draw(st.sampled_from([0.0, 0.03])),
        latency_ms=draw(st.sampled_from([0.0, 20.0])),
    )


def build_events(sc: Scenario, example: int) -> list[PassEvent]:
    """The events in the order they will be enqueued (their position is their arrival order)."""
    events = []
    for a, serials in enumerate(sc.layout):
        for s, evs in enumerate(serials):
            for n, (offset, kind) in enumerate(evs):
                events.append(
                    pass_event(
                        f"x{example}-a{a}",
                        f"S{s}",
                        n,
                        kind=kind,
                        offset_s=offset,
                        email=f"x{example}a{a}s{s}@example.com",
                    )
                )
    random.Random(sc.seed).shuffle(events)
    return events


@pytest.mark.timeout(300)
@settings(
    max_examples=6,
    deadline=None,
    # No shrinking: each example runs real processes for seconds; a failure is reported as drawn.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(sc=scenarios())
async def test_nothing_lost_nothing_twice_in_order_under_faults_and_kills(
    pipeline: Pipeline, workers: Workers, sc: Scenario
) -> None:
    example = next(_examples)
    if not workers.alive:
        workers.start(2)
    events = build_events(sc, example)
    accounts = sorted({e.account_id for e in events})
    pipeline.accounts.clear()
    for account_id in accounts:
        await pipeline.add_account(account_id)
    sends_before = pipeline.sandbox.count("create_event", 202)
    pipeline.sandbox.set_faults(
        error_rates={503: sc.error_503, 429: sc.error_429},
        drop_rate=sc.drop_after_processing,
        drop_after_processing=True,
        latency_ms=sc.latency_ms,
        seed=sc.seed,
    )
    rng = random.Random(sc.seed)
    started = time.monotonic()
    size = -(-len(events) // sc.batches)
    for b in range(sc.batches):
        await pipeline.put(events[b * size : (b + 1) * size])
        await asyncio.sleep(rng.uniform(0, 0.3))
        if b in sc.kill_after:
            victim = rng.choice(workers.alive)
            workers.kill(victim)
            workers.start(1)
    try:
        await async_wait_for(pipeline.drained, timeout=90, interval=0.1)
    except BaseException:
        print(workers.logs())
        raise
    pipeline.sandbox.clear_faults()
    pipeline.sandbox.wait_idle()
    duplicates = pipeline.sandbox.count("create_event", 202) - sends_before - len(events)
    note(
        f"{len(events)} events, {len(accounts)} accounts, {time.monotonic() - started:.1f} s, dup sends {duplicates}"
    )
    print(
        f"\nexample {example}: {len(events)} events, {len(accounts)} accounts, kills={len(sc.kill_after)}, "
        f"503={sc.error_503} 429={sc.error_429} drop={sc.drop_after_processing}, duplicate sends={duplicates}, "
        f"{time.monotonic() - started:.1f} s"
    )

    # Stored once each by unique_id, nothing missing.
    for account_id in accounts:
        stored = pipeline.stored_unique_ids(account_id)
        assert len(stored) == len(set(stored))
        assert sorted(stored) == sorted(e.event_id for e in events if e.account_id == account_id)
    # A duplicate send needs a kill or a lost answer: never after a clean success.
    if not sc.kill_after and not sc.drop_after_processing:
        assert duplicates == 0

    arrival = {e.event_id: i for i, e in enumerate(events)}
    by_serial: dict[tuple[str, str], list[PassEvent]] = {}
    for e in events:
        by_serial.setdefault((e.account_id, e.serial_number), []).append(e)
    for (account_id, serial), evs in by_serial.items():
        await check_order(pipeline, account_id, serial, evs, arrival)
        await check_final_state(pipeline, account_id, serial, evs, arrival)
    for account_id in accounts:
        await check_clean(pipeline, account_id)


async def check_order(
    pipeline: Pipeline, account_id: str, serial: str, evs: list[PassEvent], arrival: dict[str, int]
) -> None:
    """Each event was written only after every earlier event (occurred_at, then arrival) that was already queued
    when the worker picked it.

    A worker picks a serial's next event from the mailbox head it read in the settle step of the previous
    event (or at the claim), so an event ``E`` that was ingested before the write preceding ``F`` and sorts
    before ``F`` must be written before ``F``. (An ``E`` that arrives while ``F`` is already in flight is
    written after it and applied as stale: that is allowed and checked by the final state.)
    """
    timeline = await history.timeline(pipeline.redis, account_id, serial)
    ingested = {h.event_id: i for i, h in enumerate(timeline) if h.kind == "ingested"}
    written = [h.event_id for h in timeline if h.kind == "written"]
    assert sorted(written) == sorted(e.event_id for e in evs), "each event written exactly once"
    written_at = {h.event_id: i for i, h in enumerate(timeline) if h.kind == "written"}
    settled = sorted(i for i, h in enumerate(timeline) if h.kind in ("written", "dead"))
    picked_after = {
        h.event_id: max((j for j in settled if j < i), default=-1)
        for i, h in enumerate(timeline)
        if h.kind == "written"
    }
    key = {e.event_id: (e.occurred_at, arrival[e.event_id]) for e in evs}
    for f in evs:
        for e in evs:
            if e is f or not ingested[e.event_id] < picked_after[f.event_id]:
                continue
            if key[e.event_id] < key[f.event_id]:
                assert written_at[e.event_id] < written_at[f.event_id], (
                    f"{serial}: {f.event_id} written before the earlier, already queued {e.event_id}: "
                    + "; ".join(f"{h.kind} {h.event_id}" for h in timeline)
                )


async def check_final_state(
    pipeline: Pipeline, account_id: str, serial: str, evs: list[PassEvent], arrival: dict[str, int]
) -> None:
    """The record at Klaviyo and the stored state are those of the events applied in sorted order."""
    state: PassState | None = None
    for e in sorted(evs, key=lambda e: (e.occurred_at, arrival[e.event_id])):
        state = next_state(state, e)
    assert state is not None
    stored = PassState.from_json(await pipeline.redis.hget(account_keys(account_id).state, serial))
    assert (stored.status, stored.updated_at, stored.created_at) == (
        state.status,
        state.updated_at,
        state.created_at,
    )
    record = pipeline.records(account_id)[serial]
    assert record["status"] == state.status.value
    assert record["updated_at"] == state.updated_at.isoformat().replace("+00:00", "Z")


async def check_clean(pipeline: Pipeline, account_id: str) -> None:
    """Only the DLQ (empty here), state and history remain."""
    redis = pipeline.redis
    keys = account_keys(account_id)
    assert int(await redis.get(keys.depth) or 0) == 0
    assert await redis.zcard(keys.ready) == 0
    assert await redis.zcard(keys.leased) == 0
    assert await redis.hlen(keys.lease_tokens) == 0
    assert await redis.hlen(keys.retries) == 0
    assert [k async for k in redis.scan_iter(match=keys.mailbox_prefix + "*")] == []
    assert await dlq.count(redis, account_id) == 0
    assert await redis.zscore(ACTIVE_ACCOUNTS, account_id) is None
