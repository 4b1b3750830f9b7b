"""Apple PassKit web service: the pass authentication token and the ids of the events a pass fires.

**The token.** Every pass carries an ``authenticationToken`` in its ``pass.json``; the device sends it back as
``Authorization: ApplePass <token>`` when it registers or unregisters. passbridge stores no per-pass token:
it derives it as ::

    hex(HMAC-SHA256(key = account's apple_token_secret, msg = passTypeIdentifier + "/" + serialNumber))

The pass platform computes the same value when it builds ``pass.json`` (it knows the account's secret), so
passbridge can check any pass of the account without having seen it before. The ``/`` separator cannot occur
in a passTypeIdentifier (reverse-DNS), so no other (pass type, serial) pair shares a token.

**Event ids.** Apple sends no event id. ``installed`` fires when a pass's device count goes 0 → 1 and
``uninstalled`` when it goes 1 → 0; the id is ``apple:<kind>:<digest of pass>:<install generation>``, where the
generation counts the pass's 0 → 1 transitions. A retried request finds the registration already made and
fires nothing; a later reinstall of the same pass has a new generation and thus a new id.
"""

from __future__ import annotations

import hashlib
import hmac
import re

#: Apple documents no format for deviceLibraryIdentifier (devices send 32 hex characters); this keeps it
#: safe inside a Redis key (no ':' that could make two (device, pass type) pairs share a key).
DEVICE_ID = re.compile(r"[A-Za-z0-9._\-]{1,255}")  # used with fullmatch: "$" would allow a final "\n"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_PUSH_TOKEN_CHARS = 512
MAX_SERIAL_CHARS = 255


def pass_token(secret: str, pass_type_id: str, serial: str) -> str:
    """The ``authenticationToken`` of a pass (64 hex characters; Apple requires at least 16)."""
    message = f"{pass_type_id}/{serial}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def check_authorization(header: str | None, secret: str | None, pass_type_id: str, serial: str) -> bool:
    """Whether ``Authorization: ApplePass <token>`` carries this pass's token (constant-time compare)."""
    if not header or not secret:
        return False
    scheme, _, token = header.partition(" ")
    if scheme != "ApplePass" or not token:
        return False
    return hmac.compare_digest(token.strip().encode(), pass_token(secret, pass_type_id, serial).encode())


def pass_digest(pass_type_id: str, serial: str) -> str:
    """A short fixed-length name for a pass, so event ids stay short whatever the serial's length."""
    return hashlib.sha256(f"{pass_type_id}/{serial}".encode()).hexdigest()[:32]


def event_id_prefix(kind: str, pass_type_id: str, serial: str) -> str:
    """The event id without its generation: ``apple:<kind>:<pass digest>:`` (the Lua script appends it)."""
    return f"apple:{kind}:{pass_digest(pass_type_id, serial)}:"


def serial_problem(serial: str) -> str | None:
    """Why ``serial`` cannot be a pass serial, or ``None`` when it can."""
    if not serial or len(serial) > MAX_SERIAL_CHARS:
        return f"serialNumber must be 1..{MAX_SERIAL_CHARS} characters"
    if _CONTROL.search(serial):
        return "serialNumber must not contain control characters"
    return None


def device_problem(device_id: str) -> str | None:
    """Why ``device_id`` cannot be a deviceLibraryIdentifier, or ``None`` when it can."""
    if not DEVICE_ID.fullmatch(device_id):
        return "deviceLibraryIdentifier must be 1..255 letters, digits, '.', '_' or '-'"
    return None


def parse_updated_since(tag: str | None) -> int:
    """The ``passesUpdatedSince`` tag (epoch ms, as passbridge hands it out in ``lastUpdated``); 0 when absent.

    An unreadable tag counts as absent: the device then gets every serial, which is always safe.
    """
    if tag and tag.isascii() and tag.isdigit():  # isdigit() alone also takes '²', which int() refuses
        return int(tag)
    return 0
