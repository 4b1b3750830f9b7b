"""The consumer side of the queue protocol: claim, renew, settle, release, sweep (see docs/architecture.md).

Each operation is one Lua script, so it is atomic, and every operation on a held serial is fenced by its
lease token: once a lease was taken over (it expired and another claim moved the serial back to ``ready``),
the old holder can neither commit nor release, and its writes are refused without touching anything.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.typing import EncodableT

from passbridge.keys import ACCOUNT_BASE_PREFIX, ACTIVE_ACCOUNTS, EXPRESS_ON, LEASE_SEQ, NOTIFY, account_keys
from passbridge.scripts import run_many
from worker.history import ingested_entry
from worker.scripts import Scripts

#: Length of the arrival-sequence prefix of a mailbox member (12 hex digits, see enqueue.lua).
SEQ_CHARS = 12
#: Most leases renewed per Redis round trip (~0.3 ms of Redis time: see :meth:`WorkQueue.renew_many`).
RENEW_PER_TRIP = 100


@dataclass(frozen=True, slots=True)
class Lease:
    """One serial held by one worker under ``token``."""

    account_id: str
    serial: str
    token: str

    @property
    def worker_id(self) -> str:
        """The worker that holds the lease (tokens are ``<worker id>.<counter>``)."""
        return self.token.rsplit(".", 1)[0]


@dataclass(frozen=True, slots=True)
class Claimed:
    """What one claim returned: the new leases and how many expired leases it took over on the way."""

    leases: list[Lease]
    taken_over: int
    #: Some due account got fewer serials than it asked for because of the fair-share reserve.
    capped: bool = False
    #: Per lease, what :meth:`WorkQueue.snapshot` reads, when the claim read it in the same step
    #: (``claim(snapshot=True)``); ``None``: read it after the claim.
    snapshots: list[SerialSnapshot] | None = None


@dataclass(frozen=True, slots=True)
class Settled:
    """Outcome of :meth:`WorkQueue.settle`: ``ok`` is False when the lease was lost (nothing written)."""

    ok: bool
    removed: int = 0
    heads: list[bytes] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SerialSnapshot:
    """A leased serial's first mailbox entries and its stored state, read right after the claim."""

    heads: list[bytes]
    state: bytes | None
    #: A profile import job of a previous holder may still carry the serial (``AccountKeys.profile_jobs``
    #: has it): its next profile write must wait for that job (``worker.import_jobs``).
    profile_job: bool = False


@dataclass(frozen=True, slots=True)
class SettleRequest:
    """One "written" settle of :meth:`WorkQueue.settle_many`."""

    lease: Lease
    members: Sequence[bytes]
    state: bytes | None
    retry_fields: Sequence[str]
    history: Sequence[bytes]


def split_member(member: bytes) -> tuple[int, bytes]:
    """A mailbox member's arrival sequence and event wire JSON."""
    return int(member[:SEQ_CHARS], 16), member[SEQ_CHARS:]


class WorkQueue:
    """The engine's operations on the Redis queue, for one worker (``worker_id``)."""

    def __init__(
        self,
        redis: Redis,
        *,
        worker_id: str,
        lease_ms: int = 10_000,
        history_retention_ms: int = 7 * 86_400_000,
        head_batch: int = 8,
    ) -> None:
        if not worker_id:
            raise ValueError("worker_id must not be empty")
        self.redis = redis
        self.worker_id = worker_id
        self.lease_ms = lease_ms
        self.history_retention_ms = history_retention_ms
        self.head_batch = head_batch
        self.scripts = Scripts(redis)

    async def claim(
        self,
        max_serials: int,
        *,
        per_account: int | None = None,
        scan_accounts: int = 64,
        reserve: int = 0,
        free: int | None = None,
        held: Mapping[str, int] | None = None,
        fresh_ms: int = 0,
        fresh_take: int = 0,
        express: bool = False,
        grace_ms: int = 0,
        accounts: Sequence[str] = (),
        defer_small: bool = True,
        snapshot: bool = False,
    ) -> Claimed:
        """Lease up to ``max_serials`` due serials, sharing them round-robin across due accounts.

        With ``reserve`` R > 0, of the worker's ``free`` slots the last R are kept for accounts holding fewer
        than R serials (``held``: account → serials this worker holds): see ``claim.lua``. With ``fresh_ms``,
        up to ``fresh_take`` serials per account are the newest ones made ready within ``fresh_ms``.

        Express lanes (``express``) take serials of small accounts only (``accounts`` and the announcements
        still queued in ``EXPRESS_NOTIFY``, which this step pops; else those due within ``grace_ms``); while
        express lanes are alive, other lanes (with ``defer_small``: busy ones) leave a small account's serials
        alone until they have been due for ``grace_ms`` (see ``claim.lua`` and :mod:`worker.express`).

        ``snapshot``: also read each lease's :class:`SerialSnapshot` in the same script (``Claimed.snapshots``),
        saving :meth:`snapshot`'s round trip; for claims of a few serials (an express lane's), since it
        lengthens the script by ``head_batch`` mailbox entries per serial.
        """
        held_args: list[str | int] = []
        for account_id, n in (held or {}).items():
            held_args += [account_id, n]
        raw = await self.scripts.claim(
            args=[
                ACCOUNT_BASE_PREFIX,
                ACTIVE_ACCOUNTS,
                LEASE_SEQ,
                self.worker_id,
                self.lease_ms,
                max_serials,
                per_account or max_serials,
                scan_accounts,
                1000,
                reserve,
                max_serials if free is None else free,
                fresh_ms,
                fresh_take,
                "express" if express else "main" if defer_small else "free",
                EXPRESS_ON,
                grace_ms,
                self.head_batch if snapshot else 0,
                len(accounts),
                *accounts,
                *held_args,
            ]
        )
        # Each lease is (account, serial, token), followed with a snapshot by (heads, state, profile-job mark).
        starts = range(2, len(raw), 6 if snapshot else 3)
        leases = [Lease(raw[i].decode(), raw[i + 1].decode(), raw[i + 2].decode()) for i in starts]
        snapshots = (
            [SerialSnapshot(list(raw[i + 3]), raw[i + 4], bool(raw[i + 5])) for i in starts]
            if snapshot
            else None
        )
        return Claimed(leases, int(raw[0]), bool(int(raw[1])), snapshots)

    async def snapshot(self, leases: Sequence[Lease]) -> list[SerialSnapshot]:
        """For each lease (one round trip for all): the mailbox's first entries, the stored state and whether a
        profile import job may still carry the serial (read here rather than in a round trip of its own
        before the serial's first write)."""
        if not leases:
            return []
        by_account: dict[str, list[int]] = {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for i, lease in enumerate(leases):
                keys = account_keys(lease.account_id)
                pipe.zrange(keys.mailbox(lease.serial), 0, self.head_batch - 1)
                pipe.hget(keys.state, lease.serial)
                by_account.setdefault(lease.account_id, []).append(i)
            for account_id, idx in by_account.items():
                pipe.hmget(account_keys(account_id).profile_jobs, [leases[i].serial for i in idx])
            raw = await pipe.execute()
        marked = [False] * len(leases)
        for idx, found in zip(by_account.values(), raw[2 * len(leases) :], strict=True):
            for i, mark in zip(idx, found, strict=True):
                marked[i] = mark is not None
        return [SerialSnapshot(list(raw[2 * i]), raw[2 * i + 1], marked[i]) for i in range(len(leases))]

    async def renew(self, account_id: str, leases: Sequence[Lease]) -> list[bool]:
        """Extend the leases (all of ``account_id``); per lease whether it is still held."""
        if not leases:
            return []
        args: list[str | int] = [account_keys(account_id).base, self.lease_ms]
        for lease in leases:
            args += [lease.serial, lease.token]
        return [bool(flag) for flag in await self.scripts.renew(args=args)]

    async def renew_many(self, by_account: Mapping[str, Sequence[Lease]]) -> dict[str, list[bool]]:
        """:meth:`renew` for several accounts in few round trips (a worker holding thousands of serials must
        not spend one event-loop wait per account: a busy loop then renews late).

        At most :data:`RENEW_PER_TRIP` leases per script: a script runs alone in Redis, and one of 6,000 leases
        held it (and every other client, an express lane's next event included) for 30 ms. The scripts go out
        at once on separate connections (one wait for this process, however busy its loop), so Redis runs them
        back to back: callers keep each call small (the engine renews a slice of its leases per tick).
        """
        trips: list[list[tuple[str, Sequence[Lease]]]] = [[]]
        size = 0
        for account_id, leases in by_account.items():
            for i in range(0, len(leases), RENEW_PER_TRIP):
                part = leases[i : i + RENEW_PER_TRIP]
                if size + len(part) > RENEW_PER_TRIP and trips[-1]:
                    trips.append([])
                    size = 0
                trips[-1].append((account_id, part))
                size += len(part)

        async def send(trip: list[tuple[str, Sequence[Lease]]]) -> list[Any]:
            calls = []
            for account_id, part in trip:
                args: list[EncodableT] = [account_keys(account_id).base, self.lease_ms]
                for lease in part:
                    args += [lease.serial, lease.token]
                calls.append(args)
            return await run_many(self.redis, self.scripts.renew, calls)

        answers = await asyncio.gather(*(send(trip) for trip in trips if trip))
        out: dict[str, list[bool]] = {}
        for trip, raw in zip([t for t in trips if t], answers, strict=True):
            for (account_id, _), flags in zip(trip, raw, strict=True):
                out.setdefault(account_id, []).extend(bool(flag) for flag in flags)
        return out

    def _settle_args(
        self,
        lease: Lease,
        members: Sequence[bytes],
        *,
        state: bytes | None = None,
        retry_fields: Iterable[str] = (),
        history: Sequence[bytes] = (),
        dead: Sequence[tuple[str, bytes]] = (),
        heads: int | None = None,
    ) -> list[str | int | bytes]:
        keys = account_keys(lease.account_id)
        fields = list(retry_fields)
        if self.history_retention_ms > 0:
            history = [*(e for e in map(ingested_entry, members) if e is not None), *history]
        args: list[str | int | bytes] = [
            keys.base,
            lease.serial,
            lease.token,
            state if state is not None else b"",
            self.history_retention_ms,
            self.head_batch if heads is None else heads,
            len(members),
            len(fields),
            len(history),
            len(dead),
            *members,
            *fields,
            *history,
        ]
        for event_id, entry in dead:
            args += [event_id, entry]
        return args

    @staticmethod
    def _settled(raw: list[bytes]) -> Settled:
        if int(raw[0]) == 0:
            return Settled(ok=False)
        return Settled(ok=True, removed=int(raw[1]), heads=list(raw[2:]))

    async def settle(
        self,
        lease: Lease,
        members: Sequence[bytes],
        *,
        state: bytes | None = None,
        retry_fields: Iterable[str] = (),
        history: Sequence[bytes] = (),
        dead: Sequence[tuple[str, bytes]] = (),
        heads: int | None = None,
    ) -> Settled:
        """Remove ``members`` from the serial's mailbox (and ``depth``), store ``state``, drop the retry
        records ``retry_fields``, append ``history`` and put ``dead`` (event id, DLQ entry JSON) into the DLQ —
        atomically, fenced by the lease. Returns the mailbox's next ``heads`` entries.

        The members' ``ingested`` history entries (derived from the members; the producer writes none) are
        stored first, in the same step, so the serial's timeline keeps them once the mailbox no longer does.
        """
        args = self._settle_args(
            lease, members, state=state, retry_fields=retry_fields, history=history, dead=dead, heads=heads
        )
        return self._settled(await self.scripts.settle(args=args))

    async def settle_many(self, settles: Sequence[SettleRequest]) -> list[Settled]:
        """Several :meth:`settle` steps (of any serials) in one round trip; each is atomic and fenced on its own."""
        calls = [
            self._settle_args(
                req.lease, req.members, state=req.state, retry_fields=req.retry_fields, history=req.history
            )
            for req in settles
        ]
        return [self._settled(r) for r in await run_many(self.redis, self.scripts.settle, calls)]

    async def release(
        self,
        lease: Lease,
        *,
        delay_ms: int = 0,
        retry: tuple[str, bytes] | None = None,
        history: Sequence[bytes] = (),
    ) -> bool:
        """End the lease; if events remain, the serial is ready again after ``delay_ms`` (parked when > 0).

        ``retry`` stores a retry record (event id, JSON) in the same step. False when the lease was lost.
        """
        keys = account_keys(lease.account_id)
        raw = await self.scripts.release(
            args=[
                keys.base,
                lease.account_id,
                lease.serial,
                lease.token,
                max(0, delay_ms),
                ACTIVE_ACCOUNTS,
                NOTIFY,
                self.history_retention_ms,
                retry[0] if retry else "",
                retry[1] if retry else b"",
                *history,
            ]
        )
        return bool(int(raw[0]))

    async def release_many(self, leases: Sequence[Lease]) -> list[bool]:
        """:meth:`release` (no delay, no retry record, no history) of several serials in one round trip."""
        calls: list[list[EncodableT]] = [
            [
                account_keys(lease.account_id).base,
                lease.account_id,
                lease.serial,
                lease.token,
                0,
                ACTIVE_ACCOUNTS,
                NOTIFY,
                self.history_retention_ms,
                "",
                b"",
            ]
            for lease in leases
        ]
        return [bool(int(r[0])) for r in await run_many(self.redis, self.scripts.release, calls)]

    async def sweep(self, account_id: str) -> int:
        """Take over the account's expired leases and re-index it; returns how many leases were taken over."""
        raw = await self.scripts.sweep(
            args=[account_keys(account_id).base, account_id, ACTIVE_ACCOUNTS, NOTIFY]
        )
        return int(raw[0])
