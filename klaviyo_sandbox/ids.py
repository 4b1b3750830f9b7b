"""Identifiers shaped like Klaviyo's: 26-character ULIDs (profiles, data sources, object types), 11-character
event ids, 6-character metric ids, time-based UUIDs, and timestamps in Klaviyo's ISO format."""

from __future__ import annotations

import random
import string
import time
import uuid
from datetime import UTC, datetime

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_ALNUM = string.ascii_letters + string.digits
# Ids are not secrets; a non-cryptographic generator keeps id creation off the hot path's profile.
_rng = random.Random()
_UUID_EPOCH = 0x01B21DD213814000  # 100-ns intervals between 1582-10-15 and 1970-01-01


def ulid(now: float | None = None) -> str:
    """A ULID: 48-bit millisecond time then 80 random bits, Crockford base32 (sorts by creation time)."""
    ms = int((time.time() if now is None else now) * 1000)
    value = (ms << 80) | _rng.getrandbits(80)
    out = []
    for _ in range(26):
        out.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(out))


def short_id(length: int) -> str:
    """A random alphanumeric id (events use 11 characters, metrics and accounts 6)."""
    value = _rng.getrandbits(6 * length)
    out = []
    for _ in range(length):
        value, digit = divmod(value, 62)
        out.append(_ALNUM[digit])
    return "".join(out)


def time_uuid(ts: float, salt: int) -> str:
    """A version-1 (time-based) UUID for time ``ts``, as Klaviyo gives events; clock sequence and node come
    from ``salt`` so it is stable for one event without calling the OS on the hot path."""
    ticks = int(ts * 10_000_000) + _UUID_EPOCH
    node = (salt & 0xFFFFFFFFFFFF) | 0x010000000000  # multicast bit: not a real MAC, per RFC 4122
    fields = (
        ticks & 0xFFFFFFFF,
        (ticks >> 32) & 0xFFFF,
        ((ticks >> 48) & 0x0FFF) | 0x1000,
        0x80 | ((salt >> 48) & 0x3F),
        (salt >> 56) & 0xFF,
        node,
    )
    return str(uuid.UUID(fields=fields))


def iso(ts: float) -> str:
    """Klaviyo's datetime format: ``2026-09-04T13:39:37.131026+00:00``."""
    return datetime.fromtimestamp(ts, UTC).isoformat()


def iso_seconds(ts: int) -> str:
    """Whole-second datetime (events): ``2026-09-04T13:38:55+00:00``."""
    return datetime.fromtimestamp(ts, UTC).isoformat()
