"""Backpressure: Redis down and a full backlog answer 503 with Retry-After and write nothing; what was
acknowledged survives Redis being killed."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from passbridge.keys import account_keys
from passbridge.redis_server import RedisServer, free_port, start_redis
from passbridge.settings import Settings
from producer.app import create_app
from producer.sources.apple import pass_token
from producer.sources.google_sign import GoogleSigner
from tests.conftest import serve
from tests.factories import event, make_account
from tests.producer.conftest import Env, cipher
from tests.producer.test_webhooks import payload, signed

URL = "/v1/accounts/acme/events"
AUTH = {"Authorization": "Bearer tok-acme"}
PTID = "pass.com.acme.loyalty"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The producers of these tests have a high-water mark of 3 pending events."""
    return settings.model_copy(update={"backlog_high_water": 3})


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis server of this test's own (AOF on), which the test stops and restarts."""
    server = start_redis(tmp_path / "redis", free_port(), appendonly=True)
    yield server
    server.stop()


async def test_redis_stopped_mid_test_is_503_then_recovers(
    own_redis: RedisServer, settings: Settings, tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"redis_url": own_redis.url})
    redis = Redis.from_url(own_redis.url)
    await make_account(redis, cipher(settings))
    await redis.aclose()
    server = serve(create_app(settings, own_redis.url))
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
            assert (await http.post(URL, json=event(1), headers=AUTH)).status_code == 202

            own_redis.stop()
            started = time.monotonic()
            for item in (event(2), [event(3), event(4)]):
                r = await http.post(URL, json=item, headers=AUTH)
                assert r.status_code == 503, r.text
                assert r.headers["Retry-After"] == "3"
                assert r.headers["content-type"] == "application/problem+json"
            assert time.monotonic() - started < 10  # prompt, not a hang
            assert (await http.get("/readyz")).status_code == 503
            assert (await http.get("/healthz")).status_code == 200

            restarted = start_redis(own_redis.data_dir, own_redis.port, appendonly=True)
            try:
                assert (await http.get("/readyz")).status_code == 200
                r = await http.post(URL, json=event(2), headers=AUTH)
                assert r.status_code == 202, r.text
                assert r.json()["duplicate"] is False  # nothing of the refused attempt was written
                # the event accepted before the outage survived it (AOF) and is still deduplicated
                assert (await http.post(URL, json=event(1), headers=AUTH)).json()["duplicate"] is True
                check = Redis.from_url(restarted.url)
                assert int(await check.get(account_keys("acme").depth)) == 2
                await check.aclose()
            finally:
                restarted.stop()
    finally:
        server.stop()


async def test_every_acknowledged_event_survives_redis_killed_with_sigkill(
    own_redis: RedisServer, settings: Settings
) -> None:
    """Redis writes its AOF before it replies, and the producer answers only after Redis did: so a Redis process
    killed at any instant (SIGKILL: no shutdown, no last write) loses no acknowledged event, even with the
    default ``appendfsync everysec``. (A crash of the whole host is another matter: README, "Durability".)"""
    settings = settings.model_copy(update={"redis_url": own_redis.url, "backlog_high_water": 1_000_000})
    redis = Redis.from_url(own_redis.url)
    await make_account(redis, cipher(settings))
    await redis.aclose()
    server = serve(create_app(settings, own_redis.url))
    acknowledged: set[str] = set()
    enough = asyncio.Event()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:

            async def send(n: int) -> None:
                # Concurrent requests: several share each Redis call, as under real load.
                for i in range(n, 100_000, 16):
                    r = await http.post(URL, json=event(i), headers=AUTH)
                    if r.status_code != 202:
                        return  # Redis is gone: this and later events were never acknowledged
                    acknowledged.add(f"evt-{i}")
                    if len(acknowledged) >= 300:
                        enough.set()

            senders = [asyncio.create_task(send(n)) for n in range(16)]
            await asyncio.wait_for(enough.wait(), 30)
            os.kill(own_redis.pid, signal.SIGKILL)  # mid-stream, with requests in flight
            await asyncio.gather(*senders)
    finally:
        server.stop()
    restarted = start_redis(own_redis.data_dir, own_redis.port, appendonly=True)
    try:
        check = Redis.from_url(restarted.url)
        keys = account_keys("acme")
        stored: set[str] = set()
        async for key in check.scan_iter(match=keys.mailbox("*")):
            for member in await check.zrange(key, 0, -1):
                stored.add(orjson.loads(member[12:])["id"])  # after the 12-hex-digit sequence
        depth = int(await check.get(keys.depth) or 0)
        await check.aclose()
    finally:
        restarted.stop()
    assert len(acknowledged) >= 300
    assert acknowledged <= stored, f"{len(acknowledged - stored)} acknowledged events lost"
    assert depth == len(stored)


async def test_backlog_over_high_water_is_503_with_nothing_half_written(env: Env, tmp_path: Path) -> None:
    assert env.settings.backlog_high_water == 3
    signer = GoogleSigner("111")
    await env.update_account(
        google_issuer_id="111",
        google_keys_file=str(signer.write_keys_file(tmp_path / "keys.json")),
        google_classes={"111.loyalty": "ptk_0x216"},
    )
    keys = account_keys("acme")
    assert (await env.http.post(URL, json=[event(1), event(2)], headers=AUTH)).status_code == 202

    # two more would make 4 > 3: refused whole, not one of two written
    r = await env.http.post(URL, json=[event(3), event(4)], headers=AUTH)
    assert r.status_code == 503
    assert r.headers["Retry-After"] == "3"
    # The numbers an operator can check: the backlog is under the mark; the batch would take it over.
    assert r.json()["detail"] == (
        "account acme has 2 pending events; the new events would take it over its high-water mark of 3; "
        "nothing was written"
    )
    assert int(await env.redis.get(keys.depth)) == 2
    assert await env.redis.exists(keys.mailbox("SER00000003")) == 0

    # a duplicate needs no room: still answered
    r = await env.http.post(URL, json=event(1), headers=AUTH)
    assert (r.status_code, r.json()["duplicate"]) == (202, True)

    assert (await env.http.post(URL, json=event(3), headers=AUTH)).status_code == 202  # exactly at the mark

    # every source refuses the same way once the backlog is full
    raw, headers = signed(env.secret, "msg_1", payload("W1"))
    assert (await env.http.post("/webhooks/acme", content=raw, headers=headers)).status_code == 503
    apple = {"Authorization": "ApplePass " + pass_token("apple-secret-acme", PTID, "A1")}
    apple_url = f"/apple/acme/v1/devices/dev1/registrations/{PTID}/A1"
    r = await env.http.post(apple_url, json={"pushToken": "t"}, headers=apple)
    assert r.status_code == 503
    assert r.json()["detail"] == (
        "the new events would take account acme's backlog over its high-water mark of 3; nothing was written"
    )
    assert await env.redis.exists(keys.apple_regs(PTID, "A1")) == 0  # the registration was not kept either
    assert await env.redis.exists(keys.apple_gen(PTID, "A1")) == 0
    body = signer.sign(signer.message("save", "G1", "loyalty", "n1"))
    assert (await env.http.post("/google/acme/callback", content=body)).status_code == 503
    ndjson = b"\n".join(orjson.dumps(event(i)) for i in range(10, 13))
    r = await env.http.post(URL + "/ndjson", content=ndjson, headers=AUTH)
    assert r.status_code == 503
    assert r.json()["resume_after_line"] == 0
    assert int(await env.redis.get(keys.depth)) == 3

    # the backlog drains (the engine removes events); the same deliveries are accepted now
    await env.redis.set(keys.depth, 0)
    assert (await env.http.post("/webhooks/acme", content=raw, headers=headers)).status_code == 202
    assert (await env.http.post(apple_url, json={"pushToken": "t"}, headers=apple)).status_code == 201
    assert (await env.http.post("/google/acme/callback", content=body)).status_code == 200


@pytest.mark.parametrize("with_file", [False, True])
async def test_redis_restarted_empty_is_503_until_accounts_return_never_404(
    own_redis: RedisServer, settings: Settings, tmp_path: Path, with_file: bool
) -> None:
    """Redis came back without its data (no AOF, a new container without its volume): every account is
    unknown. A 404 would make senders drop their events for good; the producer answers 503 instead until an
    account is registered again, and applies its accounts file again at once when it has one."""
    settings = settings.model_copy(update={"redis_url": own_redis.url})
    if with_file:
        accounts = tmp_path / "accounts.yaml"
        accounts.write_text("accounts:\n  acme: {name: Acme, ingest_token: tok-acme}\n")
        settings = settings.model_copy(update={"accounts_file": accounts})
    else:
        redis = Redis.from_url(own_redis.url)
        await make_account(redis, cipher(settings))
        await redis.aclose()
    server = serve(create_app(settings, own_redis.url))
    restarted: RedisServer | None = None
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=15) as http:
            assert (await http.post(URL, json=event(1), headers=AUTH)).status_code == 202
            own_redis.stop()
            restarted = start_redis(tmp_path / "empty", own_redis.port, appendonly=False)
            server.server.config.app.state.ctx.forget("acme")  # its cached copy: as after ACCOUNT_CACHE_S
            r = await http.post(URL, json=event(2), headers=AUTH)
            if with_file:
                assert r.status_code == 202, r.text
            else:
                assert r.status_code == 503, r.text
                assert r.headers["content-type"] == "application/problem+json"
                assert r.json()["type"].endswith("redis-data-lost")
                assert r.headers["Retry-After"] == "3"
                # An account registered again: the next request goes through, and unknown ones are 404.
                check = Redis.from_url(restarted.url)
                await make_account(check, cipher(settings))
                await check.aclose()
                assert (await http.post(URL, json=event(2), headers=AUTH)).status_code == 202
                other = await http.post(URL.replace("acme", "ghost"), json=event(3), headers=AUTH)
                assert other.status_code == 404
    finally:
        server.stop()
        if restarted is not None:
            restarted.stop()


async def test_the_dashboard_answers_503_while_redis_is_down(
    own_redis: RedisServer, settings: Settings
) -> None:
    """Its pages read Redis without answering for an outage themselves: a 503 to retry, not a 500 with a
    traceback in the log (and a connection reset for the next request on it)."""
    token = "admin-token-of-this-test-0123456789"
    settings = settings.model_copy(update={"redis_url": own_redis.url, "admin_token": SecretStr(token)})
    server = serve(create_app(settings, own_redis.url))
    headers = {"authorization": f"Bearer {token}"}
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=15, headers=headers) as http:
            assert (await http.get("/dashboard")).status_code == 200
            own_redis.stop()
            for path in ("/dashboard", "/dashboard/workers", "/dashboard/dlq"):  # one kept-alive connection
                r = await http.get(path)
                assert r.status_code == 503, (path, r.text)
                assert r.headers["Retry-After"] == "3"
                assert "Redis did not answer" in r.text
            assert (await http.post("/dashboard/login", data={"token": token})).status_code == 503
    finally:
        server.stop()
