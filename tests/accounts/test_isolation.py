"""Tenancy over real HTTP: account A's ingest token or webhook secret can never write events for account B."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import orjson
import pytest
from redis.asyncio import Redis
from standardwebhooks import Webhook

from passbridge.crypto import load_cipher
from passbridge.keys import account_keys
from passbridge.settings import Settings
from tests.conftest import LiveServer
from tests.factories import event, make_account, webhook_secret


@dataclass
class Tenants:
    http: httpx.AsyncClient
    redis: Redis
    secrets: dict[str, str]


@pytest.fixture
async def tenants(producer: LiveServer, redis: Redis, settings: Settings) -> AsyncIterator[Tenants]:
    cipher = load_cipher(
        settings.secret_key.get_secret_value() if settings.secret_key else None, settings.state_dir
    )
    secrets = {}
    for account_id in ("alpha", "beta"):
        secrets[account_id] = webhook_secret()
        await make_account(
            redis, cipher, account_id, token=f"tok-{account_id}", secrets=[secrets[account_id]]
        )
    async with httpx.AsyncClient(base_url=producer.url, timeout=10) as http:
        yield Tenants(http, redis, secrets)


async def keys_of(redis: Redis, account_id: str) -> list[bytes]:
    """Every queue key of the account (the registry entry aside)."""
    base = account_keys(account_id)
    return sorted([k async for k in redis.scan_iter(match=base.base + ":*") if k.decode() != base.config])


def signed(secret: str, msg_id: str, payload: dict[str, object]) -> tuple[bytes, dict[str, str]]:
    body = orjson.dumps(payload)
    now = datetime.now(tz=UTC)
    signature = Webhook(secret).sign(msg_id, now, body.decode())
    return body, {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
    }


def webhook_payload(serial: str) -> dict[str, object]:
    return {
        "type": "pass.created",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": {"serialNumber": serial, "passType": "ptk_0x216", "platform": "apple"},
    }


class TestIngestTokens:
    @pytest.mark.parametrize("route", ["/v1/accounts/beta/events", "/v1/accounts/beta/events/ndjson"])
    async def test_token_of_alpha_cannot_write_to_beta(self, tenants: Tenants, route: str) -> None:
        body = orjson.dumps(event(1)) + (b"\n" if route.endswith("ndjson") else b"")
        r = await tenants.http.post(route, content=body, headers={"Authorization": "Bearer tok-alpha"})
        assert r.status_code == 401
        assert r.headers["content-type"] == "application/problem+json"
        assert await keys_of(tenants.redis, "beta") == []
        assert await keys_of(tenants.redis, "alpha") == []  # nor did it land with alpha

    async def test_each_token_writes_only_its_own_account(self, tenants: Tenants) -> None:
        for account_id in ("alpha", "beta"):
            r = await tenants.http.post(
                f"/v1/accounts/{account_id}/events",
                json=event(1, serial=f"S-{account_id}"),
                headers={"Authorization": f"Bearer tok-{account_id}"},
            )
            assert r.status_code == 202, r.text
        for account_id, other in (("alpha", "beta"), ("beta", "alpha")):
            keys = account_keys(account_id)
            assert await tenants.redis.zcard(keys.mailbox(f"S-{account_id}")) == 1
            assert await tenants.redis.zcard(keys.mailbox(f"S-{other}")) == 0
            assert await tenants.redis.get(keys.depth) == b"1"

    async def test_the_body_cannot_name_another_account(self, tenants: Tenants) -> None:
        r = await tenants.http.post(
            "/v1/accounts/alpha/events",
            json={**event(1), "account_id": "beta"},
            headers={"Authorization": "Bearer tok-alpha"},
        )
        assert r.status_code == 422
        assert await keys_of(tenants.redis, "beta") == []

    async def test_same_event_id_in_two_accounts_is_two_events(self, tenants: Tenants) -> None:
        """Dedup memory is per account: beta's event is not swallowed because alpha sent the same id."""
        for account_id in ("alpha", "beta"):
            r = await tenants.http.post(
                f"/v1/accounts/{account_id}/events",
                json=event(7),
                headers={"Authorization": f"Bearer tok-{account_id}"},
            )
            assert r.json()["status"] == "accepted"

    async def test_unknown_account_is_404_not_a_token_oracle(self, tenants: Tenants) -> None:
        r = await tenants.http.post(
            "/v1/accounts/gamma/events", json=event(1), headers={"Authorization": "Bearer tok-alpha"}
        )
        assert r.status_code == 404


class TestWebhookSecrets:
    async def test_secret_of_alpha_cannot_sign_for_beta(self, tenants: Tenants) -> None:
        body, headers = signed(tenants.secrets["alpha"], "msg_1", webhook_payload("S1"))
        r = await tenants.http.post("/webhooks/beta", content=body, headers=headers)
        assert r.status_code == 401
        assert await keys_of(tenants.redis, "beta") == []
        # The very same request is good for the account whose secret signed it.
        r = await tenants.http.post("/webhooks/alpha", content=body, headers=headers)
        assert r.status_code == 202, r.text
        assert await tenants.redis.zcard(account_keys("alpha").mailbox("S1")) == 1
        assert await keys_of(tenants.redis, "beta") == []

    async def test_rotation_keeps_isolation(self, tenants: Tenants, settings: Settings) -> None:
        """With several active secrets per account (rotation), none of alpha's opens beta."""
        cipher = load_cipher(
            settings.secret_key.get_secret_value() if settings.secret_key else None, settings.state_dir
        )
        extra = webhook_secret()
        await make_account(
            tenants.redis, cipher, "alpha", token="tok-alpha", secrets=[tenants.secrets["alpha"], extra]
        )
        for i, secret in enumerate((tenants.secrets["alpha"], extra)):
            body, headers = signed(secret, f"msg_{i}", webhook_payload(f"S{i}"))
            assert (
                await tenants.http.post("/webhooks/beta", content=body, headers=headers)
            ).status_code == 401
        assert await keys_of(tenants.redis, "beta") == []
