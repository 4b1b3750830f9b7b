"""A scripted stand-in for Klaviyo at the engine's one boundary (the ``Syncer`` protocol).

It applies events with the real pure ``worker.plan.plan`` and records what was "written" per serial, and it
raises the real ``worker.klaviyo.errors`` classes when a test scripts a failure for an event id. Engine
tests use it to exercise ordering, retries, the DLQ and pauses in-process and fast; the end-to-end tests
use the real ``Syncer`` against the Klaviyo sandbox instead.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from passbridge.accounts import Account
from passbridge.event import PassEvent
from worker.klaviyo.errors import Abandoned, KlaviyoError
from worker.plan import plan
from worker.state import PassState
from worker.sync import SyncResult


@dataclass
class ScriptedSyncer:
    """Records writes; raises scripted errors; optionally slow or blocking for chosen serials."""

    #: event_id → errors to raise on its next attempts, in order (then it succeeds).
    failures: dict[str, list[KlaviyoError]] = field(default_factory=dict)
    #: account → error raised for every event of it while set (e.g. an AuthError).
    account_errors: dict[str, KlaviyoError] = field(default_factory=dict)
    delay_s: float = 0.0
    #: serials whose sync blocks until ``unblock`` is set.
    block: set[str] = field(default_factory=set)
    unblock: asyncio.Event = field(default_factory=asyncio.Event)
    #: (account, serial) → event ids written, in the order they were written.
    written: dict[tuple[str, str], list[str]] = field(default_factory=lambda: defaultdict(list))
    #: (account, serial) → (state given, state returned) of every call that succeeded.
    states: dict[tuple[str, str], list[PassState | None]] = field(default_factory=lambda: defaultdict(list))
    attempts: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    in_flight: int = 0
    max_in_flight: int = 0

    async def sync_event(
        self,
        account: Account,
        state: PassState | None,
        event: PassEvent,
        seq: int = 0,
        *,
        alive: Callable[[], bool] | None = None,
    ) -> SyncResult:
        self.attempts[event.event_id] += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if event.serial_number in self.block:
                await self.unblock.wait()
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if alive is not None and not alive():
                # As the real client: nothing is sent once the lease is gone.
                raise Abandoned("scripted")
            if account.account_id in self.account_errors:
                raise self.account_errors[account.account_id]
            queued = self.failures.get(event.event_id)
            if queued:
                raise queued.pop(0)
            p = plan(state, event, seq)
            key = (account.account_id, event.serial_number)
            self.written[key].append(event.event_id)
            self.states[key].append(p.new_state or state)
            return SyncResult(p.new_state, [p.note])
        finally:
            self.in_flight -= 1
