"""Tenancy: one account's credentials never write into another account."""

from __future__ import annotations

from pathlib import Path

from passbridge.keys import account_keys
from producer.sources.apple import pass_token
from producer.sources.google_sign import GoogleSigner
from tests.factories import event, make_account
from tests.producer.conftest import Env, cipher
from tests.producer.test_webhooks import payload, signed

PTID = "pass.com.acme.loyalty"


async def test_credentials_of_account_a_cannot_write_to_b(env: Env, tmp_path: Path) -> None:
    """A's ingest token, webhook secret, Apple token secret and Google keys are all refused by B's routes."""
    signer_a = GoogleSigner("111")
    signer_b = GoogleSigner("222")
    await env.update_account(
        google_issuer_id="111",
        google_keys_file=str(signer_a.write_keys_file(tmp_path / "a.json")),
        google_classes={"111.loyalty": "ptk_0x216"},
    )
    await make_account(
        env.redis,
        cipher(env.settings),
        "globex",
        token="tok-globex",
        google_issuer_id="222",
        google_keys_file=str(signer_b.write_keys_file(tmp_path / "b.json")),
        google_classes={"222.loyalty": "ptk_0x216", "111.loyalty": "ptk_0x216"},
    )
    a_token = {"Authorization": "Bearer tok-acme"}

    r = await env.http.post("/v1/accounts/globex/events", json=event(1), headers=a_token)
    assert r.status_code == 401
    r = await env.http.post("/v1/accounts/globex/events/ndjson", content=b"{}\n", headers=a_token)
    assert r.status_code == 401

    raw, headers = signed(env.secret, "msg_1", payload())
    assert (await env.http.post("/webhooks/globex", content=raw, headers=headers)).status_code == 401

    a_apple = {"Authorization": "ApplePass " + pass_token("apple-secret-acme", PTID, "SER1")}
    url = f"/apple/globex/v1/devices/dev1/registrations/{PTID}/SER1"
    assert (await env.http.post(url, json={"pushToken": "t"}, headers=a_apple)).status_code == 401
    assert (await env.http.delete(url, headers=a_apple)).status_code == 401

    # a callback Google signed for A's issuer (even with a class B happens to map) does not verify for B
    body = signer_a.sign(signer_a.message("save", "SER1", "loyalty", "n1"))
    assert (await env.http.post("/google/globex/callback", content=body)).status_code == 401

    assert await env.redis.keys("pb:a:globex:*") == [account_keys("globex").config.encode()]

    # and the same credentials work on their own account
    assert (
        await env.http.post("/v1/accounts/acme/events", json=event(1), headers=a_token)
    ).status_code == 202
    assert (await env.http.post("/webhooks/acme", content=raw, headers=headers)).status_code == 202
    acme_url = f"/apple/acme/v1/devices/dev1/registrations/{PTID}/SER1"
    assert (await env.http.post(acme_url, json={"pushToken": "t"}, headers=a_apple)).status_code == 201
    assert (await env.http.post("/google/acme/callback", content=body)).status_code == 200
