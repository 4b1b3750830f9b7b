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

The same property runs with the workers in ``bulk`` mode (coalesced rounds through the bulk endpoints, profile
import jobs), with bulk partial failures on top: a few serials are poisoned through the sandbox's
``reject_external_ids`` fault. Poisoned for the bulk endpoints only, the bulk requests refuse their items and
the per-event fallback delivers them: every assertion above holds unchanged. Poisoned everywhere, every event of
those serials must be in the DLQ (with Klaviyo's 400) and nowhere else — not stored, not in a record, no state
— while every other serial is delivered as above.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from klaviyo_sandbox.testing import SandboxServer
from passbridge.event import PassEvent
from passbridge.keys import ACTIVE_ACCOUNTS, account_keys
from tests.conftest import async_wait_for
from worker import dlq, history
from worker.plan import next_state
from worker.state import PassState

from .e2e import Pipeline, Workers, worker_env
from .helpers import pass_event

pytestmark = pytest.mark.slow

KINDS = ["created", "installed", "updated", "updated", "uninstalled", "deleted"]
BULK_OPS = ["bulk_import_profiles", "bulk_create_data_source_records", "bulk_create_events"]
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
    #: Serial indices whose writes the sandbox refuses as bad items (in every account of the example) ...
    poisoned: frozenset[int] = frozenset()
    #: ... on the bulk endpoints only (the per-event fallback delivers them), or everywhere (dead-lettered).
    poison_bulk_only: bool = True


@st.composite
def scenarios(draw: st.DrawFn, poison: bool = False) -> Scenario:
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
        poisoned=draw(st.frozensets(st.integers(0, 7), max_size=2)) if poison else frozenset(),
        poison_bulk_only=draw(st.booleans()) if poison else True,
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


@pytest.fixture
def bulk_workers(
    redis_url: str, sandbox_server: SandboxServer, secret_key: str, tmp_path: Path
) -> Iterator[Workers]:
    """Worker processes in ``bulk`` mode (every write through the bulk endpoints, however small the backlog)."""
    logs = tmp_path / "logs"
    logs.mkdir()
    env = worker_env(
        redis_url, sandbox_server.url, secret_key, tmp_path / "state", PASSBRIDGE_WORKER_SYNC_MODE="bulk"
    )
    w = Workers(env, logs)
    yield w
    w.stop_all()


PROPERTY_SETTINGS = settings(
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


@pytest.mark.timeout(300)
@PROPERTY_SETTINGS
@given(sc=scenarios())
async def test_nothing_lost_nothing_twice_in_order_under_faults_and_kills(
    pipeline: Pipeline, workers: Workers, sc: Scenario
) -> None:
    await run_example(pipeline, workers, sc, "adaptive")


@pytest.mark.timeout(300)
@PROPERTY_SETTINGS
@given(sc=scenarios(poison=True))
async def test_bulk_mode_nothing_lost_nothing_twice_in_order_under_faults_kills_and_rejections(
    pipeline: Pipeline, bulk_workers: Workers, sc: Scenario
) -> None:
    await run_example(pipeline, bulk_workers, sc, "bulk")


async def run_example(pipeline: Pipeline, workers: Workers, sc: Scenario, mode: str) -> None:
    """One example: enqueue under faults and kills, wait for the drain, check every guarantee."""
    example = next(_examples)
    if not workers.alive:
        workers.start(2)
    events = build_events(sc, example)
    accounts = sorted({e.account_id for e in events})
    pipeline.accounts.clear()
    for account_id in accounts:
        await pipeline.add_account(account_id)
    poisoned = sorted(f"S{s}" for s in sc.poisoned)
    pipeline.sandbox.set_faults(
        error_rates={503: sc.error_503, 429: sc.error_429},
        drop_rate=sc.drop_after_processing,
        drop_after_processing=True,
        latency_ms=sc.latency_ms,
        seed=sc.seed,
        reject_external_ids=poisoned,
        reject_operations=BULK_OPS if sc.poison_bulk_only else [],
    )
    # Poisoned everywhere: those serials' events must end in the DLQ, and only there.
    dead = [] if sc.poison_bulk_only else [e for e in events if e.serial_number in poisoned]
    dead_ids = {e.event_id for e in dead}
    delivered = [e for e in events if e.event_id not in dead_ids]
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
    duplicates = sum(pipeline.duplicate_events(a) for a in accounts)
    note(
        f"{mode}: {len(events)} events, {len(accounts)} accounts, {time.monotonic() - started:.1f} s, "
        f"dup sends {duplicates}, poisoned {poisoned} ({'bulk only' if sc.poison_bulk_only else 'everywhere'})"
    )
    print(
        f"\n{mode} example {example}: {len(events)} events, {len(accounts)} accounts, kills={len(sc.kill_after)}, "
        f"503={sc.error_503} 429={sc.error_429} drop={sc.drop_after_processing}, poisoned={poisoned} "
        f"{'bulk-only' if sc.poison_bulk_only else 'everywhere'}, duplicate sends={duplicates}, "
        f"{time.monotonic() - started:.1f} s"
    )

    # Stored once each by unique_id, nothing missing (nothing of a dead-lettered serial).
    for account_id in accounts:
        stored = pipeline.stored_unique_ids(account_id)
        assert len(stored) == len(set(stored))
        assert sorted(stored) == sorted(e.event_id for e in delivered if e.account_id == account_id)
    # A duplicate send needs a kill or a lost answer: never after a clean success.
    if not sc.kill_after and not sc.drop_after_processing:
        assert duplicates == 0

    arrival = {e.event_id: i for i, e in enumerate(events)}
    by_serial: dict[tuple[str, str], list[PassEvent]] = {}
    for e in events:
        by_serial.setdefault((e.account_id, e.serial_number), []).append(e)
    for (account_id, serial), evs in by_serial.items():
        if evs[0].event_id in dead_ids:
            await check_dead(pipeline, account_id, serial, evs)
            continue
        await check_order(pipeline, account_id, serial, evs, arrival)
        await check_final_state(pipeline, account_id, serial, evs, arrival)
    for account_id in accounts:
        await check_clean(pipeline, account_id, {e.event_id for e in dead if e.account_id == account_id})


async def check_dead(pipeline: Pipeline, account_id: str, serial: str, evs: list[PassEvent]) -> None:
    """A serial Klaviyo refuses everywhere: each event dead-lettered once with the 400, nothing applied."""
    entries = await dlq.list_entries(pipeline.redis, account_id, dlq.DLQFilter(serial=serial))
    assert sorted(x.event_id for x in entries) == sorted(e.event_id for e in evs)
    for entry in entries:
        assert entry.reason.startswith("permanent error: HTTP 400"), entry
        assert entry.errors[-1]["status"] == 400
        assert entry.errors[-1]["code"] == "invalid"
    assert await pipeline.redis.hget(account_keys(account_id).state, serial) is None
    assert serial not in pipeline.records(account_id)
    timeline = await history.timeline(pipeline.redis, account_id, serial)
    assert [h.kind for h in timeline if h.kind == "written"] == []
    assert sorted(h.event_id for h in timeline if h.kind == "dead") == sorted(e.event_id for e in evs)


async def check_order(
    pipeline: Pipeline, account_id: str, serial: str, evs: list[PassEvent], arrival: dict[str, int]
) -> None:
    """Each event was written only after every earlier event (occurred_at, then arrival) that was already queued
    when the worker picked it.

    A worker picks a serial's next events from the mailbox head it read in the settle step of the previous
    round (or at the claim), so an event ``E`` that was ingested before the settle preceding ``F``'s and sorts
    before ``F`` must be written before ``F``. (An ``E`` that arrives while ``F`` is already in flight is
    written after it and applied as stale: that is allowed and checked by the final state.)

    A round may carry several events (the bulk strategy coalesces a serial's queued events): they settle in
    one step, their ``written`` entries appended together, in mailbox order, with one time and worker. The
    settle preceding ``F``'s is the last one before ``F``'s round; a round is taken as the run of consecutive
    ``written`` entries of one time and worker (two rounds settled in the same millisecond by the same worker
    merge, which only ever makes the check more lenient, never wrong).
    """
    timeline = await history.timeline(pipeline.redis, account_id, serial)
    ingested = {h.event_id: i for i, h in enumerate(timeline) if h.kind == "ingested"}
    written = [h.event_id for h in timeline if h.kind == "written"]
    assert sorted(written) == sorted(e.event_id for e in evs), "each event written exactly once"
    written_at = {h.event_id: i for i, h in enumerate(timeline) if h.kind == "written"}
    settled = sorted(i for i, h in enumerate(timeline) if h.kind in ("written", "dead"))
    round_start: dict[int, int] = {}
    for i, h in enumerate(timeline):
        if h.kind != "written":
            continue
        prev = timeline[i - 1] if i else None
        same_round = (
            prev is not None
            and prev.kind == "written"
            and prev.at_ms == h.at_ms
            and prev.detail.get("worker") == h.detail.get("worker")
        )
        round_start[i] = round_start[i - 1] if same_round else i
    picked_after = {
        h.event_id: max((j for j in settled if j < round_start[i]), default=-1)
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


async def check_clean(pipeline: Pipeline, account_id: str, dead: set[str]) -> None:
    """Only the DLQ (the ``dead`` events, nothing else), state and history remain."""
    redis = pipeline.redis
    keys = account_keys(account_id)
    assert int(await redis.get(keys.depth) or 0) == 0
    assert await redis.zcard(keys.ready) == 0
    assert await redis.zcard(keys.leased) == 0
    assert await redis.hlen(keys.lease_tokens) == 0
    assert await redis.hlen(keys.retries) == 0
    assert [k async for k in redis.scan_iter(match=keys.mailbox_prefix + "*")] == []
    assert {x.event_id for x in await dlq.list_entries(redis, account_id)} == dead
    assert await dlq.count(redis, account_id) == len(dead)
    assert await redis.zscore(ACTIVE_ACCOUNTS, account_id) is None
