"""DLQ storage/replay/purge, account pauses and the per-event history, against a real Redis."""

from __future__ import annotations

import dataclasses
import time

import orjson
import pytest
from cryptography.fernet import Fernet, MultiFernet
from redis.asyncio import Redis

from passbridge.accounts import AccountState, AccountStore
from passbridge.keys import ACTIVE_ACCOUNTS, account_keys
from tests.factories import make_account
from worker import dlq, history, inspect, pause
from worker.dlq import DLQEntry, DLQFilter
from worker.queue import WorkQueue

from .helpers import (
    FILL_CODES,
    HIGH_WATER,
    REPLAY_RESERVE,
    dead_letter_head,
    fill_dlq,
    forget_dedup,
    pass_event,
    permanent_entry,
    put,
)

DAY_MS = 86_400_000


class TestDLQ:
    """Entries are listed, filtered, replayed into place and purged."""

    async def test_replay_puts_the_event_back_in_its_place(self, redis: Redis) -> None:
        await put(redis, *(pass_event("a", "S1", n) for n in range(3)))
        q = WorkQueue(redis, worker_id="w1", history_retention_ms=DAY_MS)
        now = int(time.time() * 1000)
        entry = await dead_letter_head(q, redis, "a", "S1", code="invalid", status=400, at_ms=now)
        keys = account_keys("a")
        assert entry.event_id == "a-S1-0"
        assert int(await redis.get(keys.depth)) == 2
        assert await dlq.count(redis, "a") == 1
        stored = await dlq.get(redis, "a", "a-S1-0")
        assert stored == dataclasses.replace(entry, dead_at_ms=int(await redis.zscore(keys.dlq, "a-S1-0")))
        assert entry.event["id"] == "a-S1-0"

        replayed = await dlq.replay(
            redis,
            "a",
            ["a-S1-0", "missing"],
            high_water=HIGH_WATER,
            reserve=REPLAY_RESERVE,
            history_retention_ms=DAY_MS,
        )
        assert (replayed.replayed, replayed.missing, replayed.left, replayed.depth) == (1, 1, [], 3)
        assert await dlq.count(redis, "a") == 0
        assert int(await redis.get(keys.depth)) == 3
        members = await redis.zrange(keys.mailbox("S1"), 0, -1)
        assert [orjson.loads(m[12:])["id"] for m in members] == ["a-S1-0", "a-S1-1", "a-S1-2"]
        # Its earlier errors wait in its retry record, with a fresh attempt budget.
        record = orjson.loads(await redis.hget(keys.retries, "a-S1-0"))
        assert record["attempts"] == 0
        assert record["replays"] == 1
        # ... and a fresh age: the retry policy counts it from the replay.
        assert record["replayed_ms"] >= now
        assert [e["code"] for e in record["errors"]] == ["invalid"]
        # The serial is offered again.
        assert [lease.serial for lease in (await q.claim(5)).leases] == ["S1"]
        kinds = [e.kind for e in await history.event_history(redis, "a", "a-S1-0", "S1")]
        assert kinds == ["ingested", "replayed"]

    async def test_filters(self, redis: Redis) -> None:
        await put(redis, pass_event("a", "S1", 1), pass_event("a", "S2", 1), pass_event("a", "S3", 1))
        q = WorkQueue(redis, worker_id="w1")
        await dead_letter_head(q, redis, "a", "S1", code="invalid", status=400, at_ms=1_000)
        await dead_letter_head(q, redis, "a", "S2", code="not_found", status=404, at_ms=2_000)
        await dead_letter_head(q, redis, "a", "S3", code="invalid", status=400, at_ms=3_000)

        async def ids(**kw: object) -> list[str]:
            return [e.event_id for e in await dlq.list_entries(redis, "a", DLQFilter(**kw))]  # type: ignore[arg-type]

        assert sorted(await ids()) == ["a-S1-1", "a-S2-1", "a-S3-1"]
        assert sorted(await ids(code="invalid")) == ["a-S1-1", "a-S3-1"]
        assert await ids(code="404") == ["a-S2-1"]
        assert await ids(serial="S3") == ["a-S3-1"]
        assert await ids(code="invalid", serial="S2") == []
        # The time range is checked against the entry's DLQ time (Redis time), not the synthetic worker times.
        assert DLQFilter(since_ms=1_500).matches(await dlq.get(redis, "a", "a-S2-1"))  # type: ignore[arg-type]
        assert not DLQFilter(until_ms=1_500).matches(await dlq.get(redis, "a", "a-S2-1"))  # type: ignore[arg-type]
        assert len(await dlq.list_entries(redis, "a", limit=2)) == 2

    async def test_time_filters_and_dead_at_are_on_the_dlq_clock(self, redis: Redis) -> None:
        """A worker whose clock is a day off: its entries are still found and shown by Redis time, the clock
        the DLQ's scores (and so the range query) are on."""
        await put(redis, pass_event("a", "S1", 1), pass_event("a", "S2", 1))
        q = WorkQueue(redis, worker_id="w1")
        skewed = int(time.time() * 1000)
        await dead_letter_head(q, redis, "a", "S1", code="x", status=400, at_ms=skewed - DAY_MS)
        await dead_letter_head(q, redis, "a", "S2", code="x", status=400, at_ms=skewed + DAY_MS)
        secs, micros = await redis.time()
        now = secs * 1000 + micros // 1000
        hour = DLQFilter(since_ms=now - 3_600_000, until_ms=now)
        assert sorted(e.event_id for e in await dlq.list_entries(redis, "a", hour)) == ["a-S1-1", "a-S2-1"]
        for event_id in ("a-S1-1", "a-S2-1"):
            entry = await dlq.get(redis, "a", event_id)
            assert entry is not None
            assert now - 60_000 < entry.dead_at_ms <= now
            assert hour.matches(entry)

    async def test_purge(self, redis: Redis) -> None:
        await put(redis, pass_event("a", "S1", 1), pass_event("a", "S2", 1))
        q = WorkQueue(redis, worker_id="w1")
        await dead_letter_head(q, redis, "a", "S1", code="x", status=400, at_ms=1)
        await dead_letter_head(q, redis, "a", "S2", code="x", status=400, at_ms=1)
        seen: list[int] = []
        assert await dlq.purge(redis, "a", ["a-S1-1", "a-S2-1", "nope"], progress=seen.append) == 2
        assert seen == [3]
        assert await dlq.count(redis, "a") == 0
        assert await redis.hlen(account_keys("a").dlq_entries) == 0

    async def test_an_event_id_sent_again_gets_its_own_entry(self, redis: Redis) -> None:
        """After the dedup window a client may send an event id again; if that one is dead-lettered too while
        the first still is, both stay (``x``, ``x#2``), each replayed or purged on its own with its own payload."""
        keys = account_keys("a")
        q = WorkQueue(redis, worker_id="w1", history_retention_ms=DAY_MS)
        await put(redis, pass_event("a", "S1", 0, properties={"points": 1}))
        first = await dead_letter_head(q, redis, "a", "S1", code="invalid", status=400, at_ms=1)
        await forget_dedup(redis, "a")
        await put(redis, pass_event("a", "S1", 0, properties={"points": 2}))
        second = await dead_letter_head(q, redis, "a", "S1", code="not_found", status=404, at_ms=2)
        # A different event whose id happens to look like a later entry's: it is neither replaced nor
        # taken for one of "a-S1-0"'s.
        await put(redis, pass_event("a", "S1", 9, event_id="a-S1-0#2", properties={"points": 3}))
        lookalike = await dead_letter_head(q, redis, "a", "S1", code="invalid", status=400, at_ms=3)

        listed = await dlq.list_entries(redis, "a")
        assert [(e.dlq_id, e.event_id) for e in listed] == [
            ("a-S1-0", "a-S1-0"),
            ("a-S1-0#2", "a-S1-0"),
            ("a-S1-0#2#2", "a-S1-0#2"),
        ]
        assert [e.event["x"]["points"] for e in listed] == [1, 2, 3]
        assert [e.member for e in listed] == [first.member, second.member, lookalike.member]
        assert [e.dlq_id for e in await dlq.entries_of(redis, "a", ["a-S1-0"])] == ["a-S1-0", "a-S1-0#2"]
        assert await dlq.select_ids(redis, "a", DLQFilter(code="404")) == ["a-S1-0#2"]

        # Replaying the later entry puts back its own payload, under its event id.
        assert (
            await dlq.replay(
                redis,
                "a",
                ["a-S1-0#2"],
                high_water=HIGH_WATER,
                reserve=REPLAY_RESERVE,
                history_retention_ms=DAY_MS,
            )
        ).replayed == 1
        (member,) = await redis.zrange(keys.mailbox("S1"), 0, -1)
        assert member.decode() == second.member
        record = orjson.loads(await redis.hget(keys.retries, "a-S1-0"))
        assert [e["code"] for e in record["errors"]] == ["not_found"]
        assert [e.kind for e in await history.event_history(redis, "a", "a-S1-0", "S1")][-1] == "replayed"
        first_left = await dlq.get(redis, "a", "a-S1-0")
        assert first_left is not None
        assert first_left.member == first.member
        # Dead-lettered again meanwhile: it takes the free "#2" again, beside the first.
        await dead_letter_head(q, redis, "a", "S1", code="not_found", status=404, at_ms=4)
        assert sorted(await redis.hkeys(keys.dlq_entries)) == [b"a-S1-0", b"a-S1-0#2", b"a-S1-0#2#2"]
        # Purging the first leaves the others.
        assert await dlq.purge(redis, "a", ["a-S1-0"]) == 1
        assert [e.dlq_id for e in await dlq.entries_of(redis, "a", ["a-S1-0"])] == ["a-S1-0#2"]
        assert await dlq.count(redis, "a") == 2

    async def test_attempts_of_entries_written_before_they_were_kept(self, redis: Redis) -> None:
        """Older entries store no attempt counts: their errors are every attempt when the event was never
        replayed, and of an event replayed before, the last run's are not known (not guessed)."""
        await put(redis, pass_event("a", "S1", 0), pass_event("a", "S2", 0))
        q = WorkQueue(redis, worker_id="w1")
        keys = account_keys("a")
        for serial, replays in (("S1", 0), ("S2", 2)):
            entry = await dead_letter_head(q, redis, "a", serial, at_ms=1)
            doc = orjson.loads(entry.to_json())
            del doc["attempts"], doc["attempts_total"]
            await redis.hset(keys.dlq_entries, entry.event_id, orjson.dumps(doc | {"replays": replays}))
        never, replayed = await dlq.list_entries(redis, "a")
        assert (never.last_run_attempts, never.total_attempts) == (1, 1)
        assert (replayed.last_run_attempts, replayed.total_attempts) == (None, 1)
        assert (
            await dlq.replay(
                redis, "a", ["a-S2-0"], high_water=HIGH_WATER, reserve=REPLAY_RESERVE, history_retention_ms=0
            )
        ).replayed == 1
        assert orjson.loads(await redis.hget(keys.retries, "a-S2-0"))["attempts_before"] == 1


class TestDLQScan:
    """Listing a big DLQ: pages by rank, reads entries only for a code or serial filter, can be capped."""

    async def test_filters_on_thousands_of_entries_match_a_full_read(self, redis: Redis) -> None:
        await fill_dlq(redis, "a", [f"S{n}" for n in range(6)], 500)
        keys = account_keys("a")
        scored = await redis.zrange(keys.dlq, 0, -1, withscores=True)
        raws = dict(await redis.hgetall(keys.dlq_entries))
        every = [DLQEntry.from_json(raws[m], dlq_score=s) for m, s in scored]
        assert len(every) == 3000
        scores = sorted({e.dead_at_ms for e in every})
        assert len(scores) < len(every)  # entries settled together share a score: pages cut through ties
        lo, hi = scores[len(scores) // 4], scores[3 * len(scores) // 4]
        for flt in (
            DLQFilter(),
            DLQFilter(code="invalid"),
            DLQFilter(code="404"),
            DLQFilter(serial="S4"),
            DLQFilter(code="conflict", serial="S2"),
            DLQFilter(since_ms=lo),
            DLQFilter(until_ms=hi),
            DLQFilter(since_ms=lo, until_ms=hi, code="400"),
            DLQFilter(since_ms=hi, until_ms=lo),
        ):
            expected = [e.event_id for e in every if flt.matches(e)]
            assert [e.event_id for e in await dlq.list_entries(redis, "a", flt)] == expected, flt
            assert await dlq.select_ids(redis, "a", flt) == expected, flt
            assert [e.event_id for e in await dlq.list_entries(redis, "a", flt, limit=7)] == expected[:7]
            newest = [e.event_id async for e in dlq.iter_entries(redis, "a", flt, newest_first=True)]
            assert newest == expected[::-1], flt

    async def test_a_time_range_alone_reads_no_entry(self, redis: Redis) -> None:
        await fill_dlq(redis, "a", ["S1", "S2"], 300)
        scores = sorted(
            {int(s) for _, s in await redis.zrange(account_keys("a").dlq, 0, -1, withscores=True)}
        )

        async def hmgets(flt: DLQFilter) -> tuple[int, int]:
            await redis.config_resetstat()
            found = len(await dlq.select_ids(redis, "a", flt))
            stats = await redis.info("commandstats")
            return found, int(stats.get("cmdstat_hmget", {}).get("calls", 0))

        assert await hmgets(DLQFilter(since_ms=scores[0], until_ms=scores[-1])) == (600, 0)
        found, calls = await hmgets(DLQFilter(since_ms=scores[0], code="invalid"))
        assert (found, calls > 0) == (300, True)

    async def test_entries_removed_mid_scan_hide_no_other(self, redis: Redis) -> None:
        """Another operator replays or purges entries while a listing pages through: every entry that stays
        is still listed, once, in order."""
        await fill_dlq(redis, "a", ["S1", "S2", "S3"], 300)
        order = [m.decode() for m in await redis.zrange(account_keys("a").dlq, 0, -1)]
        seen: list[str] = []
        removed: set[str] = set()
        async for entry in dlq.iter_entries(redis, "a"):
            seen.append(entry.event_id)
            if len(seen) in (dlq.CHUNK, 2 * dlq.CHUNK):
                # Some already listed go; after the first page also the last one listed (the scan's place).
                gone = order[len(seen) - 150 : len(seen) - 100]
                if len(seen) == dlq.CHUNK:
                    gone.append(seen[-1])
                removed |= set(gone)
                assert await dlq.purge(redis, "a", gone) == len(gone)
        assert seen == order

    async def test_newest_first_with_entries_removed_mid_scan(self, redis: Redis) -> None:
        await fill_dlq(redis, "a", ["S1", "S2", "S3"], 300)
        order = [m.decode() for m in await redis.zrange(account_keys("a").dlq, 0, -1, desc=True)]
        seen: list[str] = []
        async for entry in dlq.iter_entries(redis, "a", newest_first=True):
            seen.append(entry.event_id)
            if len(seen) == dlq.CHUNK:
                assert await dlq.purge(redis, "a", [*order[50:100], seen[-1]]) == 51
        assert seen == order

    async def test_a_budget_caps_the_entries_read(self, redis: Redis) -> None:
        await fill_dlq(redis, "a", ["S1"], 450)
        order = [m.decode() for m in await redis.zrange(account_keys("a").dlq, 0, -1)]
        invalid = [i for i in order if FILL_CODES[int(i.rsplit("-", 1)[1]) % len(FILL_CODES)][0] == "invalid"]
        budget = dlq.Budget(limit=300)
        found = await dlq.select_ids(redis, "a", DLQFilter(code="invalid"), budget=budget)
        assert found == [i for i in invalid if order.index(i) < 300]
        assert (budget.examined, budget.exhausted) == (300, True)
        budget = dlq.Budget(limit=450)
        assert await dlq.select_ids(redis, "a", DLQFilter(code="invalid"), budget=budget) == invalid
        assert (budget.examined, budget.exhausted) == (450, False)


@pytest.fixture
def store(redis: Redis) -> AccountStore:
    return AccountStore(redis, MultiFernet([Fernet(Fernet.generate_key())]))


class TestPause:
    """Auth pauses stop claims, mark the registry, and end on resume, probe or operator update."""

    async def test_auth_pause_and_resume(self, redis: Redis, store: AccountStore) -> None:
        await make_account(redis, store.cipher, "a")
        await put(redis, pass_event("a", "S1", 1))
        assert await pause.pause_account(redis, store, "a", "HTTP 401")
        assert not await pause.pause_account(redis, store, "a", "again")  # keeps the first pause
        account = await store.get("a")
        assert account.state is AccountState.paused
        assert account.state_reason == "HTTP 401"
        q = WorkQueue(redis, worker_id="w")
        assert (await q.claim(5)).leases == []
        assert await pause.reconcile(redis, store, "a", probe=_false) == "still_paused"
        assert (await q.claim(5)).leases == []
        assert await pause.reconcile(redis, store, "a", probe=_true) == "resumed"
        assert (await store.get("a")).state is AccountState.connected
        assert await redis.zscore(ACTIVE_ACCOUNTS, "a") is not None
        assert [lease.serial for lease in (await q.claim(5)).leases] == ["S1"]
        (interval,) = await pause.pause_intervals(redis, "a")
        assert interval[0] <= interval[1]
        assert await pause.resume_account(redis, store, "a") is None

    async def test_operator_state_is_mirrored(self, redis: Redis, store: AccountStore) -> None:
        await make_account(redis, store.cipher, "a")
        await put(redis, pass_event("a", "S1", 1))
        await store.set_state("a", AccountState.disconnected, "offboarding")
        assert await pause.reconcile(redis, store, "a") == "paused"
        p = await pause.get_pause(redis, "a")
        assert p is not None
        assert (p.kind, p.reason) == ("operator", "offboarding")
        # A probe does not lift an operator's pause; reconnecting does.
        assert await pause.reconcile(redis, store, "a", probe=_true) == "still_paused"
        await store.set_state("a", AccountState.connected)
        assert await pause.reconcile(redis, store, "a") == "resumed"
        assert await pause.get_pause(redis, "a") is None

    async def test_a_pause_without_since_ms_is_still_resumed(self, redis: Redis, store: AccountStore) -> None:
        """A late write after a resume could leave a pause hash without ``since_ms`` (a race of the old
        code): claims treat any pause hash as a pause, so resume must delete it too."""
        await make_account(redis, store.cipher, "a")
        await put(redis, pass_event("a", "S1", 1))
        keys = account_keys("a")
        await redis.hset(keys.paused, "registry", "synced")
        q = WorkQueue(redis, worker_id="w")
        assert (await q.claim(5)).leases == []
        # The registry says connected: the sweep's reconcile resumes it, for good this time.
        assert await pause.reconcile(redis, store, "a", probe=_false) == "resumed"
        assert not await redis.exists(keys.paused)
        assert await pause.pause_intervals(redis, "a") == []  # no start, so no interval to log
        assert [lease.serial for lease in (await q.claim(5)).leases] == ["S1"]
        assert await pause.resume_account(redis, store, "a") is None

    async def test_late_pause_writes_do_not_recreate_a_resumed_pause(
        self, redis: Redis, store: AccountStore
    ) -> None:
        await make_account(redis, store.cipher, "a")
        keys = account_keys("a")
        assert await pause.pause_account(redis, store, "a", "HTTP 401")
        assert await pause.set_if_paused(redis, "a", {"probed_ms": 5})
        assert await redis.hget(keys.paused, "probed_ms") == b"5"
        assert await pause.resume_account(redis, store, "a") is not None
        # What a pause's registry sync or a sweep's probe writes once a resume got in before it.
        assert not await pause.set_if_paused(redis, "a", {"registry": "synced"})
        assert not await pause.set_if_paused(redis, "a", {"probed_ms": 6})
        assert not await redis.exists(keys.paused)
        # A pause of an account already paused (its start kept) still syncs the registry field.
        assert await pause.pause_account(redis, store, "a", "HTTP 401")
        await redis.hset(keys.paused, "registry", "pending")
        assert not await pause.pause_account(redis, store, "a", "again")
        assert (await pause.get_pause(redis, "a")) == pause.Pause(
            "a", int(await redis.hget(keys.paused, "since_ms")), "auth", "HTTP 401", True
        )


async def _true(_: str) -> bool:
    return True


async def _false(_: str) -> bool:
    return False


class TestHistory:
    """Entries round-trip and are found by event id."""

    def test_entry_round_trip(self) -> None:
        raw = history.entry(history.HistoryKind.attempt, "e1", 123, status=503, code="", worker="w")
        parsed = history.parse(raw)
        assert parsed == history.HistoryEntry(123, "attempt", "e1", {"status": 503, "worker": "w"})
        assert parsed.to_doc() == {
            "at_ms": 123,
            "kind": "attempt",
            "event_id": "e1",
            "status": 503,
            "worker": "w",
        }

    async def test_ingested_is_read_from_the_mailbox_then_stored_once_by_the_engine(
        self, redis: Redis
    ) -> None:
        ev = pass_event("a", "S7", 1)
        await put(redis, ev)
        keys = account_keys("a")
        received_ms = int(ev.received_at.timestamp() * 1000)
        # The producer wrote no history; the pending event's step comes from its mailbox entry.
        assert await redis.llen(keys.history("S7")) == 0
        assert await history.timeline(redis, "a", "S7") == [
            history.HistoryEntry(received_ms, "ingested", "a-S7-1", {}, stamp=1)
        ]
        # Dead-lettered: the engine stores "ingested" with "dead", in one step.
        q = WorkQueue(redis, worker_id="w1", history_retention_ms=DAY_MS)
        claimed = (await q.claim(5)).leases[0]
        (member,) = await redis.zrange(keys.mailbox("S7"), 0, 0)
        now = int(time.time() * 1000)
        dead = history.entry(history.HistoryKind.dead, "a-S7-1", now, reason="permanent")
        entry = permanent_entry(claimed.worker_id, claimed.serial, member, 0, at_ms=now)
        assert (
            await q.settle(claimed, [member], history=[dead], dead=[(entry.event_id, entry.to_json())])
        ).ok
        assert await q.release(claimed)
        stored = [history.parse(r) for r in await redis.lrange(keys.history("S7"), 0, -1)]
        assert [(e.kind, e.at_ms) for e in stored] == [("ingested", received_ms), ("dead", now)]
        # Replayed, then written: pending again (mailbox) and settled again (stored again), shown once.
        assert (
            await dlq.replay(
                redis,
                "a",
                ["a-S7-1"],
                high_water=HIGH_WATER,
                reserve=REPLAY_RESERVE,
                history_retention_ms=DAY_MS,
            )
        ).replayed == 1
        kinds = [e.kind for e in await history.event_history(redis, "a", "a-S7-1", "S7")]
        assert kinds == ["ingested", "dead", "replayed"]
        claimed = (await q.claim(5)).leases[0]
        written = history.entry(history.HistoryKind.written, "a-S7-1", int(time.time() * 1000) + 1)
        assert (await q.settle(claimed, [member], history=[written])).ok
        assert [history.parse(r).kind for r in await redis.lrange(keys.history("S7"), 0, -1)].count(
            "ingested"
        ) == 2
        kinds = [e.kind for e in await history.timeline(redis, "a", "S7")]
        assert kinds == ["ingested", "dead", "replayed", "written"]

    def test_merge_places_ingested_in_time_and_before_its_event(self) -> None:
        e = history.HistoryEntry
        stored = [
            e(100, "ingested", "A", {}),
            e(105, "attempt", "A", {"status": 503}),
            e(99, "written", "B", {}),  # another host's clock, a little behind: stored order is kept
            e(120, "written", "A", {}),
            e(100, "ingested", "A", {}),  # stored again after a replay: shown once
            e(125, "attempt", "D", {}),  # the engine's clock is behind the producer's
        ]
        pending = [e(110, "ingested", "C", {}), e(101, "ingested", "B", {}), e(130, "ingested", "D", {})]
        merged = [(x.kind, x.event_id) for x in history.merge(stored, pending)]
        assert merged == [
            ("ingested", "A"),
            ("ingested", "B"),  # by time; and before B's "written", whatever that host's clock said
            ("attempt", "A"),
            ("written", "B"),
            ("ingested", "C"),
            ("written", "A"),
            ("ingested", "D"),
            ("attempt", "D"),
        ]
        assert history.merge([], []) == []
        assert history.ingested_entry(b"000000000001not json") is None

    def test_merge_places_ingested_by_arrival_stamps_not_clocks(self) -> None:
        e = history.HistoryEntry
        stored = [
            e(100, "ingested", "A", {}, stamp=1),
            e(200, "written", "A", {}, stamp=1),  # written before B was queued ...
            e(300, "written", "B", {}, stamp=3),
        ]
        # ... although B was received (its clock) before A's write: the stamps decide, not the clocks.
        pending = [e(150, "ingested", "B", {}, stamp=2), e(120, "ingested", "C", {}, stamp=3)]
        merged = [(x.kind, x.event_id) for x in history.merge(stored, pending)]
        assert merged == [
            ("ingested", "A"),
            ("written", "A"),
            ("ingested", "B"),
            ("ingested", "C"),
            ("written", "B"),
        ]

    async def test_event_history_uses_the_dedup_index(self, redis: Redis) -> None:
        await put(redis, pass_event("a", "S9", 1), pass_event("a", "S9", 2))
        assert await inspect.serial_of(redis, "a", "a-S9-2", 3600) == "S9"
        assert await inspect.serial_of(redis, "a", "unknown", 3600) is None
        assert [e.event_id for e in await history.timeline(redis, "a", "S9")] == ["a-S9-1", "a-S9-2"]
        assert [e.kind for e in await history.event_history(redis, "a", "a-S9-2", "S9")] == ["ingested"]
        assert await history.event_history(redis, "a", "unknown", "S9") == []
