"""Google Wallet callbacks over real HTTP and real Redis, signed exactly as ECv2SigningOnly specifies."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from passbridge.event import PassEvent
from passbridge.keys import account_keys
from producer.sources.google_ecv2 import (
    KeysFileError,
    MessageError,
    VerificationError,
    lv,
    parse_root_keys,
    serial_from_object_id,
    verify_callback,
)
from producer.sources.google_sign import GoogleSigner
from tests.producer.conftest import Env

ISSUER = "3388000000022123456"
URL = "/google/acme/callback"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class G:
    env: Env
    signer: GoogleSigner
    keys_file: Path


@pytest.fixture
async def g(env: Env, tmp_path: Path) -> G:
    signer = GoogleSigner(ISSUER)
    keys_file = signer.write_keys_file(tmp_path / "google-keys.json")
    await env.update_account(
        google_issuer_id=ISSUER,
        google_keys_file=str(keys_file),
        google_classes={f"{ISSUER}.loyalty": "ptk_0x216"},
    )
    return G(env, signer, keys_file)


async def mailbox(env: Env, serial: str) -> list[PassEvent]:
    raw = await env.redis.zrange(account_keys("acme").mailbox(serial), 0, -1)
    return [PassEvent.from_wire(m[12:], "acme") for m in raw]


async def send(g: G, body: bytes) -> tuple[int, dict[str, object]]:
    r = await g.env.http.post(URL, content=body, headers={"content-type": "application/json"})
    return r.status_code, r.json()


class TestCallbacks:
    """save → installed, del → uninstalled, nonce = event id, objectId → serial, classId → pass type."""

    async def test_save_then_del(self, g: G) -> None:
        status, doc = await send(g, g.signer.sign(g.signer.message("save", "SER1", "loyalty", "nonce-1")))
        assert status == 200, doc
        assert doc == {"event_id": "nonce-1", "status": "accepted", "duplicate": False}
        status, doc = await send(g, g.signer.sign(g.signer.message("del", "SER1", "loyalty", "nonce-2")))
        assert status == 200, doc
        events = await mailbox(g.env, "SER1")
        assert [(e.event_id, e.kind) for e in events] == [
            ("nonce-1", "installed"),
            ("nonce-2", "uninstalled"),
        ]
        assert {(e.platform, e.source, e.pass_type) for e in events} == {("google", "google", "ptk_0x216")}

    async def test_duplicate_nonce_is_accepted_once(self, g: G) -> None:
        body = g.signer.sign(g.signer.message("save", "SER1", "loyalty", "nonce-1"))
        assert (await send(g, body))[0] == 200
        status, doc = await send(g, body)
        assert status == 200
        assert doc["duplicate"] is True
        assert len(await mailbox(g.env, "SER1")) == 1

    async def test_unsynced_pass_type_is_acknowledged_and_counted_as_skipped(self, g: G) -> None:
        """As a webhook of that pass type: 200 skipped, nothing queued, counted in the account's skipped
        counters (which `accounts list` and `accounts check` show)."""
        await g.env.update_account(sync_pass_types=["ptk_other"])
        status, doc = await send(g, g.signer.sign(g.signer.message("save", "SER1", "loyalty", "nonce-1")))
        assert (status, doc["status"]) == (200, "skipped"), doc
        assert await mailbox(g.env, "SER1") == []
        stats = account_keys("acme").stats
        assert await g.env.redis.hmget(stats, ["skipped", "skipped:ptk_0x216"]) == [b"1", b"1"]

    async def test_object_id_mapping_mode(self, g: G) -> None:
        await g.env.update_account(google_serial_from="object_id")
        assert (await send(g, g.signer.sign(g.signer.message("save", "SER1", "loyalty", "n1"))))[0] == 200
        assert len(await mailbox(g.env, f"{ISSUER}.SER1")) == 1

    async def test_forged_with_another_root_key_is_401(self, g: G) -> None:
        forger = GoogleSigner(ISSUER)  # same issuer, keys Google never published
        status, doc = await send(g, forger.sign(forger.message("save", "SER1", "loyalty", "n1")))
        assert status == 401
        assert "root key" in str(doc["detail"])
        assert await mailbox(g.env, "SER1") == []

    async def test_forged_message_under_a_genuine_intermediate_key_is_401(self, g: G) -> None:
        """The chain is genuine but the message was altered after signing (del turned into save)."""
        body = orjson.loads(g.signer.sign(g.signer.message("del", "SER1", "loyalty", "n1")))
        body["signedMessage"] = body["signedMessage"].replace('"del"', '"save"')
        status, doc = await send(g, orjson.dumps(body))
        assert status == 401
        assert "message signature" in str(doc["detail"])

    async def test_signed_for_another_issuer_is_401(self, g: G) -> None:
        body = g.signer.sign(g.signer.message("save", "SER1", "loyalty", "n1"), recipient_id="999")
        assert (await send(g, body))[0] == 401

    async def test_expired_message_is_401(self, g: G) -> None:
        msg = g.signer.message("save", "SER1", "loyalty", "n1", exp_time_ms=now_ms() - 1000)
        status, doc = await send(g, g.signer.sign(msg))
        assert status == 401
        assert "expTimeMillis" in str(doc["detail"])
        assert await mailbox(g.env, "SER1") == []

    async def test_expired_intermediate_key_is_401(self, g: G) -> None:
        g.signer.intermediate_expires_ms = now_ms() - 1000
        status, doc = await send(g, g.signer.sign(g.signer.message("save", "SER1", "loyalty", "n1")))
        assert status == 401
        assert "intermediate signing key expired" in str(doc["detail"])

    async def test_expired_root_key_is_401_and_rotation_reloads_the_file(self, g: G) -> None:
        g.signer.write_keys_file(g.keys_file, root_expires_ms=now_ms() - 1000)
        body = g.signer.sign(g.signer.message("save", "SER1", "loyalty", "n1"))
        assert (await send(g, body))[0] == 401
        # a keys file holding an expired and a current key (Google's rotation): accepted, no restart needed
        old = GoogleSigner(ISSUER).keys_document(root_expires_ms=now_ms() - 1000)["keys"]
        current = g.signer.keys_document()["keys"]
        g.keys_file.write_bytes(orjson.dumps({"keys": old + current}) + b"\n")
        assert (await send(g, body))[0] == 200

    async def test_wrong_protocol_version_is_401(self, g: G) -> None:
        body = orjson.loads(g.signer.sign(g.signer.message("save", "SER1", "loyalty", "n1")))
        body["protocolVersion"] = "ECv2"
        assert (await send(g, orjson.dumps(body)))[0] == 401

    @pytest.mark.parametrize(
        ("message", "pointer"),
        [
            ({"classId": f"{ISSUER}.unknown"}, "/signedMessage/classId"),
            ({"objectId": "12345.SER1"}, "/signedMessage/objectId"),
            ({"eventType": "update"}, "/signedMessage/eventType"),
            ({"nonce": ""}, "/signedMessage/nonce"),
            ({"nonce": "n" * 201}, "/signedMessage/nonce"),
            ({"objectId": f"{ISSUER}.bad\nserial"}, "/signedMessage/objectId"),
        ],
    )
    async def test_verified_but_unmappable_message_is_422(
        self, g: G, message: dict[str, str], pointer: str
    ) -> None:
        msg = {**g.signer.message("save", "SER1", "loyalty", "n1"), **message}
        status, doc = await send(g, g.signer.sign(msg))
        assert status == 422, doc
        assert doc["errors"][0]["pointer"] == pointer  # type: ignore[index]

    async def test_account_without_google_settings_is_401(self, env: Env) -> None:
        signer = GoogleSigner(ISSUER)
        r = await env.http.post(URL, content=signer.sign(signer.message("save", "S", "loyalty", "n1")))
        assert r.status_code == 401
        assert r.json()["type"].endswith("/google-not-configured")

    async def test_unreadable_keys_file_is_503(self, g: G) -> None:
        g.keys_file.unlink()
        body = g.signer.sign(g.signer.message("save", "SER1", "loyalty", "n1"))
        r = await g.env.http.post(URL, content=body)
        assert r.status_code == 503
        assert "Retry-After" in r.headers

    async def test_unknown_account_is_404(self, g: G) -> None:
        body = g.signer.sign(g.signer.message("save", "SER1", "loyalty", "n1"))
        assert (await g.env.http.post("/google/nobody/callback", content=body)).status_code == 404


class TestVerificationUnit:
    """The pure verifier, without servers."""

    def test_signed_bytes_are_length_prefixed_little_endian(self) -> None:
        assert lv("ab", "") == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"
        assert lv("é") == b"\x02\x00\x00\x00\xc3\xa9"

    def test_round_trip_and_field_values(self) -> None:
        signer = GoogleSigner(ISSUER)
        keys = parse_root_keys(orjson.dumps(signer.keys_document()))
        msg = signer.message("del", "S9", "loyalty", "abc", exp_time_ms=now_ms() + 5000)
        out = verify_callback(signer.sign(msg), root_keys=keys, recipient_id=ISSUER, now_ms=now_ms())
        assert (out.class_id, out.object_id, out.event_type, out.nonce) == (
            f"{ISSUER}.loyalty",
            f"{ISSUER}.S9",
            "del",
            "abc",
        )

    def test_intermediate_key_signed_for_another_protocol_is_rejected(self) -> None:
        """The root signature covers the protocol version: an ECv1 signature does not carry over."""
        signer = GoogleSigner(ISSUER)
        keys = parse_root_keys(orjson.dumps(signer.keys_document()))
        body = orjson.loads(signer.sign(signer.message("save", "S", "loyalty", "n")))
        signed_key = body["intermediateSigningKey"]["signedKey"]
        wrong = signer.root.sign(lv("GooglePayPasses", "ECv1", signed_key), ec.ECDSA(hashes.SHA256()))
        body["intermediateSigningKey"]["signatures"] = [base64.b64encode(wrong).decode()]
        with pytest.raises(VerificationError, match="root key"):
            verify_callback(orjson.dumps(body), root_keys=keys, recipient_id=ISSUER, now_ms=now_ms())

    @pytest.mark.parametrize(
        ("raw", "reason"),
        [
            (b"nope", "not JSON"),
            (b"{}", "keys"),
            (b'{"keys": [{"protocolVersion": "ECv1", "keyValue": "x"}]}', "no ECv2SigningOnly"),
            (b'{"keys": [{"protocolVersion": "ECv2SigningOnly", "keyValue": "!!"}]}', r"keys\[0\]: keyValue"),
        ],
    )
    def test_bad_keys_files(self, raw: bytes, reason: str) -> None:
        with pytest.raises(KeysFileError, match=reason):
            parse_root_keys(raw)

    def test_serial_mapping(self) -> None:
        assert serial_from_object_id("123.abc.def", "123", "suffix") == "abc.def"
        assert serial_from_object_id("123.abc", "123", "object_id") == "123.abc"
        for bad in ("124.abc", "123.", "123abc"):
            with pytest.raises(MessageError):
                serial_from_object_id(bad, "123", "suffix")
