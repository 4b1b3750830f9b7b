"""Apply one pass event to Klaviyo: the I/O half of :mod:`worker.plan`.

For each event the syncer sends, in this order, the writes :func:`worker.plan.plan` chose:

1. the profile upsert — first, so a flow triggered by the metric event finds the profile's contact details;
2. the WalletPass record (into the account's data source, provisioned by ``passbridge klaviyo setup``);
3. the metric event — last, so its flows see the new profile properties. A historical event (from an NDJSON
   backfill, or older than ``backfill_age_s`` when sent) goes with ``backfill: true``: Klaviyo records it
   but triggers no flow.

Every write is idempotent (profile and record are upserts keyed by serial, the metric event carries
``unique_id`` = event_id), so calling :meth:`Syncer.sync_event` again for an event whose writes partly went
through is safe. Identity conflicts (409 ``duplicate_profile``: the pass's email or phone belongs to another
pass's profile) are resolved here and never escape: the profile is written without the conflicting identifier,
the contact is kept as a profile property and a note goes on the serial's timeline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import structlog
from redis.asyncio import Redis

from passbridge.accounts import Account
from passbridge.event import PassEvent, utcnow
from worker.klaviyo.client import KlaviyoClient
from worker.klaviyo.endpoints import CREATE_DATA_SOURCE_RECORD, CREATE_EVENT, CREATE_OR_UPDATE_PROFILE
from worker.klaviyo.errors import (
    DATA_SOURCE_MISSING,
    Abandoned,
    AccountFault,
    NotProvisionedError,
    PermanentError,
)
from worker.plan import (
    WITHHELD_PROPERTY,
    Identifier,
    backfill_cutoff,
    contact_identifiers,
    plan,
    profile_body,
    record_job_body,
    withhold,
)
from worker.setup import load_provisioned
from worker.state import PassState

log = structlog.get_logger(__name__)

#: How long a process trusts its cached copy of an account's provisioned data source id.
PROVISIONED_CACHE_S = 60.0
#: Events that happened longer ago than this when they are sent go as backfills (``Settings.backfill_age_s``).
BACKFILL_AGE_S = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What the engine stores after an event: ``state`` (``None`` = unchanged) and timeline ``notes``."""

    state: PassState | None
    notes: list[str] = field(default_factory=list)


class PartialSync(Exception):
    """A later write of the event failed (``cause``) after an earlier one was accepted: the metric event after
    the profile and/or record writes, or the record after the profile (then ``state.record_pending`` is set).

    Klaviyo now holds ``state``: if the event is dead-lettered, the engine stores it with the dead letter, so
    the serial's next event is planned from what Klaviyo holds (a deleted pass must not become active again);
    a pending record is written by the next plan.
    """

    def __init__(self, state: PassState, cause: Exception) -> None:
        super().__init__(str(cause))
        self.state = state
        self.cause = cause


class Syncer:
    """Writes pass events to Klaviyo through a shared :class:`KlaviyoClient`."""

    def __init__(
        self, client: KlaviyoClient, redis: Redis, *, backfill_age_s: float = BACKFILL_AGE_S
    ) -> None:
        self.client = client
        self.redis = redis
        #: Metric events of events older than this when sent carry ``backfill: true`` (0: only NDJSON ones).
        self.backfill_age_s = backfill_age_s
        self._data_sources: dict[str, tuple[str, float]] = {}

    def old_before(self) -> datetime | None:
        """Events that happened before this are sent as backfills now (:func:`worker.plan.is_backfill`)."""
        return backfill_cutoff(self.backfill_age_s, utcnow())

    async def sync_event(
        self,
        account: Account,
        state: PassState | None,
        event: PassEvent,
        seq: int = 0,
        *,
        alive: Callable[[], bool] | None = None,
    ) -> SyncResult:
        """Apply ``event`` (arrival sequence ``seq``) on top of ``state`` (the serial's applied state) and return
        the state to store.

        Raises the :mod:`worker.klaviyo.errors` classes (a ``duplicate_profile`` conflict is handled here), or
        :class:`PartialSync` wrapping one when the record or metric write failed after an accepted write.
        ``alive``: checked before each call (each write, conflict retry and resend after a 429); once it says
        False the event's remaining writes are not sent and :class:`Abandoned` is raised, never wrapped in
        :class:`PartialSync`: the serial belongs to another holder, which replans the event from the stored
        state (the writes are idempotent).
        """
        p = plan(state, event, seq, self.old_before())
        notes = [p.note]
        new_state = p.new_state
        data_source_id = await self.data_source_id(account) if p.record is not None else None
        if p.profile is not None:
            assert new_state is not None
            new_state, conflict_notes = await self.write_profile(account, new_state, alive=alive)
            notes += conflict_notes
        if p.record is not None:
            assert data_source_id is not None
            try:
                await self.client.call(
                    account,
                    CREATE_DATA_SOURCE_RECORD,
                    body=record_job_body(p.record, data_source_id),
                    alive=alive,
                )
            except Abandoned:
                raise
            except Exception as exc:
                self.forget_data_source(account.account_id, exc)
                if new_state is None or p.profile is None:
                    raise
                raise PartialSync(new_state.model_copy(update={"record_pending": True}), exc) from exc
        try:
            await self.client.call(account, CREATE_EVENT, body=p.event, alive=alive)
        except Abandoned:
            raise
        except Exception as exc:
            if new_state is None or (p.profile is None and p.record is None):
                raise
            raise PartialSync(new_state, exc) from exc
        log.debug(
            "pass_event_synced",
            account=account.account_id,
            serial=event.serial_number,
            event_id=event.event_id,
            kind=event.kind.value,
            stale=p.stale,
            profile=p.profile is not None,
            record=p.record is not None,
        )
        return SyncResult(new_state, notes)

    async def data_source_id(self, account: Account) -> str:
        """The account's provisioned data source (cached briefly); :class:`NotProvisionedError` if none."""
        cached = self._data_sources.get(account.account_id)
        now = time.monotonic()
        if cached is not None and now - cached[1] < PROVISIONED_CACHE_S:
            return cached[0]
        provisioned = await load_provisioned(self.redis, account.account_id)
        if provisioned is None:
            raise NotProvisionedError(account.account_id, CREATE_DATA_SOURCE_RECORD.name)
        self._data_sources[account.account_id] = (provisioned.data_source_id, now)
        return provisioned.data_source_id

    def forget_data_source(self, account_id: str, exc: BaseException) -> None:
        """Drop the cached data source id of ``account_id`` when ``exc`` says Klaviyo no longer has it: the
        account is paused until setup provisions a new one, whose id must be read afresh on resume."""
        if isinstance(exc, AccountFault) and exc.code == DATA_SOURCE_MISSING:
            self._data_sources.pop(account_id, None)

    async def write_profile(
        self,
        account: Account,
        state: PassState,
        *,
        acquired: str | None = None,
        alive: Callable[[], bool] | None = None,
    ) -> tuple[PassState, list[str]]:
        """Upsert the profile; on ``duplicate_profile`` retry without the identifiers another profile owns.

        Returns the state as written (withheld identifiers marked) and timeline notes. ``acquired``: the
        rate-limit slot the caller already took for the first call. ``alive``: checked before each call
        (:meth:`KlaviyoClient.call`), so a lease lost during the conflict retries stops them (:class:`Abandoned`).
        """
        notes: list[str] = []
        other_profile = ""
        attempts = _withholding_orders(contact_identifiers(state))
        for i, drop in enumerate(attempts):
            candidate = state
            for f in drop:
                candidate = withhold(candidate, f)
            first, acquired = acquired, None
            try:
                await self.client.call(
                    account,
                    CREATE_OR_UPDATE_PROFILE,
                    body=profile_body(candidate),
                    acquired=first,
                    alive=alive,
                )
            except PermanentError as exc:
                if exc.code != "duplicate_profile" or i == len(attempts) - 1:
                    raise
                log.info(
                    "profile_identity_conflict",
                    account=account.account_id,
                    serial=state.serial_number,
                    tried_without=list(drop),
                    other_profile=exc.meta.get("duplicate_profile_id"),
                )
                other_profile = other_profile or str(exc.meta.get("duplicate_profile_id") or "")
                continue
            if drop:
                owner = f" ({other_profile})" if other_profile else ""
                notes.append(
                    "identity conflict: "
                    + ", ".join(
                        f"{f} {_mask(getattr(state, f))} belongs to another Klaviyo profile{owner}; "
                        f"written as property {WITHHELD_PROPERTY[f]}"
                        for f in drop
                    )
                )
            return candidate, notes
        raise AssertionError("unreachable: the last attempt either returns or raises")  # pragma: no cover


def _withholding_orders(identifiers: Sequence[Identifier]) -> list[tuple[Identifier, ...]]:
    """Which identifiers to leave out, attempt by attempt: none, then each alone, then all.

    Klaviyo's 409 does not say *which* identifier clashed, so with both an email and a phone the syncer first
    keeps the email (drops the phone), then keeps the phone, then drops both; at most four calls, and only
    for the first event that meets the conflict (the state remembers withheld values).
    """
    if not identifiers:
        return [()]
    if len(identifiers) == 1:
        return [(), (identifiers[0],)]
    return [(), *((f,) for f in reversed(identifiers)), tuple(identifiers)]


def _mask(value: str | None) -> str:
    """Enough of a contact to recognise it on a timeline without spelling it out."""
    if not value:
        return ""
    if "@" in value:
        local, _, domain = value.partition("@")
        return f"{local[:1]}***@{domain}"
    return f"***{value[-4:]}"
