"""Google Wallet save/delete callbacks: verification of the ``ECv2SigningOnly`` signature chain (pure).

The callback body (the Google Pay token format)::

    {"protocolVersion": "ECv2SigningOnly",
     "intermediateSigningKey": {"signedKey": "<JSON: keyValue, keyExpiration>", "signatures": ["<b64>", ...]},
     "signature": "<b64>",
     "signedMessage": "<JSON: classId, objectId, expTimeMillis, eventType, nonce>"}

Verification, as Google's Tink ``PaymentMethodTokenRecipient`` does it:

1. ``protocolVersion`` is ``ECv2SigningOnly``.
2. One of ``intermediateSigningKey.signatures`` verifies with one of Google's root keys (protocol
   ``ECv2SigningOnly``, not expired) over ``lv("GooglePayPasses") ‖ lv("ECv2SigningOnly") ‖ lv(signedKey)``,
   where ``lv(x)`` is x's UTF-8 length as 4 bytes little-endian followed by x.
3. ``signedKey.keyExpiration`` (epoch ms) has not passed.
4. ``signature`` verifies with ``signedKey.keyValue`` over
   ``lv("GooglePayPasses") ‖ lv(recipientId) ‖ lv("ECv2SigningOnly") ‖ lv(signedMessage)``; the recipient id
   is the issuer id.
5. ``signedMessage.expTimeMillis`` has not passed.

Keys are ECDSA P-256 in base64 X.509 SubjectPublicKeyInfo (DER); signatures are ECDSA-SHA256 in DER.
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

SENDER_ID = "GooglePayPasses"
PROTOCOL = "ECv2SigningOnly"
EVENT_TYPES = ("save", "del")
MAX_NONCE_CHARS = 200


class VerificationError(Exception):
    """The callback is not authentically Google's, or no longer valid; ``reason`` says which check failed."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KeysFileError(ValueError):
    """The configured root keys cannot be read."""


class MessageError(ValueError):
    """The verified message lacks a field or has a wrong one (``field`` names it)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RootKey:
    """One of Google's root signing keys."""

    public_key: ec.EllipticCurvePublicKey
    #: Epoch ms after which the key is no longer trusted; ``None`` = no expiry given.
    expires_ms: int | None


@dataclass(frozen=True, slots=True)
class CallbackMessage:
    """The verified content of a callback."""

    class_id: str
    object_id: str
    event_type: str  # save | del
    nonce: str
    exp_time_ms: int


def lv(*parts: str) -> bytes:
    """The signed-bytes encoding: each part as 4-byte little-endian length followed by its UTF-8 bytes."""
    out = bytearray()
    for part in parts:
        raw = part.encode()
        out += struct.pack("<I", len(raw)) + raw
    return bytes(out)


def _public_key(b64: Any) -> ec.EllipticCurvePublicKey:
    if not isinstance(b64, str):
        raise ValueError("keyValue must be a base64 string")
    try:
        key = load_der_public_key(base64.b64decode(b64, validate=True))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"keyValue is not a base64 DER public key: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("keyValue must be an ECDSA P-256 public key")
    return key


def _millis(value: Any) -> int:
    """Epoch ms sent as a JSON number or as a string of digits (Google's key files use strings)."""
    if isinstance(value, bool):
        raise ValueError("not a timestamp")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise ValueError("not epoch milliseconds")


def parse_root_keys(raw: bytes) -> list[RootKey]:
    """The ``ECv2SigningOnly`` keys of a keys document in the format of Google's key URL::

        {"keys": [{"keyValue": "<b64 DER>", "protocolVersion": "ECv2SigningOnly", "keyExpiration": "<ms>"}]}

    Keys of other protocol versions are skipped; expiry is checked at verification time.
    """
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise KeysFileError(f"not JSON: {exc}") from None
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise KeysFileError('expected {"keys": [...]}')
    keys = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("protocolVersion") != PROTOCOL:
            continue
        try:
            expires = entry.get("keyExpiration")
            keys.append(
                RootKey(_public_key(entry.get("keyValue")), None if expires is None else _millis(expires))
            )
        except ValueError as exc:
            raise KeysFileError(f"keys[{i}]: {exc}") from None
    if not keys:
        raise KeysFileError(f"no {PROTOCOL} keys")
    return keys


def _verify(key: ec.EllipticCurvePublicKey, signature_b64: Any, data: bytes) -> bool:
    if not isinstance(signature_b64, str):
        return False
    try:
        key.verify(base64.b64decode(signature_b64, validate=True), data, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def _str_field(doc: Any, name: str, where: str) -> str:
    value = doc.get(name) if isinstance(doc, dict) else None
    if not isinstance(value, str):
        raise VerificationError(f"{where}{name} is missing or not a string")
    return value


def verify_callback(
    body: bytes, *, root_keys: list[RootKey], recipient_id: str, now_ms: int
) -> CallbackMessage:
    """Verify a callback body and return its message.

    Raises :class:`VerificationError` when any check of the chain fails (forged, expired, malformed
    envelope) and :class:`MessageError` when the verified message's fields are wrong.
    """
    try:
        envelope = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise VerificationError("the body is not JSON") from None
    if not isinstance(envelope, dict) or envelope.get("protocolVersion") != PROTOCOL:
        raise VerificationError(f"protocolVersion must be {PROTOCOL}")
    intermediate = envelope.get("intermediateSigningKey")
    signed_key = _str_field(intermediate, "signedKey", "intermediateSigningKey.")
    signatures = intermediate.get("signatures") if isinstance(intermediate, dict) else None
    if not isinstance(signatures, list) or not signatures:
        raise VerificationError("intermediateSigningKey.signatures is missing or empty")
    signed_message = _str_field(envelope, "signedMessage", "")
    signature = _str_field(envelope, "signature", "")

    # 2. the intermediate key is signed by a current root key
    key_bytes = lv(SENDER_ID, PROTOCOL, signed_key)
    current = [k for k in root_keys if k.expires_ms is None or k.expires_ms > now_ms]
    if not current:
        raise VerificationError("every configured Google root key has expired")
    if not any(_verify(root.public_key, sig, key_bytes) for root in current for sig in signatures):
        raise VerificationError("the intermediate signing key is not signed by a current Google root key")

    # 3. the intermediate key has not expired
    try:
        key_doc = orjson.loads(signed_key)
        intermediate_key = _public_key(key_doc.get("keyValue") if isinstance(key_doc, dict) else None)
        key_expires = _millis(key_doc.get("keyExpiration"))
    except (orjson.JSONDecodeError, ValueError) as exc:
        raise VerificationError(f"intermediateSigningKey.signedKey is malformed: {exc}") from None
    if key_expires <= now_ms:
        raise VerificationError(f"the intermediate signing key expired at {key_expires} ms")

    # 4. the message is signed by the intermediate key, for this recipient
    if not _verify(intermediate_key, signature, lv(SENDER_ID, recipient_id, PROTOCOL, signed_message)):
        raise VerificationError(
            "the message signature does not verify for this issuer with the intermediate signing key"
        )

    # 5. the message has not expired
    try:
        message = orjson.loads(signed_message)
    except orjson.JSONDecodeError:
        raise VerificationError("signedMessage is not JSON") from None
    if not isinstance(message, dict):
        raise VerificationError("signedMessage is not a JSON object")
    try:
        exp = _millis(message.get("expTimeMillis"))
    except ValueError:
        raise MessageError("expTimeMillis", "required: epoch milliseconds") from None
    if exp <= now_ms:
        raise VerificationError(f"the message expired at {exp} ms (expTimeMillis)")
    return _message(message, exp)


def _message(message: dict[str, Any], exp: int) -> CallbackMessage:
    fields = {}
    for name in ("classId", "objectId", "eventType", "nonce"):
        value = message.get(name)
        if not isinstance(value, str) or not value:
            raise MessageError(name, "required: a non-empty string")
        fields[name] = value
    if fields["eventType"] not in EVENT_TYPES:
        raise MessageError("eventType", f"must be one of {', '.join(EVENT_TYPES)}")
    if len(fields["nonce"]) > MAX_NONCE_CHARS:
        raise MessageError("nonce", f"longer than {MAX_NONCE_CHARS} characters")
    return CallbackMessage(fields["classId"], fields["objectId"], fields["eventType"], fields["nonce"], exp)


def serial_from_object_id(object_id: str, issuer_id: str, mode: str) -> str:
    """The pass serial for ``object_id``: ``suffix`` takes what follows ``"<issuerId>."``, ``object_id`` takes it
    whole. Raises :class:`MessageError` when the object id does not fit the mode."""
    if mode == "object_id":
        serial = object_id
    elif mode == "suffix":
        prefix = issuer_id + "."
        if not object_id.startswith(prefix) or len(object_id) == len(prefix):
            raise MessageError("objectId", f"must be '{prefix}<serial>' for this account")
        serial = object_id[len(prefix) :]
    else:
        raise MessageError("objectId", f"the account's google_serial_from {mode!r} is not suffix|object_id")
    if len(serial) > 255:
        raise MessageError("objectId", "the serial it maps to is longer than 255 characters")
    return serial
