"""Bulk sending (issue 6) end to end: real ``passbridge worker`` processes in ``bulk`` or ``adaptive`` mode, the
Klaviyo sandbox over HTTP, a real Redis.

What the sandbox saw is the evidence: its request counts per operation and status, the profile bulk-import
jobs it holds (with every item they carried), how often each WalletPass record was ingested, and the metric
events it stored (by ``unique_id``, with their time).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from klaviyo_sandbox.testing import SandboxServer
from passbridge.event import PassEvent
from passbridge.keys import PACE_BACKLOGS, account_keys
from tests.conftest import async_wait_for
from worker import dlq, history
from worker.plan import coalesce, record_of
from worker.state import PassState

from .e2e import RATE_SCALE, Pipeline, Workers, drained, worker_env
from .helpers import HIGH_WATER, REPLAY_RESERVE, pass_event

pytestmark = pytest.mark.slow

StartWorkers = Callable[..., Workers]
Counts = dict[str, dict[str, int]]

PROFILE_OPS = ("create_or_update_profile", "bulk_import_profiles")
RECORD_OPS = ("create_data_source_record", "bulk_create_data_source_records")
EVENT_OPS = ("create_event", "bulk_create_events")
BULK_OPS = ("bulk_import_profiles", "bulk_create_data_source_records", "bulk_create_events")


@pytest.fixture
def start_workers(
    redis_url: str, sandbox_server: SandboxServer, secret_key: str, tmp_path: Path
) -> Iterator[StartWorkers]:
    """Start ``n`` worker processes in a sync mode (``PASSBRIDGE_WORKER_SYNC_MODE``); all stopped after."""
    made: list[Workers] = []

    def start(mode: str, n: int = 1, **extra: str) -> Workers:
        logs = tmp_path / f"logs-{len(made)}"
        logs.mkdir()
        env = worker_env(
            redis_url,
            sandbox_server.url,
            secret_key,
            tmp_path / "state",
            PASSBRIDGE_WORKER_SYNC_MODE=mode,
            **extra,
        )
        workers = Workers(env, logs)
        made.append(workers)
        workers.start(n)
        workers.wait_express()
        return workers

    yield start
    for workers in made:
        workers.stop_all()


def counts(pipeline: Pipeline) -> Counts:
    """The sandbox's answers so far: operation → status → n."""
    raw: dict[str, dict[str, int]] = pipeline.sandbox.requests(limit=0)["counts"]
    return {op: {s: int(n) for s, n in by.items()} for op, by in raw.items()}


def delta(before: Counts, after: Counts, op: str, status: int | None = None) -> int:
    """Requests to ``op`` (answered ``status``, if given) between two snapshots."""

    def total(c: Counts) -> int:
        by = c.get(op, {})
        return sum(by.values()) if status is None else by.get(str(status), 0)

    return total(after) - total(before)


def jobs_items(pipeline: Pipeline, account_id: str) -> list[str]:
    """The external_id of every profile every bulk-import job of the account carried, in order."""
    state = pipeline.server.app.runtime.states[pipeline.accounts[account_id]]
    return [str(p["attributes"]["external_id"]) for job in state.import_jobs.values() for p in job.profiles]


def import_errors(pipeline: Pipeline, account_id: str) -> list[dict[str, Any]]:
    state = pipeline.server.app.runtime.states[pipeline.accounts[account_id]]
    return [e["attributes"] for job in state.import_jobs.values() for e in job.errors]


def record_writes(pipeline: Pipeline, account_id: str) -> dict[str, int]:
    """How many times the sandbox ingested each WalletPass record (by serial)."""
    state = pipeline.server.app.runtime.states[pipeline.accounts[account_id]]
    return {r.record_id: r.writes for records in state.records.values() for r in records.values()}


def stored_times(pipeline: Pipeline, account_id: str) -> dict[str, int]:
    """unique_id → the stored metric event's time (epoch seconds)."""
    state = pipeline.server.app.runtime.states[pipeline.accounts[account_id]]
    return {str(e.unique_id): e.timestamp for e in list(state.events.values())}


def fold(events: list[PassEvent]) -> PassState:
    """The serial's state after its events in mailbox order (occurred_at, then arrival)."""
    ordered = sorted(events, key=lambda e: e.occurred_at)
    state = coalesce(None, ordered).new_state
    assert state is not None
    return state


def iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def backlog(account_id: str, serials: int, per_serial: int, *, fresh: bool = False) -> list[PassEvent]:
    """``per_serial`` events per serial (created, installed, updated...; the last ones out of order), received
    an hour ago unless ``fresh`` (a backlog, not events that just arrived)."""
    kinds = ["created", "installed", "updated", "updated", "uninstalled"]
    received = datetime.now(UTC) - (timedelta(0) if fresh else timedelta(hours=1))
    out = []
    for s in range(serials):
        for n in range(per_serial):
            # Occurred out of arrival order for the last two events: the mailbox sorts them.
            offset = n if n < per_serial - 2 else (per_serial - 1 if n == per_serial - 2 else per_serial - 2)
            out.append(
                pass_event(
                    account_id,
                    f"S{s:03d}",
                    n,
                    kind=kinds[min(n, len(kinds) - 1)],
                    offset_s=offset + 0.5,
                    received_at=received,
                    properties={"points": n * 10, "tier": "gold" if n % 2 else "silver"},
                )
            )
    return out


# --- (a) coalescing ------------------------------------------------------------------------------------------


async def test_bulk_mode_coalesces_each_serial_into_one_profile_and_one_record_write(
    pipeline: Pipeline, start_workers: StartWorkers
) -> None:
    await pipeline.add_account("acme")
    events = backlog("acme", serials=12, per_serial=4)
    await pipeline.put(events)
    before = counts(pipeline)
    workers = start_workers("bulk")
    await drained(pipeline, workers)
    after = counts(pipeline)
    serials = sorted({e.serial_number for e in events})

    # Nothing went by single calls; every write went through the bulk endpoints, each request carrying many
    # serials (12 serials, at most 4 requests per kind).
    for op in ("create_or_update_profile", "create_data_source_record", "create_event"):
        assert delta(before, after, op) == 0, op
    assert 1 <= delta(before, after, "bulk_import_profiles", 202) <= 4
    assert 1 <= delta(before, after, "bulk_create_data_source_records", 204) <= 4
    assert 1 <= delta(before, after, "bulk_create_events", 202) <= 4
    assert delta(before, after, "get_errors_for_bulk_import_profiles_job") == 0

    # One profile and one record write per serial, whatever the number of its events.
    assert sorted(jobs_items(pipeline, "acme")) == serials
    assert record_writes(pipeline, "acme") == dict.fromkeys(serials, 1)

    # One metric event per event, with its own unique_id and its true time.
    times = stored_times(pipeline, "acme")
    assert times == {e.event_id: int(e.occurred_at.timestamp()) for e in events}

    # The final record, profile and stored state are the fold of the serial's events.
    records = pipeline.records("acme")
    for serial in serials:
        final = fold([e for e in events if e.serial_number == serial])
        expected = record_of(final)
        record = records[serial]
        for key in ("serial_number", "status", "pass_url", "pass_type", "platform"):
            assert record[key] == expected[key], (serial, key)
        assert record["updated_at"] == expected["updated_at"]
        assert record["created_at"] == expected["created_at"]
        stored = PassState.from_json(await pipeline.redis.hget(account_keys("acme").state, serial))
        # (seq: the newest event's arrival sequence, which the fold here does not know)
        assert stored.model_dump(exclude={"withheld", "seq"}) == final.model_dump(exclude={"withheld", "seq"})
        assert stored.seq > 0
        profile = pipeline.sandbox.profile(serial, pipeline.accounts["acme"])
        assert profile is not None
        props = profile["attributes"]["properties"]
        assert props["wallet_pass_status"] == final.status.value
        assert props["points"] == final.properties["points"]
        # Each event went to the serial's timeline as written, in order, in one round.
        timeline = await history.timeline(pipeline.redis, "acme", serial)
        assert sorted(h.event_id for h in timeline if h.kind == "written") == sorted(
            e.event_id for e in events if e.serial_number == serial
        )
    assert await dlq.count(pipeline.redis, "acme") == 0


# --- (b) partial failures ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("single_op", "bulk_op", "bulk_status"),
    [
        ("create_event", "bulk_create_events", 202),
        ("create_data_source_record", "bulk_create_data_source_records", 204),
        ("create_or_update_profile", "bulk_import_profiles", 202),
    ],
    ids=["events", "records", "profiles"],
)
async def test_rejected_items_are_isolated_dead_lettered_and_replayed(
    pipeline: Pipeline, start_workers: StartWorkers, single_op: str, bulk_op: str, bulk_status: int
) -> None:
    await pipeline.add_account("acme")
    events = backlog("acme", serials=20, per_serial=2)
    poisoned = {"S003", "S011", "S017"}
    bad = [e for e in events if e.serial_number in poisoned]
    good = [e for e in events if e.serial_number not in poisoned]
    pipeline.sandbox.set_faults(reject_external_ids=sorted(poisoned), operations=[single_op, bulk_op])
    await pipeline.put(events)
    before = counts(pipeline)
    workers = start_workers("bulk")
    await drained(pipeline, workers)
    after = counts(pipeline)

    # Every other serial is delivered in full.
    assert sorted(pipeline.stored_unique_ids("acme")) == sorted(e.event_id for e in good)
    records = pipeline.records("acme")
    for serial in {e.serial_number for e in good}:
        final = fold([e for e in good if e.serial_number == serial])
        assert records[serial]["updated_at"] == iso(final.updated_at)

    # The poisoned serials' events, and only those, are in the DLQ with Klaviyo's error.
    entries = await dlq.list_entries(pipeline.redis, "acme")
    assert sorted(x.event_id for x in entries) == sorted(e.event_id for e in bad)
    for entry in entries:
        assert entry.serial in poisoned
        assert entry.reason.startswith("permanent error: HTTP 400")
        (err,) = entry.errors
        assert (err["status"], err["code"], err["endpoint"]) == (400, "invalid", single_op)
        # Klaviyo's detail names the bad value; the pointer says where it sat.
        assert entry.serial in err["detail"]
        assert "(at /data/attributes/" in err["message"]

    if bulk_op == "bulk_import_profiles":
        # A job is never refused whole: each bad item came back as an import error naming it.
        assert delta(before, after, bulk_op, 400) == 0
        assert sorted(
            e["original_payload"]["attributes"]["external_id"] for e in import_errors(pipeline, "acme")
        ) == (sorted(poisoned))
    else:
        # A bulk request refused whole (all or nothing) was split at the item its pointer named: one 400 per
        # bad item, never the whole request again and again.
        assert delta(before, after, bulk_op, 400) == len(poisoned)
        assert delta(before, after, bulk_op, bulk_status) >= 1
    # The serials fell back to one event at a time: the bad item was refused once per event, then dead-lettered.
    assert delta(before, after, single_op, 400) == len(bad)

    # The cause is fixed; replay delivers them (coalesced again) and the DLQ empties.
    pipeline.sandbox.clear_faults()
    replayed = await dlq.replay(
        pipeline.redis,
        "acme",
        [e.event_id for e in bad],
        high_water=HIGH_WATER,
        reserve=REPLAY_RESERVE,
        history_retention_ms=86_400_000,
    )
    assert replayed.replayed == len(bad)
    await drained(pipeline, workers)
    assert sorted(pipeline.stored_unique_ids("acme")) == sorted(e.event_id for e in events)
    assert await dlq.count(pipeline.redis, "acme") == 0
    records = pipeline.records("acme")
    for serial in poisoned:
        final = fold([e for e in bad if e.serial_number == serial])
        assert records[serial]["updated_at"] == iso(final.updated_at)
        assert records[serial]["status"] == final.status.value


def _fail_s1(pipeline: Pipeline, operations: Iterable[str], fault: str) -> None:
    """Make the sandbox fail serial S1's writes at ``operations`` for good: refused as a bad item
    (``rejected``), or 503 until the one attempt the workers get runs out (``exhausted``)."""
    if fault == "rejected":
        pipeline.sandbox.set_faults(reject_external_ids=["S1"], operations=list(operations))
    else:
        pipeline.sandbox.set_faults(error_rates={503: 1.0}, operations=list(operations))


async def _dead_lettered_deletion(
    pipeline: Pipeline,
    start_workers: StartWorkers,
    mode: str,
    operations: Iterable[str],
    fault: str,
    minute: int,
) -> tuple[Workers, PassEvent]:
    """S1 created and synced, then its deletion (at ``minute``) dead-lettered by lasting faults at
    ``operations``, the workers getting one attempt. Returns the workers and the deletion; the faults stay."""
    await pipeline.add_account("acme")
    workers = start_workers(mode, PASSBRIDGE_RETRY_MAX_ATTEMPTS="1")
    await pipeline.put([pass_event("acme", "S1", 0, kind="created")])
    await drained(pipeline, workers)
    _fail_s1(pipeline, operations, fault)
    deleted = pass_event("acme", "S1", minute, kind="deleted")
    await pipeline.put([deleted])
    await drained(pipeline, workers)
    assert [e.event_id for e in await dlq.list_entries(pipeline.redis, "acme")] == [deleted.event_id]
    return workers, deleted


async def _stored_s1(pipeline: Pipeline) -> PassState:
    return PassState.from_json(await pipeline.redis.hget(account_keys("acme").state, "S1"))


def _profile_status_s1(pipeline: Pipeline) -> Any:
    profile = pipeline.sandbox.profile("S1", pipeline.accounts["acme"])
    assert profile is not None
    return profile["attributes"]["properties"]["wallet_pass_status"]


@pytest.mark.parametrize(
    ("mode", "fault"),
    [("single", "rejected"), ("adaptive", "rejected"), ("adaptive", "exhausted"), ("bulk", "exhausted")],
)
async def test_dead_letter_after_profile_and_record_were_written_stores_their_state(
    pipeline: Pipeline, start_workers: StartWorkers, mode: str, fault: str
) -> None:
    """Only the metric event of a deletion fails (refused for good, or transient until the attempts run out)
    after its profile and record writes were accepted: the dead letter stores the deleted state, so the pass's
    next event does not make it active again in Klaviyo."""
    workers, deleted = await _dead_lettered_deletion(pipeline, start_workers, mode, EVENT_OPS, fault, 1)
    assert pipeline.records("acme")["S1"]["status"] == "deleted"
    stored = await _stored_s1(pipeline)
    assert (stored.status, stored.event_id) == ("deleted", deleted.event_id)

    pipeline.sandbox.clear_faults()
    updated = pass_event("acme", "S1", 2, kind="updated")
    await pipeline.put([updated])
    await drained(pipeline, workers)
    assert pipeline.stored_unique_ids("acme")[-1] == updated.event_id
    record = pipeline.records("acme")["S1"]
    assert (record["status"], record["updated_at"]) == ("deleted", iso(updated.occurred_at))
    assert _profile_status_s1(pipeline) == "deleted"


@pytest.mark.parametrize(
    ("mode", "fault"),
    [("single", "rejected"), ("adaptive", "rejected"), ("adaptive", "exhausted"), ("bulk", "exhausted")],
)
async def test_dead_letter_after_only_the_profile_was_written_keeps_its_state_and_rewrites_the_record(
    pipeline: Pipeline, start_workers: StartWorkers, mode: str, fault: str
) -> None:
    """A deletion's profile write is accepted, then its record write fails for good (refused, or transient
    until the attempts run out). The dead letter stores the deleted state with its record pending: the next
    event, even a late one that changes nothing, is planned from it (the profile stays deleted) and writes
    the record."""
    workers, deleted = await _dead_lettered_deletion(pipeline, start_workers, mode, RECORD_OPS, fault, 2)
    pipeline.sandbox.clear_faults()
    assert _profile_status_s1(pipeline) == "deleted"
    assert pipeline.records("acme")["S1"]["status"] == "active"
    stored = await _stored_s1(pipeline)
    assert (stored.status, stored.event_id, stored.record_pending) == ("deleted", deleted.event_id, True)

    # Occurred between the two: stale against the deletion, so it changes nothing but the pending record.
    late = pass_event("acme", "S1", 1, kind="updated")
    await pipeline.put([late])
    await drained(pipeline, workers)
    assert late.event_id in pipeline.stored_unique_ids("acme")
    assert _profile_status_s1(pipeline) == "deleted"
    record = pipeline.records("acme")["S1"]
    assert (record["status"], record["updated_at"]) == ("deleted", iso(deleted.occurred_at))
    stored = await _stored_s1(pipeline)
    assert (stored.status, stored.event_id, stored.record_pending) == ("deleted", deleted.event_id, False)


async def test_a_throttle_after_a_profile_job_was_created_never_sends_its_profiles_again_as_a_new_job(
    pipeline: Pipeline, start_workers: StartWorkers
) -> None:
    """The job was created (202), then reading its import errors is throttled: the job's profiles are a
    failure for their serials' retry policy (here: one attempt, so the DLQ), never put back in the lane and
    sent again as a new job that would overwrite the first job's markers (finding 4b)."""
    await pipeline.add_account("acme")
    events = backlog("acme", serials=4, per_serial=1)
    serials = sorted({e.serial_number for e in events})
    # An import error for S001 makes the worker read the job's error list; every read of it is throttled.
    pipeline.sandbox.set_faults(
        error_rates={429: 1.0},
        operations=["get_errors_for_bulk_import_profiles_job"],
        reject_external_ids=["S001"],
        reject_operations=["bulk_import_profiles"],
    )
    await pipeline.put(events)
    before = counts(pipeline)
    workers = start_workers("bulk", PASSBRIDGE_RETRY_MAX_ATTEMPTS="1")
    try:
        await drained(pipeline, workers, timeout=30)
    finally:
        pipeline.sandbox.clear_faults()
    after = counts(pipeline)
    assert delta(before, after, "get_errors_for_bulk_import_profiles_job", 429) >= 1
    # One job carried each serial, once.
    assert sorted(jobs_items(pipeline, "acme")) == serials
    entries = await dlq.list_entries(pipeline.redis, "acme")
    assert sorted(x.event_id for x in entries) == sorted(e.event_id for e in events)
    for entry in entries:
        (err,) = entry.errors
        assert err["kind"] == "transient"
        assert "profile import job" in err["message"]


async def test_bulk_request_rejected_without_a_pointer_is_split_in_halves(
    pipeline: Pipeline, start_workers: StartWorkers
) -> None:
    """A 400 that names no item (the sandbox's injected status errors carry no pointer into the list) cannot
    isolate anything by pointer: the request is split in halves down to single items, which then take the
    per-event path. With the bulk endpoint refusing everything, every serial still arrives (by single calls)
    and the number of refused bulk requests stays bounded (a binary split tree: fewer than 2n)."""
    await pipeline.add_account("acme")
    events = backlog("acme", serials=8, per_serial=1)
    pipeline.sandbox.set_faults(error_rates={400: 1.0}, operations=["bulk_create_events"])
    await pipeline.put(events)
    before = counts(pipeline)
    workers = start_workers("bulk")
    await drained(pipeline, workers)
    after = counts(pipeline)
    assert sorted(pipeline.stored_unique_ids("acme")) == sorted(e.event_id for e in events)
    assert await dlq.count(pipeline.redis, "acme") == 0
    refused = delta(before, after, "bulk_create_events", 400)
    assert len(events) <= refused < 2 * len(events)
    assert delta(before, after, "create_event", 202) == len(events)


@pytest.mark.parametrize("shape", ["relative", "unnamed"])
async def test_import_errors_that_do_not_point_into_the_job_never_count_as_written(
    pipeline: Pipeline, start_workers: StartWorkers, shape: str
) -> None:
    """Import errors worded otherwise than the sandbox's default (a pointer relative to the profile; the bare
    attributes as original_payload, or none at all): a refused profile is never settled as synced."""
    await pipeline.add_account("acme")
    events = backlog("acme", serials=12, per_serial=2)
    poisoned = {"S003", "S007"}
    bad = [e for e in events if e.serial_number in poisoned]
    good = [e for e in events if e.serial_number not in poisoned]
    pipeline.sandbox.set_faults(
        reject_external_ids=sorted(poisoned),
        operations=["create_or_update_profile", "bulk_import_profiles"],
        import_error_shape=shape,
    )
    await pipeline.put(events)
    before = counts(pipeline)
    workers = start_workers("bulk")
    await drained(pipeline, workers)
    after = counts(pipeline)
    errors = import_errors(pipeline, "acme")
    assert len(errors) == len(poisoned)
    assert all(not e["source"]["pointer"].startswith("/data/attributes/profiles/") for e in errors)

    # The refused profiles' events are dead-lettered (found by the per-event path), not settled as synced.
    entries = await dlq.list_entries(pipeline.redis, "acme")
    assert sorted(x.event_id for x in entries) == sorted(e.event_id for e in bad)
    for serial in poisoned:
        assert pipeline.sandbox.profile(serial, pipeline.accounts["acme"]) is None
        assert await pipeline.redis.hget(account_keys("acme").state, serial) is None
    # Everything else is delivered in full.
    assert sorted(pipeline.stored_unique_ids("acme")) == sorted(e.event_id for e in good)
    for serial in {e.serial_number for e in good}:
        assert pipeline.sandbox.profile(serial, pipeline.accounts["acme"]) is not None
    singles = delta(before, after, "create_or_update_profile")
    if shape == "relative":
        # Each error still names its item (its payload's external_id): only the refused serials went one
        # event at a time.
        assert singles == len(bad)
    else:
        # Nothing names the failed items: every item of the job counts as not written and is upserted alone.
        assert singles >= len(good) // 2 + len(bad)


# --- (c) identity conflicts inside a profile job --------------------------------------------------------------


async def test_identity_conflict_in_a_profile_job_falls_back_and_is_resolved(
    pipeline: Pipeline, start_workers: StartWorkers
) -> None:
    await pipeline.add_account("acme")
    shared = "family@example.com"
    events = backlog("acme", serials=6, per_serial=2)
    events = [
        e.model_copy(update={"email": shared}) if e.serial_number in ("S001", "S004") else e for e in events
    ]
    await pipeline.put(events)
    before = counts(pipeline)
    workers = start_workers("bulk")
    await drained(pipeline, workers)
    after = counts(pipeline)

    # The job reported the conflict for exactly one of the two, mapped to its item.
    (err,) = import_errors(pipeline, "acme")
    assert err["code"] == "duplicate_profile"
    loser = str(err["original_payload"]["attributes"]["external_id"])
    winner = ({"S001", "S004"} - {loser}).pop()
    # That serial fell back to single profile writes, which resolved the conflict (409 once, then written
    # without the email); nothing was dead-lettered and every event arrived.
    assert delta(before, after, "create_or_update_profile", 409) == 1
    assert (
        delta(before, after, "create_or_update_profile", 200)
        + delta(before, after, "create_or_update_profile", 201)
        >= 1
    )
    assert await dlq.count(pipeline.redis, "acme") == 0
    assert sorted(pipeline.stored_unique_ids("acme")) == sorted(e.event_id for e in events)
    account = pipeline.accounts["acme"]
    won = pipeline.sandbox.profile(winner, account)
    lost = pipeline.sandbox.profile(loser, account)
    assert won is not None
    assert lost is not None
    assert won["attributes"]["email"] == shared
    assert lost["attributes"].get("email") is None
    assert lost["attributes"]["properties"]["wallet_pass_email"] == shared
    state = PassState.from_json(await pipeline.redis.hget(account_keys("acme").state, loser))
    assert state.withheld == {"email": shared}
    timeline = await history.timeline(pipeline.redis, "acme", loser)
    notes = [str(n) for h in timeline if h.kind == "written" for n in h.detail.get("notes", [])]
    assert any("identity conflict" in n for n in notes), timeline
    assert pipeline.records("acme")[loser]["updated_at"] == iso(
        fold([e for e in events if e.serial_number == loser]).updated_at
    )


# --- (e) adaptive mode ---------------------------------------------------------------------------------------


async def test_adaptive_small_backlog_goes_by_single_calls(
    pipeline: Pipeline, start_workers: StartWorkers
) -> None:
    await pipeline.add_account("acme")
    events = backlog("acme", serials=5, per_serial=2, fresh=True)
    await pipeline.put(events)
    before = counts(pipeline)
    # The workers at a tenth of the sandbox's rate scale: their lingers are ten times longer (four lingers of
    # the event lane are 400 ms, not 40). An item that waited four lingers for a single slot goes in bulk by
    # design, and on a loaded machine 40 ms of not being scheduled was enough for that. The sandbox allows ten
    # times the workers' rates, so nothing is throttled.
    workers = start_workers("adaptive", PASSBRIDGE_KLAVIYO_RATE_SCALE=str(RATE_SCALE / 10))
    await drained(pipeline, workers)
    after = counts(pipeline)
    for op in BULK_OPS:
        assert delta(before, after, op) == 0, op
    # Still coalesced: one profile and one record per serial, one metric event per event.
    assert delta(before, after, "create_or_update_profile") == 5
    assert delta(before, after, "create_data_source_record", 204) == 5
    assert delta(before, after, "create_event", 202) == len(events)
    assert sorted(pipeline.stored_unique_ids("acme")) == sorted(e.event_id for e in events)
    # A small account was worked on: every worker paces its backlogs for the next minute.
    assert 0 < await pipeline.redis.pttl(PACE_BACKLOGS) <= 60_000


async def test_adaptive_big_backlog_uses_the_bulk_endpoints(
    pipeline: Pipeline, start_workers: StartWorkers
) -> None:
    await pipeline.add_account("acme")
    events = backlog("acme", serials=300, per_serial=2)
    await pipeline.put(events)
    before = counts(pipeline)
    workers = start_workers("adaptive")
    await drained(pipeline, workers, timeout=90)
    after = counts(pipeline)
    for op in BULK_OPS:
        assert delta(before, after, op) >= 1, op
    # Most of the writes went in bulk requests: single calls are for fresh events, the overflow while bulk
    # slots are out, and the last few (tail) records.
    assert delta(before, after, "create_data_source_record") < 150
    assert delta(before, after, "create_or_update_profile") < 150
    assert delta(before, after, "create_event") < 300
    assert sorted(pipeline.stored_unique_ids("acme")) == sorted(e.event_id for e in events)
    writes = record_writes(pipeline, "acme")
    assert len(writes) == 300
    assert set(writes.values()) == {1}
    assert await dlq.count(pipeline.redis, "acme") == 0


# --- known bug -----------------------------------------------------------------------------------------------


async def test_adaptive_single_calls_never_resend_an_accepted_metric_event(
    pipeline: Pipeline, start_workers: StartWorkers
) -> None:
    await pipeline.add_account("acme")
    # A small backlog (28 events < small_backlog 32): adaptive mode sends everything by single calls.
    events = backlog("acme", serials=7, per_serial=4, fresh=True)
    pipeline.sandbox.set_faults(error_rates={503: 0.3}, operations=["create_event"], seed=11)
    await pipeline.put(events)
    before = counts(pipeline)
    workers = start_workers("adaptive", PASSBRIDGE_RETRY_MAX_ATTEMPTS="40")
    await drained(pipeline, workers)
    after = counts(pipeline)
    pipeline.sandbox.clear_faults()
    # The single calls met the faults. (Not every event need go by a single call: on a busy machine an item
    # that waited four lingers in its lane, 40 ms at this rate scale, goes by a bulk request, by design.)
    assert delta(before, after, "create_event", 503) >= 1
    assert sorted(pipeline.stored_unique_ids("acme")) == sorted(e.event_id for e in events)
    assert await dlq.count(pipeline.redis, "acme") == 0
    # Every metric event was accepted once, whichever endpoint carried it: none sent again after a 202.
    assert pipeline.duplicate_events("acme") == 0


async def test_adaptive_fresh_event_goes_by_single_calls_while_a_backlog_drains(
    pipeline: Pipeline, start_workers: StartWorkers
) -> None:
    await pipeline.add_account("acme")
    events = backlog("acme", serials=300, per_serial=2)
    await pipeline.put(events)
    workers = start_workers("adaptive")

    async def bulk_started() -> bool:
        return bool(jobs_items(pipeline, "acme"))

    await async_wait_for(bulk_started, timeout=30, interval=0.01)
    # The backlog is still there when the fresh event arrives.
    assert int(await pipeline.redis.get(account_keys("acme").depth) or 0) >= 100
    fresh = pass_event("acme", "FRESH", 0, kind="installed")
    await pipeline.put([fresh])
    await drained(pipeline, workers, timeout=90)
    # It jumped the backlog: its profile and record went by single calls, not in the bulk requests.
    assert "FRESH" not in jobs_items(pipeline, "acme")
    assert record_writes(pipeline, "acme")["FRESH"] == 1
    assert fresh.event_id in pipeline.stored_unique_ids("acme")
    assert len(set(jobs_items(pipeline, "acme"))) >= 200


# --- (f) historical events are sent as backfills ------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "age_s", "old_is_backfill"),
    [("single", None, True), ("adaptive", None, True), ("bulk", None, True), ("bulk", "0", False)],
    ids=["single", "adaptive-single-calls", "bulk", "bulk-no-age-rule"],
)
async def test_historical_events_are_sent_with_backfill_so_they_trigger_no_flows(
    pipeline: Pipeline, start_workers: StartWorkers, mode: str, age_s: str | None, old_is_backfill: bool
) -> None:
    await pipeline.add_account("acme")
    now = datetime.now(UTC)
    events = [
        # What the NDJSON route (and `passbridge ingest`) enqueue: source "ndjson", however recent.
        pass_event("acme", "ND", 0, kind="created", occurred_at=now - timedelta(minutes=1), source="ndjson"),
        # A live event, and one that happened days before the worker sends it (default age: 24 h).
        pass_event("acme", "LIVE", 0, kind="created", occurred_at=now - timedelta(minutes=1)),
        pass_event("acme", "OLD", 0, kind="created", occurred_at=now - timedelta(days=3)),
        pass_event("acme", "OLD", 1, kind="installed", occurred_at=now - timedelta(days=3, minutes=-1)),
    ]
    await pipeline.put(events)
    before = counts(pipeline)
    extra = {} if age_s is None else {"PASSBRIDGE_BACKFILL_AGE_S": age_s}
    if mode == "adaptive":
        # Lingers ten times longer, as in test_adaptive_small_backlog_goes_by_single_calls: under a loaded suite
        # an item once waited four lingers (40 ms) for a single slot and went in bulk, by design.
        extra["PASSBRIDGE_KLAVIYO_RATE_SCALE"] = str(RATE_SCALE / 10)
    workers = start_workers(mode, **extra)
    await drained(pipeline, workers)
    stored = pipeline.sandbox.all_events(pipeline.accounts["acme"])
    backfill = {e["attributes"]["event_properties"]["$event_id"]: e["backfill"] for e in stored}
    assert backfill == {
        "acme-ND-0": True,
        "acme-LIVE-0": False,
        "acme-OLD-0": old_is_backfill,
        "acme-OLD-1": old_is_backfill,
    }
    # Which endpoint carried them: the mode's.
    assert delta(before, counts(pipeline), "bulk_create_events", 202) == (1 if mode == "bulk" else 0)
