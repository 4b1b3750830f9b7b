"""The ordered engine: turns the producer's per-serial mailboxes into Klaviyo writes, in order, losing nothing.

One :class:`Engine` runs in each worker process (hosted by arq, see :mod:`worker.main`). Its loop:

1. **claim** — ``claim.lua`` leases up to ``claim_batch`` due serials, round-robin across accounts, taking over
   expired leases on the way; one pipelined read fetches each serial's first mailbox entries and stored state.
2. **sync** — the claimed serials of one account form a :class:`Batch` handed to the :class:`BatchSync`
   strategy. The default, :class:`PerEventSync`, works the serials concurrently and each serial strictly in
   mailbox order (``occurred_at``, ties by arrival), one :meth:`Syncer.sync_event` at a time. A bulk strategy
   (issue 6) gets the same batch and the same fenced operations and may coalesce a serial's events.
3. **settle** — every outcome is one fenced Lua step: written (remove from mailbox, store the applied
   ``PassState``, history), dead-lettered (remove + DLQ entry), parked (release with a not-before time and the
   retry record), or released (done, shutdown, or lease lost).

Leases are renewed every third of their TTL while held; a lease that could not be renewed is lost and the
serial's work stops at its next step: no further Klaviyo write is sent for it (``SerialWork.alive``, checked
before every call), and its Redis writes are refused by the token check anyway. When idle, the loop
blocks on ``BLPOP pb:notify`` (the producer pushes on every enqueue) with a timeout that ends at the next due
parked serial or lease expiry, so neither latency nor takeover waits on arq's polling.

Shutdown (:meth:`Engine.stop`): stop claiming; each serial finishes the event in flight and is released (its
remaining events are immediately claimable elsewhere); after the grace period the remaining tasks, and the
strategy's own send tasks (bulk lanes), are cancelled, and only then their leases released.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import socket
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import orjson
import structlog
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from passbridge import metrics
from passbridge.accounts import Account, AccountNotFound, AccountState, AccountStore
from passbridge.event import PassEvent
from passbridge.keys import (
    ACTIVE_ACCOUNTS,
    EXPRESS_BUSY,
    EXPRESS_NOTIFY,
    EXPRESS_ON,
    NOTIFY,
    WORKERS,
    WORKERS_INFO,
    account_keys,
)
from passbridge.outage import OUTAGE_ERRORS, DataMarker, OutageLog, describe_outage, is_outage
from passbridge.tasks import cancel_all_until_done, cancel_until_done
from worker import pause
from worker.dlq import DLQEntry
from worker.failures import UnreadableEvent, classify
from worker.history import HistoryKind, entry
from worker.klaviyo.errors import Abandoned
from worker.queue import Lease, SerialSnapshot, SettleRequest, WorkQueue, split_member
from worker.retry import (
    DeadLetter,
    Failure,
    PauseAccount,
    Retry,
    RetryPolicy,
    RetryRecord,
    Wait,
    active_age_ms,
    decide,
)
from worker.state import PassState
from worker.sync import PartialSync, SyncResult

log = structlog.get_logger(__name__)

#: The share of the lease TTL a holder gives up: it sends no Klaviyo write once this share of the TTL is all
#: that may be left of its lease (``SerialWork.deadline``), so a write it sent has landed before another worker
#: can take the serial over and write a newer state.
LEASE_MARGIN = 0.2

#: Renewal ticks per renewal interval (a quarter of the lease TTL): each tick renews about this share of the
#: held leases, so a worker holding thousands never renews them all in one burst (``Engine._renew_loop``).
RENEW_TICKS = 10


class Syncer(Protocol):
    """What the engine needs from the Klaviyo sync (``worker.sync.Syncer`` implements it)."""

    async def sync_event(
        self,
        account: Account,
        state: PassState | None,
        event: PassEvent,
        seq: int = 0,
        *,
        alive: Callable[[], bool] | None = None,
    ) -> SyncResult:
        """Apply ``event`` (arrival sequence ``seq``) on top of ``state``; raise a ``KlaviyoError`` subclass on
        failure, or ``worker.sync.PartialSync`` wrapping one when a write failed after an earlier one was
        accepted. Idempotent. Once ``alive()`` says False no further write is sent and
        ``worker.klaviyo.errors.Abandoned`` is raised."""
        ...


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Tunables (``Settings.worker_*``, ``history_retention_s``, ``retry_*``)."""

    max_serials: int = 64
    claim_batch: int = 32
    #: Free slots kept for accounts holding fewer than this many serials in the process (fair share: one
    #: account's backlog cannot fill every slot; see ``claim.lua``). ``None``: an eighth of max_serials.
    fair_reserve: int | None = None
    #: How soon a worker whose only due work was held back by the reserve looks again (seconds).
    capped_recheck_s: float = 0.05
    #: A throttled serial whose wait is at least this long defers its whole account (no claims meanwhile).
    defer_min_ms: int = 50
    #: Mailbox entries read per serial at a claim and after each settle (a bulk strategy coalesces them).
    heads_per_serial: int = 8
    #: Fresh first: up to ``fresh_take`` serials per account and claim are the newest made ready within
    #: ``fresh_ms`` (0 = off: strictly oldest first). See ``claim.lua``.
    fresh_ms: int = 0
    fresh_take: int = 0
    #: This engine is an express lane (:mod:`worker.express`): it takes serials of small accounts only.
    express: bool = False
    #: The backlog (pending events) up to which an account counts as small (published by express lanes).
    express_small: int = 32
    #: While express lanes are alive, other lanes leave a small account's serials to them for this long ...
    express_grace_ms: int = 250
    #: ... but only while they hold at least this many serials (busy with a backlog; 0 = always).
    express_busy_serials: int = 250
    lease_ms: int = 10_000
    events_per_lease: int = 200
    history_retention_ms: int = 7 * 86_400_000
    #: Longest idle BLPOP: bounds how late a worker notices a parked serial coming due or a lease expiring
    #: that was scheduled after it went to sleep.
    idle_wait_s: float = 1.0
    #: How long a process trusts its cached copy of an account (state, retry policy, credentials).
    account_cache_s: float = 2.0
    #: Parking delay for serials of an account that is not registered (events wait for it to be added).
    unknown_account_delay_ms: int = 60_000
    #: Parking delay for the serials of a batch whose strategy raised (a bug must not spin the worker).
    failed_batch_delay_ms: int = 1000
    heartbeat_s: float = 2.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)


@dataclass(slots=True)
class SerialWork:
    """A leased serial inside a batch: its lease, mailbox head and applied state, kept current as it moves."""

    lease: Lease
    heads: list[bytes]
    state: PassState | None
    lost: bool = False
    released: bool = False
    #: A release is on its way to Redis: a renewal answering "not held" meanwhile is that release, not a loss.
    releasing: bool = False
    done_events: int = 0
    #: When its lease was taken or last extended (``time.monotonic()``), for the renewal loop.
    renewed_at: float = 0.0
    #: When claimed, a previous holder's profile import job may still have carried it (``SerialSnapshot``).
    profile_job: bool = False
    #: ``time.monotonic()`` after which the lease counts as lost for Klaviyo writes: the claim or last successful
    #: renewal (when it was sent) plus the TTL less ``LEASE_MARGIN``. A renewal that failed or never ran
    #: (a stalled loop) leaves it where it was.
    deadline: float = math.inf

    def alive(self) -> bool:
        """Whether Klaviyo writes for this serial may still be sent: its lease is neither lost nor released and
        its :attr:`deadline` has not passed. Checked before every call (``KlaviyoClient.call(alive=...)``);
        attribute reads and a clock read, no Redis."""
        return not self.lost and not self.released and time.monotonic() < self.deadline


def renewal_due(held: Iterable[SerialWork], now: float, interval: float, quota: int) -> list[SerialWork]:
    """The leases to renew now, from ``held`` in renewal order (the longest unrenewed first).

    Every lease unrenewed for ``interval`` is due. So are leases unrenewed for half of it, until ``quota`` are
    taken: a tick's share of the held leases, so that leases claimed together (hundreds at once) drift apart
    and each tick renews about as many as the next. Released and lost leases are skipped.
    """
    due: list[SerialWork] = []
    for work in held:
        age = now - work.renewed_at
        if age < interval and (len(due) >= quota or age < interval / 2):
            # In renewal order, every lease after this one is younger still.
            break
        if not work.released and not work.lost:
            due.append(work)
    return due


@dataclass(slots=True)
class Batch:
    """Claimed serials of one account, handed to a :class:`BatchSync` together."""

    account: Account
    policy: RetryPolicy
    works: list[SerialWork]


@dataclass(frozen=True, slots=True)
class Written:
    """One serial's accepted events for :meth:`Engine.written_many`: its head ``members`` (in order), the
    state to store (``None``: unchanged), and per event its id and timeline notes."""

    work: SerialWork
    members: Sequence[bytes]
    state: PassState | None
    event_ids: Sequence[str]
    notes: Sequence[Sequence[str]]


class BatchSync(Protocol):
    """How a batch is synced. :class:`PerEventSync` is the default; a bulk strategy can replace it."""

    async def run(self, engine: Engine, batch: Batch) -> None:
        """Sync the batch through ``engine``'s fenced operations; every serial must end released."""
        ...


def _event_id_of(member: bytes) -> str:
    try:
        return str(orjson.loads(split_member(member)[1])["id"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return ""


def default_worker_id() -> str:
    """``<host>:<pid>:<random>``: unique per process start, readable in the DLQ and in lease tokens."""
    return f"{socket.gethostname()}:{os.getpid()}:{os.urandom(2).hex()}"


class Engine:
    """Claims, syncs and settles serials for one worker process (see the module docstring)."""

    def __init__(
        self,
        redis: Redis,
        accounts: AccountStore,
        syncer: Syncer,
        *,
        config: EngineConfig | None = None,
        worker_id: str | None = None,
        blocking_redis: Redis | None = None,
        batch_sync: BatchSync | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.redis = redis
        self.accounts = accounts
        self.syncer = syncer
        self.config = config or EngineConfig()
        self.worker_id = worker_id or default_worker_id()
        self._outage = OutageLog("claim", worker=self.worker_id)
        self._data_marker = DataMarker("heartbeat")
        #: BLPOP blocks its connection; it gets its own client so commands of the workers never queue behind it.
        self.blocking_redis = blocking_redis
        self.batch_sync: BatchSync = batch_sync or PerEventSync()
        self.rand = rand
        self.queue = WorkQueue(
            redis,
            worker_id=self.worker_id,
            lease_ms=self.config.lease_ms,
            history_retention_ms=self.config.history_retention_ms,
            head_batch=self.config.heads_per_serial,
        )
        self.stats: Counter[str] = Counter()
        #: How long after a claim or renewal was sent its lease is trusted for Klaviyo writes.
        self._hold_s = self.config.lease_ms / 1000 * (1 - LEASE_MARGIN)
        self._held: dict[str, SerialWork] = {}
        self._held_per_account: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self._slot_freed = asyncio.Event()
        self._stopping = False
        self._loops: list[asyncio.Task[None]] = []
        self._idle: asyncio.Future[None] | None = None
        self._wakers: set[asyncio.Task[None]] = set()
        self._account_cache: dict[str, tuple[Account | None, float]] = {}
        self._started_ms = int(time.time() * 1000)
        self._lag_max_ms = 0
        self._lag_ever_ms = 0
        #: Express lane: accounts the producer announced (EXPRESS_NOTIFY), visited by the next claim.
        self._hinted: list[str] = []

    # --- lifecycle ---------------------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called: serials finish their current event and are released."""
        return self._stopping

    @property
    def held(self) -> int:
        """Serials this process holds right now."""
        return len(self._held)

    async def start(self) -> None:
        """Start claiming, renewing and heart-beating."""
        # The first beat at once, so status lists this worker from its start; a Redis outage in that instant
        # leaves it to the heartbeat loop (the claim loop waits the outage out as well).
        with contextlib.suppress(*OUTAGE_ERRORS):
            await self._heartbeat_once()
            await self._data_marker.check(self.redis)
        self._loops = [
            asyncio.create_task(self._claim_loop(), name="engine-claim"),
            asyncio.create_task(self._renew_loop(), name="engine-renew"),
            asyncio.create_task(self._heartbeat_loop(), name="engine-heartbeat"),
            asyncio.create_task(self._lag_loop(), name="engine-lag"),
        ]
        log.info("engine_started", worker=self.worker_id, max_serials=self.config.max_serials)

    async def stop(self, grace_s: float) -> None:
        """Stop claiming; let in-flight events finish for up to ``grace_s``; release everything still held."""
        if self._stopping:
            return
        self._stopping = True
        # Wake the claim loop wherever it waits; it then sees `stopping` and ends. It is not cancelled
        # mid-claim: a claim whose answer was lost would leave leases nobody renews until they expire.
        self._slot_freed.set()
        if self._idle is not None:
            self._idle.cancel()
        claim_loop = self._loops[0] if self._loops else None
        if claim_loop:
            done, _ = await asyncio.wait({claim_loop}, timeout=5)
            if not done:
                await cancel_until_done(claim_loop)
        pending = set(self._tasks)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=grace_s)
        for task in pending:
            task.cancel()
        # A strategy's own Klaviyo sends (the bulk lanes') outlive a cancelled batch: cancel them in the same
        # step, before the cancelled batches release the serials whose writes they carry.
        cancel_sends = getattr(self.batch_sync, "cancel_sends", None)
        sends = cancel_sends() if callable(cancel_sends) else []
        # Cancelled until they end: a loop (a bulk lane's, the background loops below) can miss one cancellation
        # on Python 3.11 (passbridge.tasks), and a bare gather then waited for it for ever, so the worker never
        # exited after SIGTERM.
        await cancel_all_until_done([*pending, *sends])
        # Whatever a cancelled task still held goes back at once (fenced: a lost lease stays lost).
        for work in list(self._held.values()):
            if not work.released and not work.lost:
                with contextlib.suppress(RedisError):
                    await self.queue.release(work.lease)
            self._forget(work)
        await cancel_all_until_done(self._loops[1:])
        with contextlib.suppress(RedisError):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zrem(WORKERS, self.worker_id)
                pipe.hdel(WORKERS_INFO, self.worker_id)
                await pipe.execute()
        log.info("engine_stopped", worker=self.worker_id, cancelled=len(pending), **self.stats)

    # --- claiming ----------------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while not self._stopping:
            free = self.config.max_serials - len(self._held)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                sent = time.monotonic()
                claimed = await self.queue.claim(
                    min(free, self.config.claim_batch),
                    per_account=self.config.claim_batch,
                    reserve=self.reserve,
                    free=free,
                    held=self._held_by_account(),
                    fresh_ms=self.config.fresh_ms,
                    fresh_take=self.config.fresh_take,
                    express=self.config.express,
                    grace_ms=self.config.express_grace_ms,
                    defer_small=len(self._held) >= self.config.express_busy_serials,
                    accounts=self._hinted,
                    # An express lane claims a few serials of a small account whose event is waiting: read
                    # what the serials need in the same step, one round trip less before its first call.
                    snapshot=self.config.express,
                )
                self._hinted = []
                self._outage.succeeded()
                if claimed.taken_over:
                    self.stats["taken_over"] += claimed.taken_over
                    metrics.leases_taken_over(claimed.taken_over)
                    log.info("leases_taken_over", worker=self.worker_id, count=claimed.taken_over)
                if claimed.leases:
                    await self._launch(claimed.leases, sent, claimed.snapshots)
                    continue
                self._idle = asyncio.ensure_future(self._idle_wait(capped=claimed.capped))
                try:
                    await self._idle
                except asyncio.CancelledError:
                    if not self._stopping:
                        raise
                finally:
                    self._idle = None
            except (RedisError, OSError) as exc:
                if is_outage(exc):
                    # Redis restarting, gone or refusing writes: keep trying, say so once (and every half
                    # minute), not twice a second.
                    self._outage.failed(exc)
                else:
                    log.warning("claim_failed", worker=self.worker_id, error=str(exc))
                await asyncio.sleep(0.5)
            except Exception:
                # A bug must not silently stop this process from claiming: log it and go on.
                log.exception("claim_loop_error", worker=self.worker_id)
                await asyncio.sleep(1.0)

    @property
    def reserve(self) -> int:
        """Slots kept free for accounts holding few serials here (``EngineConfig.fair_reserve``)."""
        if self.config.fair_reserve is not None:
            return self.config.fair_reserve
        return max(1, self.config.max_serials // 8)

    def _held_by_account(self) -> dict[str, int]:
        return {a: n for a, n in self._held_per_account.items() if n > 0}

    async def _idle_wait(self, *, capped: bool = False) -> None:
        """Sleep until the producer notifies, or the next scheduled account comes due (at most idle_wait_s).

        ``capped``: due work exists but the fair-share reserve held it back; look again soon (a slot of that
        account frees up as its serials finish) while still waking at once for another account's events.
        """
        timeout = self.config.capped_recheck_s if capped else self.config.idle_wait_s
        if self.config.express:
            await self._express_wait(timeout)
            return
        head = None if capped else await self.redis.zrange(ACTIVE_ACCOUNTS, 0, 0, withscores=True)
        if head:
            timeout = min(timeout, max(0.01, (float(head[0][1]) - time.time() * 1000) / 1000))
        if self.blocking_redis is not None:
            await self.blocking_redis.blpop([NOTIFY], timeout=timeout)
        else:
            await asyncio.sleep(timeout)

    async def _express_wait(self, wait_s: float) -> None:
        """Express lane: sleep until the producer announces a small account's event (or ``wait_s``, after
        which the next claim looks at every small account due soon: retries, released serials)."""
        if self.blocking_redis is None:
            await asyncio.sleep(wait_s)
            return
        popped = await self.blocking_redis.blpop([EXPRESS_NOTIFY], timeout=wait_s)
        if popped is None:
            return
        # The claim takes the announcements queued behind this one itself (claim.lua).
        self._hinted = [popped[1].decode()]

    async def _launch(
        self, leases: Sequence[Lease], sent: float, snapshots: Sequence[SerialSnapshot] | None = None
    ) -> None:
        # Held (and renewed, and released on stop) from the moment they are claimed. ``sent``: when the claim
        # was sent; its leases expire no later than the TTL after that. ``snapshots``: read by the claim.
        now = time.monotonic()
        deadline = sent + self._hold_s
        works = [SerialWork(lease, [], None, renewed_at=now, deadline=deadline) for lease in leases]
        for work in works:
            self._held[work.lease.token] = work
            self._held_per_account[work.lease.account_id] += 1
        try:
            if snapshots is None:
                snapshots = await self.queue.snapshot(leases)
        except RedisError:
            for work in works:
                with contextlib.suppress(RedisError):
                    await self.release(work)
                self._forget(work)
            raise
        by_account: dict[str, list[SerialWork]] = defaultdict(list)
        for work, snap in zip(works, snapshots, strict=True):
            work.heads = snap.heads
            work.state = self._load_state(work.lease, snap.state)
            work.profile_job = snap.profile_job
            by_account[work.lease.account_id].append(work)
        for account_id, works in by_account.items():
            task = asyncio.create_task(self._run_batch(account_id, works), name=f"batch-{account_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _load_state(self, lease: Lease, raw: bytes | None) -> PassState | None:
        if raw is None:
            return None
        try:
            return PassState.from_json(raw)
        except ValidationError as exc:
            # A state we cannot read would silently disable the stale-event guard; say so loudly.
            log.error("state_unreadable", account=lease.account_id, serial=lease.serial, error=str(exc)[:300])
            return None

    async def _run_batch(self, account_id: str, works: list[SerialWork]) -> None:
        delay_ms = 0
        try:
            account = await self._account(account_id)
            if account is None:
                log.warning("account_unknown", account=account_id, serials=len(works))
                for work in works:
                    await self.release(work, delay_ms=self.config.unknown_account_delay_ms)
                return
            if account.state is not AccountState.connected:
                # The cached copy may predate a resume: decide on a fresh read.
                account = await self._account(account_id, fresh=True)
            if account is not None and account.state is not AccountState.connected:
                await pause.pause_account(
                    self.redis,
                    self.accounts,
                    account_id,
                    account.state_reason or f"account is {account.state}",
                    kind="operator",
                )
                for work in works:
                    await self.release(work)
                return
            if account is None:
                for work in works:
                    await self.release(work, delay_ms=self.config.unknown_account_delay_ms)
                return
            await self.batch_sync.run(self, Batch(account, self._policy(account), works))
        except Exception as exc:
            if isinstance(exc, RedisError) and is_outage(exc):
                # Redis went away or refuses writes mid-batch: no bug to trace back (the loops report the
                # outage); the serials are handed back below, or their leases expire meanwhile.
                log.warning(
                    "batch_interrupted", account=account_id, worker=self.worker_id, error=describe_outage(exc)
                )
            else:
                log.exception("batch_failed", account=account_id, worker=self.worker_id)
            # A strategy that fails outright would fail again at once: back off instead of spinning.
            delay_ms = self.config.failed_batch_delay_ms
        finally:
            for work in works:
                if not work.released and not work.lost:
                    with contextlib.suppress(RedisError):
                        await self.release(work, delay_ms=delay_ms)
                self._forget(work)

    def _forget(self, work: SerialWork) -> None:
        if self._held.pop(work.lease.token, None) is not None:
            account_id = work.lease.account_id
            self._held_per_account[account_id] -= 1
            if self._held_per_account[account_id] <= 0:
                del self._held_per_account[account_id]
            self._slot_freed.set()

    async def _account(self, account_id: str, *, fresh: bool = False) -> Account | None:
        cached = self._account_cache.get(account_id)
        now = time.monotonic()
        if not fresh and cached is not None and now - cached[1] < self.config.account_cache_s:
            return cached[0]
        try:
            account: Account | None = await self.accounts.get(account_id)
        except AccountNotFound:
            account = None
        self._account_cache[account_id] = (account, now)
        return account

    def _policy(self, account: Account) -> RetryPolicy:
        if not account.retry_policy:
            return self.config.retry
        try:
            return self.config.retry.with_overrides(account.retry_policy)
        except ValueError as exc:
            log.error("retry_policy_invalid", account=account.account_id, error=str(exc))
            return self.config.retry

    # --- fenced operations, for BatchSync strategies -----------------------------------------------

    def may_continue(self, work: SerialWork) -> bool:
        """Whether ``work`` should go on with its next event (not stopping, lease held, budget left)."""
        return (
            bool(work.heads)
            and not self._stopping
            and not work.lost
            and not work.released
            and work.done_events < self.config.events_per_lease
        )

    async def written(
        self, work: SerialWork, members: Sequence[bytes], result: SyncResult, event_ids: Sequence[str]
    ) -> bool:
        """Klaviyo accepted ``members`` (the serial's head, in order): remove them and store the new state."""
        now = int(time.time() * 1000)
        hist = [
            entry(HistoryKind.written, eid, now, worker=self.worker_id, notes=[n for n in result.notes if n])
            for eid in event_ids
        ]
        done = await self.queue.settle(
            work.lease,
            members,
            state=result.state.to_json() if result.state is not None else None,
            retry_fields=event_ids,
            history=hist,
        )
        if not done.ok:
            self._lost(work)
            return False
        work.heads = done.heads
        if result.state is not None:
            work.state = result.state
        work.done_events += len(members)
        self.stats["written"] += len(members)
        metrics.events_written(work.lease.account_id, members)
        return True

    async def written_many(self, items: Sequence[Written]) -> list[bool]:
        """Several :meth:`written` settles (of different serials) in one Redis round trip.

        Each item's events get their own timeline note (``notes[i]`` for ``event_ids[i]``), so a coalesced
        write still says per event what it did (applied, stale, ...).
        """
        now = int(time.time() * 1000)
        requests = []
        for item in items:
            hist = [
                entry(HistoryKind.written, eid, now, worker=self.worker_id, notes=[n for n in notes if n])
                for eid, notes in zip(item.event_ids, item.notes, strict=True)
            ]
            requests.append(
                SettleRequest(
                    item.work.lease,
                    item.members,
                    item.state.to_json() if item.state is not None else None,
                    item.event_ids,
                    hist,
                )
            )
        done = await self.queue.settle_many(requests)
        out = []
        for item, settled in zip(items, done, strict=True):
            work = item.work
            if not settled.ok:
                self._lost(work)
                out.append(False)
                continue
            work.heads = settled.heads
            if item.state is not None:
                work.state = item.state
            work.done_events += len(item.members)
            self.stats["written"] += len(item.members)
            metrics.events_written(work.lease.account_id, item.members, now_s=now / 1000)
            out.append(True)
        return out

    async def failed(
        self,
        work: SerialWork,
        member: bytes,
        event: PassEvent | None,
        exc: BaseException,
        *,
        written: PassState | None = None,
    ) -> bool:
        """The head event ``member`` failed with ``exc``: apply the retry policy.

        ``written``: the state Klaviyo already holds because the event's earlier writes were accepted before
        the failing one (the profile and record before its metric event, or the profile before its record:
        then with ``record_pending``); stored if the event is dead-lettered.

        Returns True when the serial may go on with its next event (the failed one was dead-lettered), False
        when the serial was released (parked, throttled, account paused, or lease lost).
        """
        failure = classify(exc)
        account_id = work.lease.account_id
        keys = account_keys(account_id)
        event_id = event.event_id if event is not None else _event_id_of(member) or member[:12].decode()
        raw = await self.redis.hget(keys.retries, event_id)
        record = RetryRecord.from_doc(orjson.loads(raw)) if raw else RetryRecord(work.lease.serial)
        now = int(time.time() * 1000)
        received_ms = int(event.received_at.timestamp() * 1000) if event is not None else now
        # A replayed event's age counts from its replay: replay promises a fresh retry window, and an event
        # dead-lettered for its age would otherwise go straight back on its first transient error.
        origin = max(received_ms, record.replayed_ms)
        age = active_age_ms(origin, now, await pause.pause_intervals(self.redis, account_id))
        policy = await self._policy_for(account_id)
        decision = decide(policy, failure, attempts=record.attempts, age_ms=age, rand=self.rand)
        log_kw = {
            "account": account_id,
            "serial": work.lease.serial,
            "event_id": event_id,
            "kind": failure.kind.value,
            "status": failure.status,
            "code": failure.code,
            "endpoint": failure.endpoint,
            "error": failure.message[:200],
        }
        if isinstance(decision, Wait):
            record.add(failure, at_ms=now, worker_id=self.worker_id, counted=False)
            self.stats["throttled"] += 1
            await self.defer_account(account_id, decision.delay_s)
            log.info("event_throttled", wait_s=decision.delay_s, **log_kw)
            hist = entry(
                HistoryKind.throttled,
                event_id,
                now,
                endpoint=failure.endpoint,
                wait_ms=int(decision.delay_s * 1000),
            )
            await self.release(
                work, delay_ms=int(decision.delay_s * 1000), record=(event_id, record), history=[hist]
            )
            return False
        if isinstance(decision, Retry):
            record.add(failure, at_ms=now, worker_id=self.worker_id, counted=True)
            self.stats["retried"] += 1
            metrics.retry_scheduled(account_id, failure.kind.value)
            delay_ms = int(decision.delay_s * 1000)
            log.info("event_retry_scheduled", attempt=decision.attempt, delay_ms=delay_ms, **log_kw)
            hist = entry(
                HistoryKind.attempt,
                event_id,
                now,
                **_error_detail(failure),
                worker=self.worker_id,
                attempt=decision.attempt,
                next_attempt_ms=now + delay_ms,
            )
            await self.release(work, delay_ms=delay_ms, record=(event_id, record), history=[hist])
            return False
        if isinstance(decision, PauseAccount):
            self.stats["paused"] += 1
            log.warning("account_auth_failed", reason=decision.reason, **log_kw)
            await pause.pause_account(self.redis, self.accounts, account_id, decision.reason, kind="auth")
            self._account_cache.pop(account_id, None)
            hist = entry(HistoryKind.paused, event_id, now, **_error_detail(failure), reason=decision.reason)
            await self.release(work, history=[hist])
            return False
        assert isinstance(decision, DeadLetter)
        record.add(failure, at_ms=now, worker_id=self.worker_id, counted=True)
        score = event.occurred_ms if event is not None else await self._score(work, member)
        dead = DLQEntry(
            event_id=event_id,
            serial=work.lease.serial,
            member=member.decode(errors="replace"),
            score=score,
            reason=decision.reason,
            dead_at_ms=now,
            worker=self.worker_id,
            errors=record.errors,
            replays=record.replays,
            attempts=record.attempts,
            attempts_total=record.attempts_before + record.attempts,
        )
        hist = entry(HistoryKind.dead, event_id, now, **_error_detail(failure), reason=decision.reason)
        # The writes Klaviyo accepted stay there: without their state the next event would be planned from
        # the old one and could undo them (a deleted pass written active again).
        done = await self.queue.settle(
            work.lease,
            [member],
            state=written.to_json() if written is not None else None,
            retry_fields=[event_id],
            history=[hist],
            dead=[(event_id, dead.to_json())],
        )
        if not done.ok:
            self._lost(work)
            return False
        if written is not None:
            work.state = written
        self.stats["dead_lettered"] += 1
        metrics.event_dead_lettered(account_id)
        log.warning("event_dead_lettered", reason=decision.reason, **log_kw)
        work.heads = done.heads
        work.done_events += 1
        return True

    async def release_many(self, works: Sequence[SerialWork]) -> None:
        """:meth:`release` of several serials that are done for now (no delay), in one Redis round trip."""
        todo = [w for w in works if not w.released and not w.lost]
        for work in todo:
            work.releasing = True
        flags = await self.queue.release_many([w.lease for w in todo])
        for work, ok in zip(todo, flags, strict=True):
            work.released = True
            if not ok:
                self._lost(work)

    async def defer_account(self, account_id: str, seconds: float) -> None:
        """Claim none of the account's serials for ``seconds`` (its Klaviyo budget is spent until then).

        Without this every freed slot would claim another serial of the account only to park it again: the
        backlog would churn through claims and fill every serial's history with "throttled".
        """
        ms = int(seconds * 1000)
        if ms >= self.config.defer_min_ms:
            with contextlib.suppress(RedisError):
                await self.redis.set(account_keys(account_id).deferred, b"1", px=ms)

    async def release(
        self,
        work: SerialWork,
        *,
        delay_ms: int = 0,
        record: tuple[str, RetryRecord] | None = None,
        history: Sequence[bytes] = (),
    ) -> None:
        """End the serial's lease (events left go back to ``ready`` after ``delay_ms``)."""
        if work.released or work.lost:
            return
        retry = (record[0], orjson.dumps(record[1].to_doc())) if record is not None else None
        work.releasing = True
        ok = await self.queue.release(work.lease, delay_ms=delay_ms, retry=retry, history=history)
        work.released = True
        if not ok:
            self._lost(work)
        elif delay_ms > 0 and not self._stopping:
            # Idle workers computed their BLPOP timeouts before this park; wake one when it comes due
            # (if this process dies first, the idle timeout of the others still bounds the delay).
            asyncio.get_running_loop().call_later(delay_ms / 1000, self._wake_later, work.lease.account_id)

    def _wake_later(self, account_id: str) -> None:
        task = asyncio.create_task(self._notify(account_id))
        self._wakers.add(task)
        task.add_done_callback(self._wakers.discard)

    async def _notify(self, account_id: str) -> None:
        with contextlib.suppress(RedisError):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.rpush(NOTIFY, account_id)
                pipe.ltrim(NOTIFY, 0, 999)
                await pipe.execute()

    def _lost(self, work: SerialWork) -> None:
        work.lost = True
        self.stats["leases_lost"] += 1
        log.warning(
            "lease_lost", account=work.lease.account_id, serial=work.lease.serial, worker=self.worker_id
        )

    async def _policy_for(self, account_id: str) -> RetryPolicy:
        account = await self._account(account_id)
        return self._policy(account) if account is not None else self.config.retry

    async def _score(self, work: SerialWork, member: bytes) -> int:
        score = await self.redis.zscore(
            account_keys(work.lease.account_id).mailbox(work.lease.serial), member
        )
        return int(score) if score is not None else 0

    # --- leases and liveness -----------------------------------------------------------------------

    async def _renew_loop(self) -> None:
        """Extend every held lease about every quarter of its TTL, a slice of them at a time.

        A bulk worker holds thousands of serials. Renewing them all at once queued tens of scripts in Redis
        together (30 ms and more of Redis time every 2.5 s), and every other client, an express lane's next
        event included, waited behind them. Each tick renews only the leases whose turn it is, the longest
        unrenewed first: a tenth of them, a few ms of Redis time.
        """
        interval = self.config.lease_ms / 4000
        tick = interval / RENEW_TICKS
        while True:
            await asyncio.sleep(tick)
            quota = math.ceil(len(self._held) / RENEW_TICKS)
            due = renewal_due(self._held.values(), time.monotonic(), interval, quota)
            if due:
                await self._renew(due, interval)

    async def _renew(self, works: list[SerialWork], interval: float) -> None:
        started = time.monotonic()
        oldest = min(w.renewed_at for w in works)
        by_account: dict[str, list[SerialWork]] = defaultdict(list)
        for work in works:
            by_account[work.lease.account_id].append(work)
        try:
            flags = await self.queue.renew_many({a: [w.lease for w in ws] for a, ws in by_account.items()})
        except Exception as exc:
            # A missed renewal costs at most a takeover (the leases' deadlines stay where they were, so their
            # Klaviyo writes stop before it); never stop renewing.
            log.warning("renew_failed", worker=self.worker_id, error=str(exc))
            return
        # How long the longest-waiting of these leases went unrenewed, until its renewal was answered.
        late = time.monotonic() - oldest
        for account_id, ws in by_account.items():
            for work, ok in zip(ws, flags.get(account_id, []), strict=True):
                if ok:
                    work.renewed_at = started
                    work.deadline = started + self._hold_s
                    token = work.lease.token
                    if self._held.pop(token, None) is not None:
                        self._held[token] = work
                # A serial released meanwhile has no token any more; that is not a lost lease.
                elif not work.released and not work.releasing:
                    self._lost(work)
        if late > 2 * interval:
            # Leases renewed this late were close to expiring: another worker may have taken them over.
            log.warning("renew_slow", worker=self.worker_id, seconds=round(late, 2), held=len(self._held))

    async def _lag_loop(self) -> None:
        """Measure how late the event loop runs a 50 ms timer: a busy loop delays every request and lease."""
        interval = 0.05
        while True:
            started = time.monotonic()
            await asyncio.sleep(interval)
            lag_ms = int((time.monotonic() - started - interval) * 1000)
            if lag_ms > self._lag_max_ms:
                self._lag_max_ms = lag_ms

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            with contextlib.suppress(RedisError):
                await self._heartbeat_once()
                await self._data_marker.check(self.redis)

    async def _heartbeat_once(self) -> None:
        # Redis's clock, as every lease and not-before score: readers compare beats with Redis TIME, so a host
        # whose clock is off must not look silent (behind) or alive after it died (ahead).
        now = await pause.redis_now_ms(self.redis)
        info = {
            "worker": self.worker_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_ms": self._started_ms,
            "beat_ms": now,
            "held": len(self._held),
            "max_serials": self.config.max_serials,
            "stopping": self._stopping,
            "lane": "express" if self.config.express else "main",
            #: The longest event-loop stall since the previous heartbeat, and ever.
            "loop_lag_ms": self._lag_max_ms,
            "loop_lag_max_ms": max(self._lag_max_ms, self._lag_ever_ms),
            **self.stats,
        }
        self._lag_ever_ms = max(self._lag_ever_ms, self._lag_max_ms)
        self._lag_max_ms = 0
        sync_stats = getattr(self.batch_sync, "stats", None)
        if callable(sync_stats):
            info["sync"] = sync_stats()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(WORKERS, {self.worker_id: now})
            pipe.hset(WORKERS_INFO, self.worker_id, orjson.dumps(info))
            ttl_ms = int(self.config.heartbeat_s * 3000)
            if self.config.express and not self._stopping:
                # Alive for three heartbeats: a dead lane stops diverting small accounts' events soon.
                pipe.set(EXPRESS_ON, self.config.express_small, px=ttl_ms)
            elif not self.config.express and len(self._held) >= self.config.express_busy_serials:
                # Busy with a backlog: small accounts' events should go to the express lanes meanwhile. A short
                # life (1.5 heartbeats): once the backlog is gone, the workers take everything again soon.
                pipe.set(EXPRESS_BUSY, 1, px=int(self.config.heartbeat_s * 1500))
            await pipe.execute()


def _error_detail(failure: Failure) -> dict[str, object]:
    return {
        "status": failure.status,
        "code": failure.code,
        "endpoint": failure.endpoint,
        "error": failure.message,
    }


class PerEventSync:
    """The default :class:`BatchSync`: serials in parallel, each one event at a time in mailbox order."""

    async def run(self, engine: Engine, batch: Batch) -> None:
        """Work every serial of the batch concurrently."""
        await asyncio.gather(*(self.serial(engine, batch, work) for work in batch.works))

    async def serial(self, engine: Engine, batch: Batch, work: SerialWork) -> None:
        """Work one serial of ``batch`` event by event until it is done, parked or out of budget; release it."""
        while engine.may_continue(work):
            member = work.heads[0]
            event: PassEvent | None = None
            seq = 0
            try:
                seq, wire = split_member(member)
                event = PassEvent.from_wire(wire, batch.account.account_id)
                if event.serial_number != work.lease.serial:
                    raise UnreadableEvent(
                        f"event of serial {event.serial_number!r} in mailbox of {work.lease.serial!r}"
                    )
            except (ValidationError, ValueError, KeyError, TypeError, orjson.JSONDecodeError) as exc:
                if not await engine.failed(
                    work, member, None, UnreadableEvent(f"unreadable event: {exc}"[:500])
                ):
                    return
                continue
            except UnreadableEvent as exc:
                if not await engine.failed(work, member, event, exc):
                    return
                continue
            try:
                result = await engine.syncer.sync_event(
                    batch.account, work.state, event, seq, alive=work.alive
                )
            except Abandoned:
                # The lease went before a write of the event: the serial is its new holder's, no attempt.
                break
            except PartialSync as exc:
                if not await engine.failed(work, member, event, exc.cause, written=exc.state):
                    return
                continue
            except Exception as exc:
                if not await engine.failed(work, member, event, exc):
                    return
                continue
            if not await engine.written(work, [member], result, [event.event_id]):
                return
        await engine.release(work)
