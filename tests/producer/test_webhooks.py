"""POST /webhooks/{account_id}: Standard Webhooks signatures, rotation, tolerance, payload mapping."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
from standardwebhooks import Webhook

from passbridge.event import PassEvent
from passbridge.keys import account_keys
from tests.factories import webhook_secret
from tests.producer.conftest import Env

URL = "/webhooks/acme"


def payload(serial: str = "SER1", kind: str = "installed", **data: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": f"pass.{kind}",
        "timestamp": "2026-11-25T10:00:00Z",
        "data": {
            "serialNumber": serial,
            "passType": "ptk_0x216",
            "platform": "apple",
            "customer": {"email": "Ada@Example.COM", "phone": "(415) 555-0123"},
            "fields": {
                "points": 120,
                "tier": "gold",
                "member_since": "2024-03-01",
                "store": "SF",
                "vip": True,
            },
        },
    }
    body["data"].update(data)
    return body


def signed(
    secret: str, msg_id: str, body: dict[str, Any] | bytes, *, ts: float | None = None
) -> tuple[bytes, dict[str, str]]:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    when = datetime.fromtimestamp(ts if ts is not None else time.time(), tz=UTC)
    return raw, {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(when.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, when, raw.decode()),
        "content-type": "application/json",
    }


async def post(env: Env, raw: bytes, headers: dict[str, str], url: str = URL) -> httpx.Response:
    return await env.http.post(url, content=raw, headers=headers)


async def mailbox(env: Env, serial: str) -> list[PassEvent]:
    raw = await env.redis.zrange(account_keys("acme").mailbox(serial), 0, -1)
    return [PassEvent.from_wire(m[12:], "acme") for m in raw]


class TestWebhooks:
    """Verification, dedup, ordering and the payload mapping."""

    async def test_happy_path_maps_the_payload(self, env: Env) -> None:
        r = await post(env, *signed(env.secret, "msg_1", payload(passUrl="https://example.com/p/1")))
        assert r.status_code == 202, r.text
        assert r.json() == {"event_id": "msg_1", "status": "accepted", "duplicate": False}
        [ev] = await mailbox(env, "SER1")
        assert ev.event_id == "msg_1"
        assert (ev.kind, ev.platform, ev.source, ev.pass_type) == (
            "installed",
            "apple",
            "webhook",
            "ptk_0x216",
        )
        assert ev.occurred_at == datetime(2026, 11, 25, 10, tzinfo=UTC)
        assert ev.email == "Ada@example.com"
        assert ev.phone_number == "+14155550123"
        assert ev.pass_url == "https://example.com/p/1"
        assert ev.properties == {
            "points": 120,
            "tier": "gold",
            "member_since": "2024-03-01",
            "store": "SF",
            "vip": True,
        }

    async def test_redelivery_is_a_duplicate(self, env: Env) -> None:
        raw, headers = signed(env.secret, "msg_1", payload())
        assert (await post(env, raw, headers)).status_code == 202
        # a retry is signed again with a new attempt timestamp: same webhook-id, still a duplicate
        r = await post(env, *signed(env.secret, "msg_1", payload(), ts=time.time() + 3))
        assert r.status_code == 202
        assert r.json()["duplicate"] is True
        assert len(await mailbox(env, "SER1")) == 1

    async def test_out_of_order_deliveries_are_ordered_by_timestamp(self, env: Env) -> None:
        late = {**payload(kind="updated"), "timestamp": "2026-11-25T12:00:00Z"}
        early = {**payload(kind="created"), "timestamp": "2026-11-25T09:00:00Z"}
        assert (await post(env, *signed(env.secret, "msg_late", late))).status_code == 202
        assert (await post(env, *signed(env.secret, "msg_early", early))).status_code == 202
        assert [e.kind for e in await mailbox(env, "SER1")] == ["created", "updated"]

    async def test_bad_signature_is_401(self, env: Env) -> None:
        raw, headers = signed(webhook_secret(), "msg_1", payload())
        r = await post(env, raw, headers)
        assert r.status_code == 401
        assert r.json()["type"].endswith("/bad-signature")
        raw, headers = signed(env.secret, "msg_1", payload())
        tampered = raw.replace(b"installed", b"uninstalled")
        assert (await post(env, tampered, headers)).status_code == 401
        headers["webhook-id"] = "msg_2"  # the id is signed too
        assert (await post(env, raw, headers)).status_code == 401
        assert await mailbox(env, "SER1") == []

    @pytest.mark.parametrize(
        ("drop", "garble"),
        [("webhook-signature", None), ("webhook-id", None), (None, "v1"), (None, "nonsense")],
    )
    async def test_missing_or_malformed_headers_are_401(
        self, env: Env, drop: str | None, garble: str | None
    ) -> None:
        raw, headers = signed(env.secret, "msg_1", payload())
        if drop:
            del headers[drop]
        if garble:
            headers["webhook-signature"] = garble
        assert (await post(env, raw, headers)).status_code == 401

    # 5 s past the 300-s tolerance: the header holds whole seconds (truncated), and the request reaches the
    # server some milliseconds after signing, so +301 was sometimes only 300.x s ahead there (flaky 202).
    @pytest.mark.parametrize(("offset", "reason"), [(-305, "older"), (+305, "future")])
    async def test_timestamp_outside_tolerance_is_401(self, env: Env, offset: int, reason: str) -> None:
        r = await post(env, *signed(env.secret, "msg_1", payload(), ts=time.time() + offset))
        assert r.status_code == 401
        assert reason in r.json()["detail"]

    async def test_rotated_secrets(self, env: Env) -> None:
        old, new = env.secret, webhook_secret()
        await env.update_account(
            secrets=env.account.secrets.model_copy(update={"webhook_secrets": [new, old]})
        )
        assert (await post(env, *signed(old, "msg_old", payload("S1")))).status_code == 202
        assert (await post(env, *signed(new, "msg_new", payload("S2")))).status_code == 202
        # a sender mid-rotation signs with both; one match is enough
        raw, headers = signed(new, "msg_both", payload("S3"))
        headers["webhook-signature"] += " " + signed(old, "msg_both", raw)[1]["webhook-signature"]
        assert (await post(env, raw, headers)).status_code == 202
        # the old secret retired: its signatures stop working
        await env.update_account(secrets=env.account.secrets.model_copy(update={"webhook_secrets": [new]}))
        assert (await post(env, *signed(old, "msg_late", payload("S4")))).status_code == 401
        assert (await post(env, *signed(new, "msg_ok", payload("S4")))).status_code == 202

    @pytest.mark.parametrize(
        ("body", "pointer", "reason"),
        [
            ({"type": "pass.exploded"}, "/type", "must be one of"),
            ({"type": ["pass.created"]}, "/type", "must be one of"),
            ({"type": {"pass.created": 1}}, "/type", "must be one of"),
            ({"type": None}, "/type", "must be one of"),
            ({"timestamp": "yesterday"}, "/timestamp", "datetime"),
            ({"timestamp": "9999-12-31T23:59:59-01:00"}, "/timestamp", "out of range"),
            ({"timestamp": "2031-01-01T00:00:00Z"}, "/timestamp", "more than 24 hours in the future"),
            ({"data": "nope"}, "/data", "object"),
            ({"data": {"customer": {"email": "nope@"}}}, "/data/customer/email", "email"),
            ({"data": {"customer": {"phone": "12"}}}, "/data/customer/phone", "phone"),
            ({"data": {"customer": 5}}, "/data/customer", "object"),
            ({"data": {"customer": []}}, "/data/customer", "must be an object"),
            ({"data": {"customer": ""}}, "/data/customer", "must be an object"),
            ({"data": {"customer": 0}}, "/data/customer", "must be an object"),
            ({"data": {"customer": False}}, "/data/customer", "must be an object"),
            ({"data": {"fields": []}}, "/data/fields", "must be an object"),
            ({"data": {"fields": ""}}, "/data/fields", "must be an object"),
            ({"data": {"fields": 0}}, "/data/fields", "must be an object"),
            ({"data": {"fields": False}}, "/data/fields", "must be an object"),
            ({"data": {"fields": [1]}}, "/data/fields", "must be an object"),
            ({"data": {"serialNumber": ""}}, "/data/serialNumber", "at least 1"),
            ({"data": {"passType": "has space"}}, "/data/passType", "pattern"),
            ({"data": {"platform": "windows"}}, "/data/platform", "apple"),
            ({"data": {"passUrl": "ftp://x"}}, "/data/passUrl", "http"),
            ({"data": {"fields": {"deep": {"a": 1}}}}, "/data/fields", "scalar"),
        ],
    )
    async def test_invalid_payload_is_422_pointing_into_it(
        self, env: Env, body: dict[str, Any], pointer: str, reason: str
    ) -> None:
        doc = payload()
        for key, value in body.items():
            if key == "data" and isinstance(value, dict):
                for k, v in value.items():
                    doc["data"][k] = {**doc["data"][k], **v} if isinstance(v, dict) and k == "customer" else v
            else:
                doc[key] = value
        r = await post(env, *signed(env.secret, "msg_1", doc))
        assert r.status_code == 422, r.text
        [err] = r.json()["errors"]
        assert err["pointer"].startswith(pointer), err
        assert reason in err["detail"], err
        assert await env.redis.get(account_keys("acme").depth) is None

    async def test_each_bad_field_points_at_itself(self, env: Env) -> None:
        doc = payload(fields={"tier": "gold", "deep": {"a": 1}, "$points": 1, " tier": "silver"})
        r = await post(env, *signed(env.secret, "msg_1", doc))
        assert r.status_code == 422, r.text
        assert [e["pointer"] for e in r.json()["errors"]] == [
            "/data/fields/deep",
            "/data/fields/$points",
            "/data/fields/ tier",
        ]

    async def test_missing_serial_points_into_the_payload(self, env: Env) -> None:
        doc = payload()
        del doc["data"]["serialNumber"]
        r = await post(env, *signed(env.secret, "msg_1", doc))
        assert r.status_code == 422
        assert r.json()["errors"][0]["pointer"] == "/data/serialNumber"

    async def test_null_customer_and_fields_mean_none(self, env: Env) -> None:
        r = await post(env, *signed(env.secret, "msg_1", payload(customer=None, fields=None)))
        assert r.status_code == 202, r.text
        [ev] = await mailbox(env, "SER1")
        assert (ev.email, ev.phone_number, ev.properties) == (None, None, {})

    @pytest.mark.parametrize("body", [b"[]", b'"pass.created"', b"null"])
    async def test_body_not_an_object_points_at_the_whole_body(self, env: Env, body: bytes) -> None:
        r = await post(env, *signed(env.secret, "msg_1", body))
        assert r.status_code == 422, r.text
        assert r.json()["errors"] == [{"pointer": "", "field": "(body)", "detail": "expected a JSON object"}]

    async def test_signed_but_not_json_is_400(self, env: Env) -> None:
        assert (await post(env, *signed(env.secret, "msg_1", b"{not json"))).status_code == 400

    async def test_unknown_account_is_404(self, env: Env) -> None:
        raw, headers = signed(env.secret, "msg_1", payload())
        assert (await post(env, raw, headers, url="/webhooks/nobody")).status_code == 404

    async def test_oversize_body_is_413(self, env: Env) -> None:
        raw = b"{" + b" " * env.settings.max_body_bytes + b"}"
        _, headers = signed(env.secret, "msg_1", b"{}")
        assert (await post(env, raw, headers)).status_code == 413

    async def test_chunked_body_without_length_is_read_whole(self, env: Env) -> None:
        raw, headers = signed(env.secret, "msg_chunked", payload("SER_CHUNKED"))

        async def pieces():  # type: ignore[no-untyped-def]  # no content-length: sent chunked, in 3 parts
            for i in range(0, len(raw), len(raw) // 3 + 1):
                yield raw[i : i + len(raw) // 3 + 1]

        r = await env.http.post(URL, content=pieces(), headers=headers)
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "accepted"

    async def test_chunked_body_over_the_limit_is_413(self, env: Env) -> None:
        _, headers = signed(env.secret, "msg_1", b"{}")
        part = b" " * 65536

        async def pieces():  # type: ignore[no-untyped-def]
            yield b"{"
            for _ in range(env.settings.max_body_bytes // len(part) + 1):
                yield part
            yield b"}"

        r = await env.http.post(URL, content=pieces(), headers=headers)
        assert r.status_code == 413
        assert "limit" in r.json()["detail"]


class TestWebhooksBuiltTogether:
    """Concurrent webhooks are verified and normalized together in the publisher; each still gets its own
    answer, and a rejected one never takes the others down with it."""

    async def test_each_concurrent_webhook_gets_its_own_answer(self, env: Env) -> None:
        good = [signed(env.secret, f"msg_{i}", payload(serial=f"SER{i}")) for i in range(6)]
        forged = signed(webhook_secret(), "msg_forged", payload(serial="SERF"))
        invalid = signed(env.secret, "msg_invalid", payload(serial="SERX", platform="windows"))
        not_json = signed(env.secret, "msg_raw", b"{not json")
        requests = [*good, forged, invalid, not_json, good[0]]
        answers = await asyncio.gather(*(post(env, raw, headers) for raw, headers in requests))

        assert [r.status_code for r in answers] == [202] * 6 + [401, 422, 400, 202]
        assert answers[7].json()["errors"][0]["pointer"] == "/data/platform"
        # The repeated first webhook is one of two in flight at once: exactly one of them is the duplicate.
        assert sorted(r.json()["duplicate"] for r in (answers[0], answers[-1])) == [False, True]
        for i in range(6):
            [ev] = await mailbox(env, f"SER{i}")
            assert ev.event_id == f"msg_{i}"
        assert await mailbox(env, "SERF") == []
        assert await mailbox(env, "SERX") == []
        assert int(await env.redis.get(account_keys("acme").depth) or 0) == 6

    async def test_unsynced_pass_type_is_acknowledged_and_skipped(self, env: Env) -> None:
        await env.update_account(sync_pass_types=["ptk_other"])
        r = await post(env, *signed(env.secret, "msg_1", payload()))
        assert r.status_code == 202, r.text
        assert r.json() == {
            "event_id": "msg_1",
            "status": "skipped",
            "duplicate": False,
            "reason": "pass type ptk_0x216 is not synced for this account",
        }
        assert await mailbox(env, "SER1") == []
        assert await env.redis.hget(account_keys("acme").stats, "skipped:ptk_0x216") == b"1"
