"""The bulk :class:`~worker.engine.BatchSync`: a claimed batch coalesced per serial and spread over Klaviyo's
single and bulk endpoints, so a backlog drains at the account's Klaviyo ceiling (issue 6, DESIGN §4).

Per serial, per round (its queued events, up to the engine's heads per serial):

1. :func:`worker.plan.coalesce` folds the events into their net writes: one profile and one WalletPass record
   with the newest state (upserts keyed by serial: intermediate states would be overwritten anyway), and one
   metric event per event with its true time and ``unique_id``. "State never goes backwards" holds because the
   fold is the same ``plan`` the per-event path applies, event by event, in mailbox order.
2. The writes go, in the per-event path's order (profile → record → metric events), through the account's
   three **lanes** (:class:`Lane`). A lane collects the items of every serial in flight in this process and
   sends them as single calls or bulk requests (the policy is :mod:`worker.batching`): ``profile-import`` or a
   profile bulk-import job (waited for: :mod:`worker.import_jobs`), ``data-source-record-create-jobs`` or the
   record bulk endpoint, ``events`` or ``event-bulk-create-jobs``.
3. Once all are accepted, the serial's events settle in one fenced step — many serials per Redis round trip.

Failures, per item, never per batch: an item Klaviyo rejects (a 4xx naming it, or an import error of a job)
sends its serial down the per-event path (:meth:`PerEventSync.serial`), which finds the exact event at fault,
dead-letters it with its error and delivers the rest. A bulk request rejected whole is split — at the item the
error points to, else in halves — until the bad items are alone; it is never retried whole. A transient,
throttled or auth failure of a request goes to each of its serials' retry policy (:meth:`Engine.failed`).

A serial whose lease is lost or whose wait was cancelled (shutdown) is dropped from its lane before it is sent,
and a single send checks the lease again before each of its calls (each event, each identity-conflict retry,
each resend after a 429), so a serial another worker took over is never written by this one with an older state.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, TypeVar

import orjson
import structlog
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from passbridge.accounts import Account
from passbridge.event import PassEvent
from passbridge.keys import PACE_BACKLOGS, account_keys
from worker.batching import (
    LanePolicy,
    LaneView,
    SyncMode,
    bulk_due,
    bulk_take,
    halves,
    is_tail,
    is_urgent,
    rejected_item,
    single_quota,
)
from worker.engine import Batch, Engine, PerEventSync, SerialWork, Written
from worker.import_jobs import ImportJobs
from worker.klaviyo.client import KlaviyoClient
from worker.klaviyo.endpoints import (
    BULK_CREATE_DATA_SOURCE_RECORDS,
    BULK_CREATE_EVENTS,
    BULK_IMPORT_PROFILES,
    CREATE_DATA_SOURCE_RECORD,
    CREATE_EVENT,
    CREATE_OR_UPDATE_PROFILE,
    Operation,
)
from worker.klaviyo.errors import Abandoned, AccountFault, PermanentError, ThrottledError
from worker.klaviyo.ratelimit import new_slot
from worker.plan import bulk_events_entry, coalesce, event_body, profile_body, record_job_body
from worker.queue import split_member
from worker.state import PassState
from worker.sync import Syncer

log = structlog.get_logger(__name__)

T = TypeVar("T")
R = TypeVar("R")

MB = 1024 * 1024
EVENTS_POINTER = "/data/attributes/events-bulk-create/data"
RECORDS_POINTER = "/data/attributes/data-source-records/data"
#: Most profiles one bulk-import job carries (see ``AccountLanes``).
PROFILE_JOB_ITEMS = 2_000
#: Backlogs are paced for this long after fresh events of an account with a small backlog were last worked on
#: (Klaviyo's minute: the span over which a backlog's burst would land) ...
PACE_MARK_TTL_MS = 60_000
#: ... which each worker says at most this often.
PACE_MARK_EVERY_S = 5.0


@dataclass(frozen=True, slots=True)
class BulkOptions:
    """Tunables of the bulk strategy (``Settings.worker_bulk_*``)."""

    mode: SyncMode = SyncMode.adaptive
    #: Events received at most this long before their serial was worked on are fresh: single calls first ...
    urgent_age_ms: int = 2000
    #: ... for at most this many serials per Klaviyo second per account (a quarter of the profile and record
    #: single rate), with bursts of ``urgent_burst``.
    urgent_per_s: float = 3.0
    urgent_burst: float = 10.0
    #: How long a partly filled bulk request waits for more items, in Klaviyo seconds (divided by the rate
    #: scale): a record bulk slot comes every 4 s at Klaviyo's steady rate, so filling it matters most.
    linger_events_s: float = 1.0
    linger_profiles_s: float = 0.5
    linger_records_s: float = 4.0
    #: Serials settled per Redis round trip at most.
    settle_chunk: int = 100
    #: While the account has fewer events than this queued, single calls only (lowest latency).
    small_backlog: int = 32
    #: How often the lanes re-read an account's queued events while it has work in the process.
    backlog_refresh_s: float = 0.25
    #: Serials of a claimed batch started per event-loop turn.
    start_slice: int = 10
    #: Serial steps (a round's parse and coalesce, the next write after an answer) per event-loop turn.
    serials_per_turn: int = 10
    #: How long a profile bulk-import job may stay queued or processing before the wait for it fails its
    #: serials' attempt (``Settings.worker_profile_job_max_wait_s``): Klaviyo promises no completion time.
    profile_job_max_wait_s: float = 1800.0
    #: Profile bulk-import jobs of one account running at once from this process at most
    #: (``Settings.worker_profile_jobs_in_flight``): more profiles wait in the lane and fill the next job.
    profile_jobs_in_flight: int = 4


class Verdict(Enum):
    """How a lane answered one item."""

    ok = "ok"
    #: Klaviyo refused the item itself: its serial takes the per-event path.
    rejected = "rejected"
    #: The request failed (network, 5xx, 429, auth): the serial's retry policy decides.
    failed = "failed"
    #: Not sent: the serial's lease was lost or released meanwhile; its work stops.
    dropped = "dropped"


@dataclass(frozen=True, slots=True)
class Outcome:
    """A lane's answer for one item (``value``: what the sender returns, e.g. a profile's final state)."""

    verdict: Verdict
    error: BaseException | None = None
    value: Any = None


OK = Outcome(Verdict.ok)
DROPPED = Outcome(Verdict.dropped)


@dataclass(slots=True)
class Item:
    """One serial's write waiting in a lane."""

    #: What the single-call sender needs (a profile's state, a record, the serial's event bodies).
    payload: Any
    #: The item as it sits in a bulk request's list, serialized once.
    blob: bytes
    #: What the bulk limit counts (events for the events lane, else 1).
    units: int
    urgent: bool
    serial: str
    #: False once the serial's lease is lost or released: the item is dropped instead of sent.
    alive: Callable[[], bool]
    future: asyncio.Future[Outcome]
    enqueued: float = field(default_factory=time.monotonic)


#: Sends items as one bulk request; the ``str`` is the rate-limit slot already taken for it (or ``None``).
BulkSender = Callable[[Account, list[Item], str | None], Awaitable[list[Outcome]]]
#: Sends one item by single calls; the ``str`` is the slot already taken for the first call.
SingleSender = Callable[[Account, Item, str], Awaitable[Outcome]]


class Lane:
    """One account's queue of one kind of write, sent as single calls or bulk requests (see the module doc)."""

    def __init__(
        self,
        name: str,
        *,
        mode: SyncMode,
        policy: LanePolicy,
        client: KlaviyoClient,
        single_op: Operation,
        bulk_op: Operation,
        list_pointer: str,
        send_single: SingleSender,
        send_bulk: BulkSender,
        backlog: Callable[[], tuple[int, float]] = lambda: (0, 1.0),
        counts_events: bool = False,
        single_reserve: float = 0.1,
        bulk_concurrency: int | None = None,
        paced: Callable[[], bool],
    ) -> None:
        self.name = name
        #: Whether the backlog's requests (bulk, overflow singles) are paced now (``AccountLanes.paced``).
        self.paced = paced
        #: Bulk sends running at once at most (``None``: no cap; the endpoint's rate is the limit).
        self.bulk_concurrency = bulk_concurrency
        self._bulks = 0
        #: The account's queued events and the average events per serial (``AccountLanes.backlog``).
        self.backlog = backlog
        #: Whether this lane's units are events (else serials).
        self.counts_events = counts_events
        self.single_reserve = single_reserve
        self.mode = mode
        self.policy = policy
        self.client = client
        self.single_op = single_op
        self.bulk_op = bulk_op
        self.list_pointer = list_pointer
        self.send_single = send_single
        self.send_bulk = send_bulk
        self.account: Account | None = None
        self._urgent: deque[Item] = deque()
        self._normal: deque[Item] = deque()
        self._units = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()
        self._singles = 0
        self._bulk_acquiring = False
        self._single_at = 0.0
        self._urgent_at = 0.0
        self._bulk_at = 0.0
        self.stats: Counter[str] = Counter()

    @property
    def pending(self) -> int:
        """Items waiting to be sent."""
        return len(self._urgent) + len(self._normal)

    def submit(self, account: Account, item: Item) -> asyncio.Future[Outcome]:
        """Queue ``item``; the future resolves once Klaviyo answered for it."""
        self.account = account
        (self._urgent if item.urgent else self._normal).append(item)
        self._units += item.units
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"lane-{self.name}")
        return item.future

    async def _run(self) -> None:
        try:
            while self.pending:
                try:
                    delay = await self._step()
                except Exception:
                    log.exception("lane_step_failed", lane=self.name)
                    delay = 0.1
                if delay > 0:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)
        finally:
            self._task = None

    def _view(self, now: float) -> LaneView:
        oldest = min(
            (q[0].enqueued for q in (self._urgent, self._normal) if q),
            default=now,
        )
        events, per_serial = self.backlog()
        if self.counts_events:
            upstream = max(0.0, events - self._units)
        else:
            upstream = max(0.0, events / per_serial - self.pending)
        return LaneView(
            self._units,
            self.pending,
            len(self._urgent),
            now - oldest,
            events,
            upstream,
            max(0.0, self._bulk_at - now),
        )

    async def _step(self) -> float:
        """Send what the policy says can go now; return how long to wait before looking again (0: at once)."""
        account = self.account
        assert account is not None
        limiter = self.client.limiter
        now = time.monotonic()
        view = self._view(now)
        quota = single_quota(self.mode, self.policy, view)
        small = view.backlog_events < self.policy.small_backlog
        tail = is_tail(self.policy, view)
        sent = False
        while quota > 0 and self.pending and self._singles < self.policy.single_concurrency:
            # Fresh events, a small backlog and the last of a backlog may spend the whole single budget; the
            # overflow of a big backlog leaves a share of it to fresh events.
            first = bool(self._urgent) or small or tail
            if now < (self._urgent_at if first else self._single_at):
                break
            slot = new_slot()
            wait = await limiter.try_acquire(
                account.account_id,
                self.single_op.name,
                self.single_op.tier,
                reserve=0.0 if first else self.single_reserve,
                slot=slot,
                paced=not first and self.paced(),
            )
            if wait > 0:
                until = time.monotonic() + wait
                if first:
                    self._urgent_at = until
                self._single_at = max(self._single_at, until)
                break
            item = self._pop_single(small)
            if item is None:
                break
            # Why it went alone: fresh, a small backlog, the last of a backlog, or the bulk overflow.
            why = "urgent" if item.urgent else "small" if small else "tail" if tail else "overflow"
            self.stats[f"single_{why}"] += 1
            quota -= 1
            self._singles += 1
            self._spawn(self._single(account, item, slot))
            sent = True
        now = time.monotonic()
        view = self._view(now)
        due = bulk_due(self.mode, self.policy, view)
        # At the cap the next bulk request waits for a running one to finish (which wakes the lane).
        capped = self.bulk_concurrency is not None and self._bulks >= self.bulk_concurrency
        if due and now >= self._bulk_at and not self._bulk_acquiring and not capped:
            # Only look: the send takes the slot itself, right before the request leaves.
            wait = await limiter.try_acquire(
                account.account_id, self.bulk_op.name, self.bulk_op.tier, peek=True, paced=self.paced()
            )
            if wait > 0:
                self._bulk_at = time.monotonic() + wait
                if not view.bulk_blocked:
                    # Just ran out of bulk slots: the overflow may now go by single calls; decide again.
                    return 0.0
            else:
                items = self._pop_bulk()
                self._bulk_acquiring = True
                self._bulks += 1
                self._spawn(self._bulk_counted(account, items))
                return 0.0
        if sent:
            return 0.0
        waits = []
        if quota > 0 and self._singles < self.policy.single_concurrency:
            waits.append((self._urgent_at if self._urgent or small or tail else self._single_at) - now)
        if due:
            if not capped:
                waits.append(self._bulk_at - now)
        elif self.pending and self.mode is not SyncMode.single:
            linger = self.policy.linger_s * (4 if small and self.mode is SyncMode.adaptive else 1)
            waits.append(linger - view.oldest_age_s)
        return max(0.002, min(waits)) if waits else 1.0

    def _pop_single(self, small: bool) -> Item | None:
        """The next item for a single call (urgent first); items of serials no longer held are dropped."""
        while self.pending:
            if self._urgent:
                item = self._urgent.popleft()
            elif small:
                item = self._normal.popleft()
            else:
                # Beyond a small backlog single calls take the newest items: the next bulk would not carry them.
                item = self._normal.pop()
            self._units -= item.units
            if item.alive() and not item.future.done():
                return item
            _resolve(item, DROPPED)
        return None

    def _pop_bulk(self) -> list[Item]:
        head = list(itertools.islice(itertools.chain(self._urgent, self._normal), self.policy.bulk_max_units))
        n = bulk_take([(it.units, len(it.blob)) for it in head], self.policy)
        items = head[:n]
        for _ in range(n):
            it = self._urgent.popleft() if self._urgent else self._normal.popleft()
            self._units -= it.units
        return items

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    def cancel(self) -> list[asyncio.Task[None]]:
        """Stop the lane (shutdown): drop its queued items and cancel its loop and its sends in flight, so
        nothing more leaves for serials about to be released. Returns the cancelled tasks, to be awaited."""
        tasks = list(self._sends)
        if self._task is not None:
            tasks.append(self._task)
        for task in tasks:
            task.cancel()
        for item in (*self._urgent, *self._normal):
            _resolve(item, DROPPED)
        self._urgent.clear()
        self._normal.clear()
        self._units = 0
        return tasks

    async def _single(self, account: Account, item: Item, slot: str) -> None:
        try:
            outcome = await self.send_single(account, item, slot)
        except Abandoned:
            # The lease went while the item was on its way (a 429 pause, a conflict retry): as at the pop.
            outcome = DROPPED
        except PermanentError as exc:
            outcome = Outcome(Verdict.rejected, exc)
        except Exception as exc:
            outcome = Outcome(Verdict.failed, exc)
        finally:
            self._singles -= 1
            self._wake.set()
        self.stats["single"] += 1
        _resolve(item, outcome)

    async def _take_bulk_slot(self, account: Account) -> str:
        """Wait for a bulk slot (at most the client's ``max_slot_wait_s``), then let the lane plan the next."""
        slot = new_slot()
        try:
            await self.client.limiter.acquire(
                account.account_id,
                self.bulk_op.name,
                self.bulk_op.tier,
                max_wait_s=self.client.options.max_slot_wait_s,
                slot=slot,
                paced=self.paced(),
            )
            return slot
        finally:
            self._bulk_acquiring = False
            self._wake.set()

    def _requeue(self, items: list[Item], retry_after_s: float) -> None:
        """Put unsent items back at the front of the lane; no bulk request before ``retry_after_s``."""
        self._bulk_at = max(self._bulk_at, time.monotonic() + retry_after_s)
        for it in reversed(items):
            (self._urgent if it.urgent else self._normal).appendleft(it)
            self._units += it.units
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"lane-{self.name}")

    async def _bulk_counted(self, account: Account, items: list[Item]) -> None:
        """A bulk send counted against ``bulk_concurrency`` until it is over (its splits included)."""
        try:
            await self._bulk(account, items, acquire=True)
        finally:
            self._bulks -= 1
            self._wake.set()

    async def _bulk(self, account: Account, items: list[Item], *, acquire: bool = False) -> None:
        """Send ``items`` as one bulk request; on a 4xx isolate the bad items (never resend all of them).

        ``acquire``: take the rate-limit slot here, right before sending (else the client takes it).
        """
        live = []
        for it in items:
            if it.alive() and not it.future.done():
                live.append(it)
            else:
                _resolve(it, DROPPED)
        items = live
        if not items:
            if acquire:
                self._bulk_acquiring = False
                self._wake.set()
            return
        try:
            slot = await self._take_bulk_slot(account) if acquire else None
            self.stats["bulk"] += 1
            self.stats["bulk_items"] += len(items)
            outcomes = await self.send_bulk(account, items, slot)
        except PermanentError as exc:
            await self._isolate(account, items, exc)
            return
        except ThrottledError as exc:
            # Not processed (no slot, or Klaviyo's 429): back to the front of the lane until the endpoint's
            # budget returns. A 429 is not a failure of the items: the batch must not be parked for it.
            self.stats["bulk_throttled"] += 1
            self._requeue(items, exc.retry_after_s)
            return
        except Exception as exc:
            outcome = Outcome(Verdict.failed, exc)
            for it in items:
                _resolve(it, outcome)
            return
        for it, outcome in zip(items, outcomes, strict=True):
            _resolve(it, outcome)

    async def _isolate(self, account: Account, items: list[Item], exc: PermanentError) -> None:
        if len(items) == 1:
            _resolve(items[0], Outcome(Verdict.rejected, exc))
            return
        self.stats["split"] += 1
        bad = rejected_item(exc.pointer, self.list_pointer)
        log.info(
            "bulk_request_rejected",
            lane=self.name,
            items=len(items),
            named_item=bad,
            status=exc.status,
            code=exc.code,
        )
        if bad is not None and 0 <= bad < len(items):
            _resolve(items[bad], Outcome(Verdict.rejected, exc))
            await self._bulk(account, items[:bad] + items[bad + 1 :])
            return
        first, second = halves(len(items))
        await asyncio.gather(
            self._bulk(account, [items[i] for i in first]),
            self._bulk(account, [items[i] for i in second]),
        )


def _resolve(item: Item, outcome: Outcome) -> None:
    if not item.future.done():
        item.future.set_result(outcome)


class AccountLanes:
    """The three lanes of one account in one process, and the Klaviyo senders behind them."""

    def __init__(self, sync: BulkSync, account: Account) -> None:
        self.sync = sync
        self.account = account
        #: The account's serials being worked on in this process.
        self.in_flight = 0
        #: The account's queued events (its ``depth`` in Redis), refreshed while the lanes are busy.
        self.backlog_events = 0
        #: Events per serial per round, a moving average (to estimate serials from events).
        self.events_per_serial = 1.0
        #: A fresh serial (received moments ago) was worked on since the backlog was last read.
        self.fresh_seen = False
        self._refresher: asyncio.Task[None] | None = None
        # Fresh serials jump the queue only this often (a token bucket): a flood of new events is a
        # backlog like any other and must not spend the single budget the fresh ones need.
        client = sync.client
        scale = client.limiter.scale
        self._urgent_rate = sync.options.urgent_per_s * scale
        self._urgent_tokens = sync.options.urgent_burst
        self._urgent_at = time.monotonic()
        mode = sync.options.mode
        opts = sync.options
        # Profile jobs carry at most PROFILE_JOB_ITEMS of Klaviyo's 10,000: each serial's record and metric
        # events wait until its job is complete, and a smaller job completes sooner, while the profile bulk
        # budget (150 jobs a minute) stays far from the bottleneck either way.
        self.profiles = Lane(
            "profiles",
            mode=mode,
            policy=LanePolicy(
                PROFILE_JOB_ITEMS, int(4.5 * MB), opts.small_backlog, opts.linger_profiles_s / scale
            ),
            client=client,
            single_op=CREATE_OR_UPDATE_PROFILE,
            bulk_op=BULK_IMPORT_PROFILES,
            list_pointer="/data/attributes/profiles/data",
            send_single=self._profile_single,
            send_bulk=self._profile_bulk,
            backlog=self.backlog,
            paced=self.paced,
            # A job's send lasts until the job is complete: a slow Klaviyo gets a few big jobs, not a pile.
            bulk_concurrency=opts.profile_jobs_in_flight,
        )
        self.records = Lane(
            "records",
            mode=mode,
            policy=LanePolicy(
                500, int(3.6 * MB), opts.small_backlog, opts.linger_records_s / scale, tail_units=50
            ),
            client=client,
            single_op=CREATE_DATA_SOURCE_RECORD,
            bulk_op=BULK_CREATE_DATA_SOURCE_RECORDS,
            list_pointer=RECORDS_POINTER,
            send_single=self._record_single,
            send_bulk=self._record_bulk,
            backlog=self.backlog,
            paced=self.paced,
        )
        self.events = Lane(
            "events",
            mode=mode,
            policy=LanePolicy(1000, int(4.5 * MB), opts.small_backlog, opts.linger_events_s / scale),
            client=client,
            single_op=CREATE_EVENT,
            bulk_op=BULK_CREATE_EVENTS,
            list_pointer=EVENTS_POINTER,
            send_single=self._events_single,
            send_bulk=self._events_bulk,
            backlog=self.backlog,
            paced=self.paced,
            counts_events=True,
        )

    def backlog(self) -> tuple[int, float]:
        """The account's queued events (at least those in flight here) and the average events per serial."""
        return max(self.backlog_events, self.in_flight), self.events_per_serial

    def paced(self) -> bool:
        """Whether this account's backlog is paced now: while some account with a small backlog has had fresh
        events worked on in the last minute (``keys.PACE_BACKLOGS``), and only while this one is not small."""
        return self.sync.pacing and self.backlog_events >= self.sync.options.small_backlog

    def take_urgent(self) -> bool:
        """Whether one more fresh serial may take the fast path now."""
        self.fresh_seen = True
        now = time.monotonic()
        burst = self.sync.options.urgent_burst
        self._urgent_tokens = min(burst, self._urgent_tokens + (now - self._urgent_at) * self._urgent_rate)
        self._urgent_at = now
        if self._urgent_tokens >= 1:
            self._urgent_tokens -= 1
            return True
        return False

    def observe(self, events: int) -> None:
        """A serial's round carried ``events`` events."""
        self.events_per_serial += (events - self.events_per_serial) * 0.01

    def watch_backlog(self, redis: Redis, every_s: float) -> None:
        """Keep :attr:`backlog_events` current while the account has work in this process."""
        if self._refresher is None:
            self._refresher = asyncio.create_task(self._refresh(redis, every_s), name="lanes-backlog")

    async def _refresh(self, redis: Redis, every_s: float) -> None:
        key = account_keys(self.account.account_id).depth
        try:
            while True:
                with contextlib.suppress(RedisError):
                    async with redis.pipeline(transaction=False) as pipe:
                        pipe.get(key)
                        pipe.exists(PACE_BACKLOGS)
                        depth, pace = await pipe.execute()
                    self.backlog_events = int(depth or 0)
                    self.sync.pacing = bool(pace)
                    # Fresh events of a small account: what pacing is for. Not the last, old events of a
                    # backlog: other backlogs would be held back for nobody.
                    if self.fresh_seen and self.backlog_events < self.sync.options.small_backlog:
                        await self.sync.small_account_seen(redis)
                    self.fresh_seen = False
                lanes = (self.profiles, self.records, self.events)
                if self.in_flight <= 0 and not any(lane.pending for lane in lanes):
                    return
                await asyncio.sleep(every_s)
        finally:
            self._refresher = None

    # profiles: the item's payload is the serial's new PassState; a single write resolves identity conflicts.

    async def _profile_single(self, account: Account, item: Item, slot: str) -> Outcome:
        state, notes = await self.sync.syncer.write_profile(
            account, item.payload, acquired=slot, alive=item.alive
        )
        return Outcome(Verdict.ok, value=(state, notes))

    async def _profile_bulk(self, account: Account, items: list[Item], slot: str | None) -> list[Outcome]:
        errors = await self.sync.jobs.run(
            account, [it.blob for it in items], [it.serial for it in items], acquired=slot
        )
        return [
            Outcome(Verdict.ok, value=(it.payload, [])) if err is None else Outcome(Verdict.rejected, err)
            for it, err in zip(items, errors, strict=True)
        ]

    # records: the payload is the WalletPass record.

    async def _record_single(self, account: Account, item: Item, slot: str) -> Outcome:
        ds = await self.sync.syncer.data_source_id(account)
        try:
            await self.sync.client.call(
                account,
                CREATE_DATA_SOURCE_RECORD,
                body=record_job_body(item.payload, ds),
                acquired=slot,
                alive=item.alive,
            )
        except AccountFault as exc:
            self.sync.syncer.forget_data_source(account.account_id, exc)
            raise
        return OK

    async def _record_bulk(self, account: Account, items: list[Item], slot: str | None) -> list[Outcome]:
        ds = await self.sync.syncer.data_source_id(account)
        body = (
            b'{"data":{"type":"data-source-record-bulk-create-job","attributes":{"data-source-records":'
            b'{"data":['
            + b",".join(it.blob for it in items)
            + b']}},"relationships":{"data-source":{"data":{"type":"data-source","id":'
            + orjson.dumps(ds)
            + b"}}}}}"
        )
        try:
            await self.sync.client.call(account, BULK_CREATE_DATA_SOURCE_RECORDS, content=body, acquired=slot)
        except AccountFault as exc:
            self.sync.syncer.forget_data_source(account.account_id, exc)
            raise
        return [OK] * len(items)

    # events: the payload is the serial's events (in order); single calls send each one alone.

    async def _events_single(self, account: Account, item: Item, slot: str) -> Outcome:
        # A failure after some of the serial's events were accepted says how many (``value``): those are
        # settled as written, so neither a retry nor the per-event path sends them again.
        first: str | None = slot
        old_before = self.sync.syncer.old_before()
        for i, event in enumerate(item.payload):
            try:
                await self.sync.client.call(
                    account,
                    CREATE_EVENT,
                    body=event_body(event, old_before),
                    acquired=first,
                    alive=item.alive,
                )
            except Abandoned:
                # The lease went between two events: the new holder sends the rest (and, by ``unique_id``,
                # not twice what was accepted here).
                return DROPPED
            except PermanentError as exc:
                return Outcome(Verdict.rejected, exc, value=i)
            except Exception as exc:
                return Outcome(Verdict.failed, exc, value=i)
            first = None
        return OK

    async def _events_bulk(self, account: Account, items: list[Item], slot: str | None) -> list[Outcome]:
        body = (
            b'{"data":{"type":"event-bulk-create-job","attributes":{"events-bulk-create":{"data":['
            + b",".join(it.blob for it in items)
            + b"]}}}}"
        )
        await self.sync.client.call(account, BULK_CREATE_EVENTS, content=body, acquired=slot)
        return [OK] * len(items)


class _Step(Enum):
    next = "next"
    stop = "stop"
    per_event = "per_event"


class TickBatcher(Generic[T, R]):
    """Collects calls made in the same event-loop turn (a bulk answer wakes hundreds of serials at once) and
    runs them as one batch (one Redis round trip), ``chunk`` at a time."""

    def __init__(self, run: Callable[[list[T]], Awaitable[list[R]]], chunk: int) -> None:
        self.run = run
        self.chunk = chunk
        self._queue: list[tuple[T, asyncio.Future[R]]] = []
        self._scheduled = False
        self._flushes: set[asyncio.Task[None]] = set()

    async def __call__(self, item: T) -> R:
        """Queue ``item`` and return its result once its batch ran."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, fut))
        if not self._scheduled:
            self._scheduled = True
            # After the serials woken in this loop turn have queued theirs.
            loop.call_soon(self._flush)
        return await fut

    def _flush(self) -> None:
        self._scheduled = False
        queue, self._queue = self._queue, []
        for i in range(0, len(queue), self.chunk):
            task = asyncio.create_task(self._run(queue[i : i + self.chunk]))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _run(self, part: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self.run([item for item, _ in part])
        except BaseException as exc:
            for _, fut in part:
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, fut), result in zip(part, results, strict=True):
            if not fut.done():
                fut.set_result(result)


class TurnGate:
    """Lets at most ``per_turn`` callers through per event-loop turn, the rest in arrival order after.

    A claim starts hundreds of serials and a bulk answer wakes hundreds at once; each then does a few hundred
    µs of CPU (parse, coalesce, serialize). Unthrottled, that is one loop turn of a tenth of a second or more,
    during which no other account's request, lease renewal or answer is handled. Through the gate the same
    work is spread over many short turns.
    """

    def __init__(self, per_turn: int) -> None:
        self.per_turn = per_turn
        self._used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._scheduled = False

    async def __call__(self) -> None:
        """Wait for a place in this or a later turn."""
        self._schedule()
        if self._used < self.per_turn and not self._waiters:
            self._used += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await fut

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._next_turn)

    def _next_turn(self) -> None:
        self._scheduled = False
        self._used = 0
        while self._waiters and self._used < self.per_turn:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                self._used += 1
        if self._waiters or self._used:
            self._schedule()


@dataclass(slots=True)
class EngineBatchers:
    """The settle and release batchers of one engine."""

    written: TickBatcher[Written, bool]
    release: TickBatcher[SerialWork, None]

    @classmethod
    def of(cls, engine: Engine, chunk: int) -> EngineBatchers:
        async def release(works: list[SerialWork]) -> list[None]:
            await engine.release_many(works)
            return [None] * len(works)

        return cls(TickBatcher(engine.written_many, chunk), TickBatcher(release, chunk))


class BulkSync:
    """The engine's :class:`~worker.engine.BatchSync` for ``adaptive`` and ``bulk`` modes (and ``single``,
    which is the per-event path behind the same profile-job guard)."""

    def __init__(self, syncer: Syncer, options: BulkOptions | None = None) -> None:
        self.syncer = syncer
        self.client = syncer.client
        self.options = options or BulkOptions()
        self.jobs = ImportJobs(self.client, syncer.redis, max_wait_s=self.options.profile_job_max_wait_s)
        self._lanes: dict[str, AccountLanes] = {}
        self._batchers: dict[int, EngineBatchers] = {}
        self._gate = TurnGate(self.options.serials_per_turn)
        self._per_event = PerEventSync()
        #: Whether backlogs are paced now: fresh events of an account with a small backlog were worked on (by
        #: any worker) in the last minute. Read with each busy account's depth; False until then (never pace
        #: for nobody).
        self.pacing = False
        self._small_seen_at = -math.inf

    async def small_account_seen(self, redis: Redis) -> None:
        """Say (at most every few seconds) that fresh events of an account with a small backlog are being
        worked on: for the next minute, every worker paces its backlogs, so such events never meet a burst.
        Not said by a worker whose pacing is off (``PASSBRIDGE_KLAVIYO_BACKLOG_PACING=false``): ``engine
        status`` shows the mark as "backlogs paced"."""
        if self.client.limiter.pace_burst is None:
            return
        now = time.monotonic()
        if now - self._small_seen_at < PACE_MARK_EVERY_S:
            return
        self._small_seen_at = now
        await redis.set(PACE_BACKLOGS, "1", px=PACE_MARK_TTL_MS)

    def lanes(self, account: Account) -> AccountLanes:
        """The account's lanes in this process (created on first use)."""
        lanes = self._lanes.get(account.account_id)
        if lanes is None:
            lanes = self._lanes[account.account_id] = AccountLanes(self, account)
        lanes.account = account
        return lanes

    def stats(self) -> dict[str, int]:
        """Requests per lane and kind (single, bulk, bulk items, splits), summed over accounts."""
        out: Counter[str] = Counter()
        for lanes in self._lanes.values():
            for lane in (lanes.profiles, lanes.records, lanes.events):
                for k, v in lane.stats.items():
                    out[f"{lane.name}_{k}"] += v
        out["profile_jobs"] = self.jobs.jobs
        return dict(out)

    def cancel_sends(self) -> list[asyncio.Task[None]]:
        """Stop every lane of this process (:meth:`Lane.cancel`): :meth:`Engine.stop` calls it before it
        releases the serials still held, whose writes a lane's send may still carry (a wait for a slot, a
        resend after a 429). Returns the cancelled tasks, to be awaited."""
        tasks: list[asyncio.Task[None]] = []
        for lanes in self._lanes.values():
            for lane in (lanes.profiles, lanes.records, lanes.events):
                tasks += lane.cancel()
        return tasks

    async def run(self, engine: Engine, batch: Batch) -> None:
        """Work every serial of the batch; those a previous holder's profile job may still carry (as the claim's
        snapshot read) wait for that job first (only they: the rest of the batch starts at once)."""
        if any(w.profile_job for w in batch.works):
            waiting = [w for w in batch.works if w.profile_job]
            rest = [w for w in batch.works if not w.profile_job]
            await asyncio.gather(
                self._after_jobs(engine, Batch(batch.account, batch.policy, waiting)),
                self._run(engine, Batch(batch.account, batch.policy, rest)),
            )
            return
        await self._run(engine, batch)

    async def _after_jobs(self, engine: Engine, batch: Batch) -> None:
        try:
            await self.jobs.wait_clear(batch.account, [w.lease.serial for w in batch.works])
        except Exception as exc:
            for work in batch.works:
                await self._fail_head(engine, batch, work, exc)
            return
        for work in batch.works:
            work.profile_job = False
        await self._run(engine, batch)

    async def _run(self, engine: Engine, batch: Batch) -> None:
        if not batch.works:
            return
        if self.options.mode is SyncMode.single:
            await self._per_event.run(engine, batch)
            return
        settler = self._batchers.get(id(engine))
        if settler is None:
            settler = self._batchers[id(engine)] = EngineBatchers.of(engine, self.options.settle_chunk)
        lanes = self.lanes(batch.account)
        lanes.in_flight += len(batch.works)
        lanes.watch_backlog(self.syncer.redis, self.options.backlog_refresh_s)
        # Started a slice at a time: each serial's first round costs a few hundred µs of CPU (parse,
        # coalesce, serialize), and a whole claim at once would hold the event loop for a second.
        tasks: list[asyncio.Future[None]] = []
        try:
            for i in range(0, len(batch.works), self.options.start_slice):
                tasks += [
                    asyncio.ensure_future(self._serial(engine, batch, lanes, settler, w))
                    for w in batch.works[i : i + self.options.start_slice]
                ]
                await asyncio.sleep(0)
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    async def _fail_head(self, engine: Engine, batch: Batch, work: SerialWork, exc: BaseException) -> None:
        if not work.heads:
            await engine.release(work)
            return
        member = work.heads[0]
        try:
            event: PassEvent | None = PassEvent.from_wire(split_member(member)[1], batch.account.account_id)
        except (ValidationError, ValueError, KeyError, TypeError, orjson.JSONDecodeError):
            event = None
        if await engine.failed(work, member, event, exc):
            await engine.release(work)

    async def _serial(
        self, engine: Engine, batch: Batch, lanes: AccountLanes, settler: EngineBatchers, work: SerialWork
    ) -> None:
        try:
            await self._serial_rounds(engine, batch, lanes, settler, work)
        except RedisError:
            # Not this serial's fault: the engine parks the batch without counting an attempt.
            raise
        except Exception as exc:
            # A bug met by this serial's state or events (in the coalescing, say) fails its head like the
            # per-event path's errors do: an attempt counted, retried, dead-lettered in the end. Escaping, it
            # would park the whole batch, again and again, without an attempt.
            log.exception("bulk_serial_failed", account=work.lease.account_id, serial=work.lease.serial)
            await self._fail_head(engine, batch, work, exc)
        finally:
            lanes.in_flight -= 1

    async def _serial_rounds(
        self, engine: Engine, batch: Batch, lanes: AccountLanes, settler: EngineBatchers, work: SerialWork
    ) -> None:
        while engine.may_continue(work):
            if work.profile_job:
                # An earlier round's profile job failed (its head was dead-lettered) and may still run at
                # Klaviyo: this round's profile must not be written before it is complete, or the old job
                # could land last and overwrite it.
                try:
                    await self.jobs.wait_clear(batch.account, [work.lease.serial])
                except Exception as exc:
                    await self._fail_head(engine, batch, work, exc)
                    return
                work.profile_job = False
            budget = engine.config.events_per_lease - work.done_events
            events: list[PassEvent] = []
            members: list[bytes] = []
            for member in work.heads[:budget]:
                try:
                    event = PassEvent.from_wire(split_member(member)[1], batch.account.account_id)
                except (ValidationError, ValueError, KeyError, TypeError, orjson.JSONDecodeError):
                    break
                if event.serial_number != work.lease.serial:
                    break
                events.append(event)
                members.append(member)
            if not events:
                # An unreadable head: the per-event path dead-letters it and goes on with the serial.
                await self._per_event.serial(engine, batch, work)
                return
            step = await self._round(engine, batch, lanes, settler, work, events, members)
            if step is _Step.per_event:
                engine.stats["per_event_fallbacks"] += 1
                await self._per_event.serial(engine, batch, work)
                return
            if step is _Step.stop:
                return
        if engine.stopping or work.lost or work.released:
            await engine.release(work)
        else:
            await settler.release(work)

    async def _round(
        self,
        engine: Engine,
        batch: Batch,
        lanes: AccountLanes,
        settler: EngineBatchers,
        work: SerialWork,
        events: list[PassEvent],
        members: list[bytes],
    ) -> _Step:
        """One coalesced round of a serial's queued events through the lanes, then one settle."""
        account = batch.account
        lanes.observe(len(events))
        now_ms = int(time.time() * 1000)
        oldest = min(int(e.received_at.timestamp() * 1000) for e in events)
        urgent = is_urgent(oldest, now_ms, self.options.urgent_age_ms) and lanes.take_urgent()
        # A backlog's serials take turns with everything else in the process; fresh events and accounts
        # with a small backlog (another account's next event) go straight through.
        gated = not urgent and lanes.backlog()[0] >= self.options.small_backlog
        if gated:
            await self._gate()
        old_before = self.syncer.old_before()
        sp = coalesce(work.state, events, [split_member(m)[0] for m in members], old_before)
        serial = work.lease.serial
        state: PassState | None = sp.new_state
        notes: list[list[str]] = [[n] for n in sp.notes]

        def item(payload: Any, blob: bytes, units: int = 1) -> Item:
            fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
            return Item(payload, blob, units, urgent, serial, work.alive, fut)

        async def through(lane: Lane, it: Item) -> Outcome:
            try:
                outcome = await lane.submit(account, it)
            except asyncio.CancelledError:
                it.future.cancel()
                raise
            if gated:
                await self._gate()
            return outcome

        if sp.profile is not None:
            assert state is not None
            out = await through(lanes.profiles, item(state, orjson.dumps(profile_body(state)["data"])))
            if out.verdict is not Verdict.ok:
                if out.verdict is Verdict.failed:
                    # A job whose request or wait failed may run on at Klaviyo (its markers stay): if the
                    # head is dead-lettered and the serial goes on, its next round waits for that job first.
                    work.profile_job = True
                return await self._not_ok(engine, work, members, events, out)
            state, extra = out.value
            notes[-1] += extra
        if sp.record is not None:
            blob = orjson.dumps({"type": "data-source-record", "attributes": {"record": sp.record}})
            out = await through(lanes.records, item(sp.record, blob))
            if out.verdict is not Verdict.ok:
                # The profile was accepted, the record was not: a dead letter stores the state with its record
                # pending, so the next round is planned from what the profile holds and rewrites the record.
                held = None
                if sp.profile is not None and state is not None:
                    held = state.model_copy(update={"record_pending": True})
                return await self._not_ok(engine, work, members, events, out, held)
        blob = orjson.dumps(bulk_events_entry(serial, events, old_before))
        out = await through(lanes.events, item(events, blob, len(events)))
        if out.verdict is not Verdict.ok:
            # The profile and record writes were accepted: Klaviyo holds the round's state, which a dead
            # letter must store too, else the next round is planned from the old state and undoes them.
            held = state if sp.profile is not None or sp.record is not None else None
            accepted = out.value if isinstance(out.value, int) else 0
            if accepted > 0:
                # The profile and record already carry the whole round's state; the accepted events are
                # written. The rest are retried (or isolated) from the first one Klaviyo did not accept.
                ids = [e.event_id for e in events[:accepted]]
                if not await settler.written(Written(work, members[:accepted], state, ids, notes[:accepted])):
                    return _Step.stop
                members, events = members[accepted:], events[accepted:]
            return await self._not_ok(engine, work, members, events, out, held)
        written = Written(work, members, state, [e.event_id for e in events], notes)
        return _Step.next if await settler.written(written) else _Step.stop

    async def _not_ok(
        self,
        engine: Engine,
        work: SerialWork,
        members: list[bytes],
        events: list[PassEvent],
        out: Outcome,
        written: PassState | None = None,
    ) -> _Step:
        if out.verdict is Verdict.dropped:
            return _Step.stop
        if out.verdict is Verdict.rejected:
            # Klaviyo refused this serial's item: find the event at fault one event at a time.
            log.info(
                "bulk_item_rejected",
                account=work.lease.account_id,
                serial=work.lease.serial,
                error=str(out.error)[:300],
            )
            return _Step.per_event
        assert out.error is not None
        if await engine.failed(work, members[0], events[0], out.error, written=written):
            return _Step.next
        return _Step.stop


__all__ = ["BulkOptions", "BulkSync", "Lane", "Outcome", "Verdict"]
