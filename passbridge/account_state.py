"""An account's state, apart from :mod:`passbridge.accounts` so that the CLI can offer it as an option cheaply."""

from __future__ import annotations

from enum import StrEnum


class AccountState(StrEnum):
    """Whether workers may send this account's events to Klaviyo."""

    connected = "connected"
    paused = "paused"
    disconnected = "disconnected"
