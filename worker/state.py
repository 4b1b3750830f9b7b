"""The applied state of one pass (account, serial): what passbridge last wrote to Klaviyo for it.

The engine stores it per serial (``AccountKeys.state``) only through :meth:`PassState.to_json` /
:meth:`PassState.from_json`, and hands it back to :func:`worker.plan.plan` with the serial's next event.
It is what makes "state never goes backwards" checkable: an event older than ``updated_at`` is stale.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from passbridge.event import EventKind, Platform, Scalar


class PassStatus(StrEnum):
    """The WalletPass record's status: the lifecycle state machine of DESIGN §2.4 (``deleted`` is terminal)."""

    active = "active"
    uninstalled = "uninstalled"
    deleted = "deleted"


#: Event kind → the status it moves a pass to (unless the pass is deleted, which it stays).
STATUS_OF: dict[EventKind, PassStatus] = {
    EventKind.created: PassStatus.active,
    EventKind.installed: PassStatus.active,
    EventKind.updated: PassStatus.active,
    EventKind.uninstalled: PassStatus.uninstalled,
    EventKind.deleted: PassStatus.deleted,
}


class PassState(BaseModel):
    """The last applied state of one pass, as written to its Klaviyo profile and WalletPass record."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    serial_number: str
    pass_type: str
    platform: Platform
    status: PassStatus
    pass_url: str
    email: str | None = None
    phone_number: str | None = None
    #: The pass's custom fields (merged: a field an event does not carry keeps its last value).
    properties: dict[str, Scalar] = Field(default_factory=dict)
    #: The earliest ``occurred_at`` known for the pass (a late, older event may move it back).
    created_at: datetime
    #: ``occurred_at`` of the newest applied event: the ordering guard (older events are stale).
    updated_at: datetime
    #: ``event_id`` of the newest applied event (a redelivery of it is not stale).
    event_id: str
    #: Arrival sequence (the mailbox member's prefix) of the newest applied event; 0 = unknown. It breaks ties
    #: of ``updated_at`` by arrival: a replayed event that arrived before the applied one, with the same
    #: ``occurred_at``, is stale.
    seq: int = 0
    #: Contact identifiers another Klaviyo profile owns (409 ``duplicate_profile``): identifier → value.
    #: They are written as plain profile properties instead, until the pass carries a different value.
    withheld: dict[Literal["email", "phone_number"], str] = Field(default_factory=dict)
    #: Klaviyo's profile holds this state but the WalletPass record may not: its record write failed for good
    #: after the profile write was accepted (the event was dead-lettered). The next plan writes the record
    #: whatever else changes, and the state stored after that write clears the flag. Storing the state keeps
    #: the next event from being planned from the older one (a deleted pass written active again).
    record_pending: bool = False

    def to_json(self) -> bytes:
        """Compact JSON for Redis."""
        return orjson.dumps(self.model_dump(mode="json", exclude_defaults=True))

    @classmethod
    def from_json(cls, raw: bytes | str) -> PassState:
        """Inverse of :meth:`to_json` (validated)."""
        return cls.model_validate_json(raw)
