"""A Google Wallet callback *signer*, for tests and the demo only — never used by the producer.

Google signs real callbacks with keys only Google holds. To exercise the verification end to end, this module
plays Google's part with its own keys, signing exactly as ``ECv2SigningOnly`` specifies (see
:mod:`producer.sources.google_ecv2`): a root key signs an intermediate key, which signs the message. The
account's ``google_keys_file`` then holds :meth:`GoogleSigner.keys_document` instead of Google's keys.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from producer.sources.google_ecv2 import PROTOCOL, SENDER_ID, lv


def _now_ms() -> int:
    return int(time.time() * 1000)


def _spki_b64(key: ec.EllipticCurvePrivateKey) -> str:
    der = key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(der).decode()


def _sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> str:
    return base64.b64encode(key.sign(data, ec.ECDSA(hashes.SHA256()))).decode()


@dataclass
class GoogleSigner:
    """A root key and an intermediate key, signing callbacks for one issuer."""

    issuer_id: str
    root: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    intermediate: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    #: When the intermediate key expires (epoch ms); default one day from creation.
    intermediate_expires_ms: int = field(default_factory=lambda: _now_ms() + 86_400_000)

    def keys_document(self, root_expires_ms: int | None = None) -> dict[str, Any]:
        """The root key in the format of Google's key URL (what ``google_keys_file`` holds)."""
        expires = root_expires_ms if root_expires_ms is not None else _now_ms() + 365 * 86_400_000
        return {
            "keys": [
                {"keyValue": _spki_b64(self.root), "protocolVersion": PROTOCOL, "keyExpiration": str(expires)}
            ]
        }

    def write_keys_file(self, path: Path, root_expires_ms: int | None = None) -> Path:
        """Write :meth:`keys_document` to ``path``."""
        path.write_bytes(orjson.dumps(self.keys_document(root_expires_ms)))
        return path

    def message(
        self,
        event_type: str,
        object_suffix: str,
        class_suffix: str,
        nonce: str,
        *,
        exp_time_ms: int | None = None,
    ) -> dict[str, Any]:
        """A callback message for ``<issuerId>.<object_suffix>`` of class ``<issuerId>.<class_suffix>``."""
        return {
            "classId": f"{self.issuer_id}.{class_suffix}",
            "objectId": f"{self.issuer_id}.{object_suffix}",
            "expTimeMillis": exp_time_ms if exp_time_ms is not None else _now_ms() + 3_600_000,
            "eventType": event_type,
            "nonce": nonce,
        }

    def sign(self, message: dict[str, Any], *, recipient_id: str | None = None) -> bytes:
        """The complete callback body for ``message`` (signed for ``recipient_id``, default the issuer)."""
        signed_key = orjson.dumps(
            {"keyValue": _spki_b64(self.intermediate), "keyExpiration": str(self.intermediate_expires_ms)}
        ).decode()
        signed_message = orjson.dumps(message).decode()
        return orjson.dumps(
            {
                "protocolVersion": PROTOCOL,
                "intermediateSigningKey": {
                    "signedKey": signed_key,
                    "signatures": [_sign(self.root, lv(SENDER_ID, PROTOCOL, signed_key))],
                },
                "signature": _sign(
                    self.intermediate,
                    lv(SENDER_ID, recipient_id or self.issuer_id, PROTOCOL, signed_message),
                ),
                "signedMessage": signed_message,
            }
        )
