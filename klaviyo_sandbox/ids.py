"""Identifiers shaped like Klaviyo's: 26-character ULIDs (profiles, data sources, object types), 11-character
event ids, 6-character metric ids, time-based UUIDs, and timestamps in Klaviyo's ISO format."""

from __future__ import annotations

import os
import secrets
import string
import time
import uuid
from datetime import UTC, datetime

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ALNUM = string.ascii_letters + string.digits


def ulid(now: float | None = None) -> str:
    """A ULID: 48-bit millisecond time then 80 random bits, Crockford base32 (sorts by creation time)."""
    ms = int((time.time() if now is None else now) * 1000)
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    out = []
    for _ in range(26):
        out.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(out))


def short_id(length: int) -> str:
    """A random alphanumeric id (events use 11 characters, metrics and accounts 6)."""
    return "".join(secrets.choice(_ALNUM) for _ in range(length))


def time_uuid() -> str:
    """A time-based UUID, as Klaviyo gives events."""
    return str(uuid.uuid1())


def iso(ts: float) -> str:
    """Klaviyo's datetime format: ``2026-09-04T13:39:37.131026+00:00``."""
    return datetime.fromtimestamp(ts, UTC).isoformat()


def iso_seconds(ts: int) -> str:
    """Whole-second datetime (events): ``2026-09-04T13:38:55+00:00``."""
    return datetime.fromtimestamp(ts, UTC).isoformat()
