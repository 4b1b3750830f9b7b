"""OAuth accounts against the sandbox (refresh tokens rotate there, so a second refresh of the same grant would
fail loudly): bearer calls, refresh on 401 and before expiry, one refresh for many coroutines and for two
processes at once, and a revoked grant that disconnects the account instead of looping."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from passbridge.accounts import Account, AccountSecrets, AccountState, AccountStore, OAuthTokens
from passbridge.keys import account_keys
from passbridge.settings import Settings
from tests.conftest import serve
from tests.sync.conftest import (
    OAUTH_CLIENT_ID,
    OAUTH_CLIENT_SECRET,
    RATE_SCALE,
    REVISION,
    RequestRecorder,
    grant_tokens,
    make_client,
    oauth_grant,
    put_oauth_account,
)
from worker.klaviyo.client import ClientOptions, KlaviyoClient
from worker.klaviyo.endpoints import CREATE_EVENT
from worker.klaviyo.errors import AuthError, TransientError
from worker.klaviyo.oauth import OAuthManager

ROOT = Path(__file__).resolve().parents[2]


def event(i: int) -> dict[str, Any]:
    return {
        "data": {
            "type": "event",
            "attributes": {
                "properties": {"n": i},
                "unique_id": f"oauth-{i}",
                "metric": {"data": {"type": "metric", "attributes": {"name": "Pass Updated"}}},
                "profile": {"data": {"type": "profile", "attributes": {"external_id": "OAUTH-1"}}},
            },
        }
    }


@pytest.fixture
def control(rotating_sandbox_server: Any) -> Iterator[Any]:
    from klaviyo_sandbox.client import SandboxClient

    with SandboxClient(rotating_sandbox_server.url, account="KSYNC1") as c:
        c.reset()
        yield c


async def test_bearer_token_and_exact_scopes(
    redis: Redis, store: AccountStore, rotating_sandbox_server: Any, control: Any, recorder: RequestRecorder
) -> None:
    account = await put_oauth_account(store, rotating_sandbox_server.url)
    assert account.secrets.klaviyo_oauth is not None
    assert sorted(account.secrets.klaviyo_oauth.scopes) == [
        "custom-objects:read",
        "custom-objects:write",
        "events:write",
        "lists:read",
        "lists:write",
        "profiles:read",
        "profiles:write",
    ]
    async with make_client(redis, store, rotating_sandbox_server.url, recorder) as client:
        assert (await client.call(account, CREATE_EVENT, body=event(1))).status == 202
        assert client.oauth.refreshes == 0
    token = account.secrets.klaviyo_oauth.access_token
    assert token is not None
    assert recorder.api_requests()[0].headers["authorization"] == f"Bearer {token.get_secret_value()}"


async def test_expired_token_is_refreshed_once_for_many_coroutines(
    redis: Redis, store: AccountStore, rotating_sandbox_server: Any, control: Any, recorder: RequestRecorder
) -> None:
    account = await put_oauth_account(store, rotating_sandbox_server.url)
    old = account.secrets.klaviyo_oauth
    assert old is not None
    async with make_client(
        redis, store, rotating_sandbox_server.url, recorder, oauth_refresh_skew_s=0
    ) as client:
        await client.call(account, CREATE_EVENT, body=event(0))
        assert control.expire_access_tokens() >= 1
        replies = await asyncio.gather(
            *(client.call(account, CREATE_EVENT, body=event(i)) for i in range(1, 11))
        )
        assert all(r.status == 202 for r in replies)
        assert client.oauth.refreshes == 1
    stored = (await store.get(account.account_id)).secrets.klaviyo_oauth
    assert stored is not None
    assert stored.access_token is not None
    assert old.access_token is not None
    assert stored.access_token.get_secret_value() != old.access_token.get_secret_value()
    assert stored.refresh_token != old.refresh_token  # the sandbox rotated it and we kept the new one
    assert control.count("create_event", 401) >= 1
    assert control.count("create_event", 202) == 11


async def test_token_is_refreshed_before_it_expires(
    redis: Redis, store: AccountStore, rotating_sandbox_server: Any, control: Any, recorder: RequestRecorder
) -> None:
    account = await put_oauth_account(store, rotating_sandbox_server.url)
    assert account.secrets.klaviyo_oauth is not None
    soon = account.model_copy(
        update={
            "secrets": account.secrets.model_copy(
                update={
                    "klaviyo_oauth": account.secrets.klaviyo_oauth.model_copy(
                        update={"expires_at": time.time() + 30}
                    )
                }
            )
        }
    )
    await store.put(soon)
    async with make_client(
        redis, store, rotating_sandbox_server.url, recorder, oauth_refresh_skew_s=60
    ) as client:
        assert (await client.call(soon, CREATE_EVENT, body=event(1))).status == 202
        assert client.oauth.refreshes == 1
        assert (await client.call(soon, CREATE_EVENT, body=event(2))).status == 202
        assert client.oauth.refreshes == 1  # the new token lasts an hour
    assert control.count("create_event", 401) == 0


async def test_revoked_grant_disconnects_the_account(
    redis: Redis, store: AccountStore, rotating_sandbox_server: Any, control: Any, recorder: RequestRecorder
) -> None:
    account = await put_oauth_account(store, rotating_sandbox_server.url)
    assert account.secrets.klaviyo_oauth is not None
    assert account.secrets.klaviyo_oauth.refresh_token is not None
    async with httpx.AsyncClient() as http:
        revoked = await http.post(
            f"{rotating_sandbox_server.url}/oauth/revoke",
            data={"token": account.secrets.klaviyo_oauth.refresh_token.get_secret_value()},
            auth=(OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET),
        )
    assert revoked.status_code == 200
    async with make_client(
        redis, store, rotating_sandbox_server.url, recorder, oauth_refresh_skew_s=0
    ) as client:
        with pytest.raises(AuthError) as first:
            await client.call(account, CREATE_EVENT, body=event(1))
        assert first.value.code == "disconnected"
        assert client.oauth.refreshes == 1
        stored = await store.get(account.account_id)
        assert stored.state is AccountState.disconnected
        assert "invalid_grant" in stored.state_reason
        assert "reconnect" in stored.state_reason
        # No loop: later calls fail at once and never ask the token endpoint again.
        for i in range(3):
            with pytest.raises(AuthError):
                await client.call(account, CREATE_EVENT, body=event(2 + i))
        assert client.oauth.refreshes == 1
    secret = account.secrets.klaviyo_oauth.refresh_token.get_secret_value()
    assert secret not in str(first.value)
    assert secret not in repr(first.value)
    assert secret not in stored.state_reason


async def _store_oauth(store: AccountStore, account_id: str, tokens: OAuthTokens) -> None:
    """Store ``tokens`` as the account's grant, as another process or the OAuth callback would."""

    def change(a: Account | None) -> Account:
        assert a is not None
        return a.model_copy(update={"secrets": a.secrets.model_copy(update={"klaviyo_oauth": tokens})})

    await store.update(account_id, change)


async def _refresh_once(
    redis: Redis,
    store: AccountStore,
    rotating_sandbox_server: Any,
    control: Any,
    recorder: RequestRecorder,
    account: Account,
    hook: Callable[[httpx.Request], Awaitable[None]],
) -> None:
    """Call once, expire the access tokens, call again: the client refreshes once, ``hook`` seeing its
    requests (the token request included) before they go out."""
    async with KlaviyoClient(
        redis,
        store,
        base_url=rotating_sandbox_server.url,
        revision=REVISION,
        rate_scale=RATE_SCALE,
        options=ClientOptions(oauth_refresh_skew_s=0),
        event_hooks={"request": [recorder.hook, hook]},
    ) as client:
        await client.call(account, CREATE_EVENT, body=event(0))
        assert control.expire_access_tokens() >= 1
        assert (await client.call(account, CREATE_EVENT, body=event(1))).status == 202
        assert client.oauth.refreshes == 1


async def test_refused_refresh_uses_the_tokens_another_process_stored_meanwhile(
    redis: Redis, store: AccountStore, rotating_sandbox_server: Any, control: Any, recorder: RequestRecorder
) -> None:
    """Another process refreshed the grant (Klaviyo rotated the refresh token) between this process's registry
    read and its own token request: Klaviyo answers ``invalid_grant``, but the registry now holds the other
    process's tokens, so they are used and the account stays connected."""
    account = await put_oauth_account(store, rotating_sandbox_server.url)
    old = account.secrets.klaviyo_oauth
    assert old is not None
    assert old.refresh_token is not None
    other: dict[str, str] = {}

    async def other_process_refreshes_first(request: httpx.Request) -> None:
        if request.url.path != "/oauth/token" or other:
            return
        # What the other process does while holding the lock: refresh with the same refresh token, then store.
        async with httpx.AsyncClient() as http:
            r = await http.post(
                f"{rotating_sandbox_server.url}/oauth/token",
                data={"grant_type": "refresh_token", "refresh_token": old.refresh_token.get_secret_value()},
                auth=(OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET),
            )
        assert r.status_code == 200, r.text
        other.update(r.json())
        tokens = old.model_copy(
            update={
                "access_token": SecretStr(other["access_token"]),
                "refresh_token": SecretStr(other["refresh_token"]),
                "expires_at": time.time() + float(other["expires_in"]),
            }
        )

        await _store_oauth(store, account.account_id, tokens)

    await _refresh_once(
        redis, store, rotating_sandbox_server, control, recorder, account, other_process_refreshes_first
    )
    assert other["refresh_token"] != old.refresh_token.get_secret_value()  # rotated: ours was refused
    assert recorder.api_requests()[-1].headers["authorization"] == f"Bearer {other['access_token']}"
    stored = await store.get(account.account_id)
    assert stored.state is AccountState.connected
    assert stored.secrets.klaviyo_oauth is not None
    assert stored.secrets.klaviyo_oauth.refresh_token == SecretStr(other["refresh_token"])


async def test_a_grant_stored_during_the_refresh_is_kept(
    redis: Redis, store: AccountStore, rotating_sandbox_server: Any, control: Any, recorder: RequestRecorder
) -> None:
    """The merchant reconnects the Klaviyo app (the OAuth callback stores a new grant) while this process's
    refresh of the old grant is in flight: the refreshed old tokens must not overwrite the new grant, and the
    new grant's token is used."""
    account = await put_oauth_account(store, rotating_sandbox_server.url)
    reconnected: dict[str, Any] = {}

    async def merchant_reconnects(request: httpx.Request) -> None:
        if request.url.path != "/oauth/token" or reconnected:
            return
        reconnected.update(await asyncio.to_thread(oauth_grant, rotating_sandbox_server.url))
        await _store_oauth(store, account.account_id, grant_tokens(reconnected))

    await _refresh_once(
        redis, store, rotating_sandbox_server, control, recorder, account, merchant_reconnects
    )
    assert recorder.api_requests()[-1].headers["authorization"] == f"Bearer {reconnected['access_token']}"
    stored = await store.get(account.account_id)
    assert stored.state is AccountState.connected
    assert stored.secrets.klaviyo_oauth is not None
    assert stored.secrets.klaviyo_oauth.refresh_token == SecretStr(reconnected["refresh_token"])


async def test_token_request_has_a_deadline_below_the_lock_ttl(redis: Redis, store: AccountStore) -> None:
    """A token endpoint that takes longer than the deadline (though under every per-phase timeout of the HTTP
    client) fails the refresh as transient in time, before the refresh lock could expire."""

    async def slow_token(_: Request) -> JSONResponse:
        await asyncio.sleep(5)
        return JSONResponse({"access_token": "late", "expires_in": 3600})

    server = serve(Starlette(routes=[Route("/oauth/token", slow_token, methods=["POST"])]))
    try:
        account = Account(
            account_id="slowco",
            secrets=AccountSecrets(
                klaviyo_oauth=OAuthTokens(
                    client_id=OAUTH_CLIENT_ID,
                    client_secret=SecretStr(OAUTH_CLIENT_SECRET),
                    access_token=SecretStr("expired"),
                    refresh_token=SecretStr("refresh-1"),
                    expires_at=time.time() - 1,
                )
            ),
        )
        await store.put(account)
        async with httpx.AsyncClient(timeout=30) as http:
            manager = OAuthManager(
                redis, store, http, f"{server.url}/oauth/token", lock_ttl_s=3, token_timeout_s=0.5
            )
            started = time.monotonic()
            with pytest.raises(TransientError, match=r"did not answer within 0\.5 s"):
                await manager.access_token(account)
            assert time.monotonic() - started < 2
        assert (await store.get("slowco")).state is AccountState.connected
        assert not await redis.exists(account_keys("slowco").oauth_lock)  # released, not left to expire
        with pytest.raises(ValueError, match="below the refresh lock"):
            OAuthManager(redis, store, http, "http://unused", lock_ttl_s=30, token_timeout_s=30)
        assert ClientOptions().oauth_token_timeout_s < ClientOptions().oauth_lock_ttl_s
    finally:
        server.stop()


@pytest.mark.slow
def test_two_processes_refresh_an_expiring_token_exactly_once(
    settings: Settings, store: AccountStore, rotating_sandbox_server: Any, control: Any, tmp_path: Path
) -> None:
    """Two worker processes use the same OAuth account; its token expires under them mid-run."""
    account = asyncio.run(_put_oauth(settings, rotating_sandbox_server.url))
    before = asyncio.run(_stored_tokens(settings, account))
    assert settings.secret_key is not None
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.sync.oauth_proc",
                name,
                rotating_sandbox_server.url,
                str(settings.redis_url),
                settings.secret_key.get_secret_value(),
                account,
                str(tmp_path),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PASSBRIDGE_LOG_LEVEL": "warning"},
        )
        for name in ("w1", "w2")
    ]
    try:
        deadline = time.monotonic() + 30
        while not all((tmp_path / f"started-{n}").exists() for n in ("w1", "w2")):
            assert time.monotonic() < deadline, "worker processes did not start"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.02)
        time.sleep(0.2)
        assert control.expire_access_tokens() >= 1  # mid-run, while both are sending
        time.sleep(1.0)
        (tmp_path / "stop").touch()
        outputs = [p.communicate(timeout=30) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    reports = []
    for out, err in outputs:
        assert out.strip(), err
        reports.append(orjson.loads(out.strip().splitlines()[-1]))
    assert [r["errors"] for r in reports] == [[], []]
    assert all(r["got_401"] >= 1 for r in reports), reports  # both met the expired token
    assert sum(r["refreshes"] for r in reports) == 1, reports  # and exactly one of them refreshed it
    assert all(r["ok"] > 5 for r in reports)
    after = asyncio.run(_stored_tokens(settings, account))
    assert after != before
    # With rotation on, a second refresh with the old refresh token would have been refused (invalid_grant)
    # and the account disconnected: it is still connected.
    assert asyncio.run(_state(settings, account)) is AccountState.connected


async def _put_oauth(settings: Settings, base_url: str) -> str:
    redis, store = _store(settings)
    try:
        return (await put_oauth_account(store, base_url, "twoprocs")).account_id
    finally:
        await redis.aclose()


async def _stored_tokens(settings: Settings, account_id: str) -> tuple[str, str]:
    redis, store = _store(settings)
    try:
        oauth = (await store.get(account_id)).secrets.klaviyo_oauth
        assert oauth is not None
        assert oauth.access_token is not None
        assert oauth.refresh_token is not None
        return oauth.access_token.get_secret_value(), oauth.refresh_token.get_secret_value()
    finally:
        await redis.aclose()


async def _state(settings: Settings, account_id: str) -> AccountState:
    redis, store = _store(settings)
    try:
        return (await store.get(account_id)).state
    finally:
        await redis.aclose()


def _store(settings: Settings) -> tuple[Redis, AccountStore]:
    from passbridge.crypto import load_cipher

    assert settings.secret_key is not None
    redis = Redis.from_url(str(settings.redis_url))
    return redis, AccountStore(redis, load_cipher(settings.secret_key.get_secret_value(), settings.state_dir))
