"""End to end against the Klaviyo sandbox: OAuth connect through the producer's callback, and ``accounts check``.

The sandbox (``klaviyo_sandbox``) is the outer edge: a local Klaviyo with real OAuth endpoints (authorize
redirects, PKCE S256 checked at the token endpoint), scopes enforced per endpoint and the revision rules.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import orjson
import pytest
import redis as redis_sync
from pydantic import SecretStr
from redis.asyncio import Redis

from klaviyo_sandbox.client import SandboxClient
from klaviyo_sandbox.config import ALL_SCOPES, AccountConfig, ApiKeyConfig, OAuthClientConfig, SandboxConfig
from klaviyo_sandbox.testing import SandboxServer, start_sandbox
from passbridge.accounts import Account, AccountSecrets, AccountState, AccountStore
from passbridge.crypto import load_cipher
from passbridge.keys import account_keys
from passbridge.oauth import DEFAULT_SCOPES
from passbridge.settings import Settings
from producer.app import create_app
from tests.accounts.conftest import Cli
from tests.conftest import LiveServer, serve

FULL_KEY = "pk_sandbox_full_0123456789"
LIMITED_KEY = "pk_sandbox_limited_0123456789"
REVISION = "2026-10-15"


@pytest.fixture(scope="module")
def sandbox() -> Iterator[SandboxServer]:
    config = SandboxConfig(
        accounts=(
            AccountConfig(
                account_id="KFULL1",
                name="Acme on Klaviyo",
                api_keys=(ApiKeyConfig(FULL_KEY),),
                oauth_clients=(
                    OAuthClientConfig("cid-ok", "cs-ok"),
                    OAuthClientConfig("cid-deny", "cs-deny", approve=False),
                    OAuthClientConfig(
                        "cid-narrow", "cs-narrow", scopes=frozenset({"accounts:read", "events:write"})
                    ),
                ),
            ),
            AccountConfig(
                account_id="KLIM01",
                api_keys=(ApiKeyConfig(LIMITED_KEY, ALL_SCOPES - {"events:write", "lists:write"}),),
            ),
        ),
        unlimited=True,
    )
    server = start_sandbox(config)
    yield server
    server.stop()


@dataclass
class World:
    cli: Cli
    sandbox: str
    producer: str

    def run(self, *args: str, env: dict[str, str] | None = None) -> Any:
        return self.cli(*args, env={**self.env, **(env or {})})

    @property
    def env(self) -> dict[str, str]:
        return {"PASSBRIDGE_KLAVIYO_BASE_URL": self.sandbox, "PASSBRIDGE_KLAVIYO_REVISION": REVISION}

    def check(
        self, account_id: str, *extra: str, env: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        result = self.run("accounts", "check", account_id, "--json", *extra, env=env)
        assert "Traceback" not in result.stderr, result.stderr
        doc = orjson.loads(result.stdout)
        return result.exit_code, {f["topic"]: f for f in doc["findings"]}

    def connect(
        self, account_id: str, client_id: str, secret: str, *extra: str, accept: str = "application/json"
    ) -> httpx.Response:
        """``accounts connect``, then the merchant's browser: authorize → redirect → our callback."""
        doc = self.cli.json(
            "accounts", "connect", account_id, "--client-id", client_id, "--client-secret", secret,
            "--redirect-uri", f"{self.producer}/oauth/klaviyo/callback", *extra, env=self.env,
        )  # fmt: skip
        return httpx.get(doc["authorize_url"], follow_redirects=True, timeout=10, headers={"accept": accept})


def delete_object_type(redis: redis_sync.Redis, account_id: str, sandbox_url: str) -> None:
    """Delete the WalletPass object type ``klaviyo setup`` provisioned for ``account_id`` from the module's
    sandbox, so the next test provisions its own."""
    provisioned = redis.hget(account_keys(account_id).klaviyo, "object_type_id")
    assert provisioned is not None
    httpx.delete(
        f"{sandbox_url}/api/object-types/{provisioned.decode()}",
        headers={"Authorization": f"Klaviyo-API-Key {FULL_KEY}", "revision": REVISION},
    )


def _store_key(cli: Cli, account_id: str, key: str) -> None:
    """An account holding exactly ``key`` as its Klaviyo private key."""

    async def put() -> None:
        client = Redis.from_url(cli.env["REDIS_URL"])
        try:
            cipher = load_cipher(cli.env["PASSBRIDGE_SECRET_KEY"], cli.account_state_dir())
            secrets = AccountSecrets(klaviyo_api_key=SecretStr(key))
            await AccountStore(client, cipher).put(Account(account_id=account_id, secrets=secrets))
        finally:
            await client.aclose()

    asyncio.run(put())


@pytest.fixture
def world(cli: Cli, sandbox: SandboxServer, settings: Settings, redis_url: str) -> Iterator[World]:
    settings.klaviyo_base_url = sandbox.url
    settings.klaviyo_revision = REVISION
    server: LiveServer = serve(create_app(settings, redis_url))
    yield World(cli, sandbox.url, server.url)
    server.stop()


class TestOAuthConnect:
    def test_end_to_end_stores_working_tokens(self, world: World) -> None:
        world.cli.ok("accounts", "add", "acme")
        started = time.time()
        r = world.connect("acme", "cid-ok", "cs-ok")
        assert r.status_code == 200, r.text
        assert urlsplit(str(r.url)).path == "/oauth/klaviyo/callback"
        assert [h.status_code for h in r.history] == [302]  # Klaviyo's redirect back to us
        assert r.json() == {"account_id": "acme", "connected": True, "scopes": sorted(DEFAULT_SCOPES)}

        account = world.cli.account("acme")
        oauth = account.secrets.klaviyo_oauth
        assert oauth is not None
        assert oauth.access_token is not None
        assert oauth.refresh_token is not None
        assert oauth.client_id == "cid-ok"
        assert oauth.expires_at is not None
        assert started + 3500 < oauth.expires_at < time.time() + 3601
        assert account.klaviyo_auth() == "oauth"
        # Encrypted at rest: the raw registry entry holds neither token.
        raw = b"".join(world.cli.redis.hgetall(account_keys("acme").config).values())
        for token in (oauth.access_token, oauth.refresh_token):
            assert token.get_secret_value().encode() not in raw
        # The tokens are real: Klaviyo (the sandbox) accepts the access token.
        got = httpx.get(
            f"{world.sandbox}/api/accounts",
            headers={
                "Authorization": f"Bearer {oauth.access_token.get_secret_value()}",
                "revision": REVISION,
            },
        )
        assert got.status_code == 200
        assert got.json()["data"][0]["id"] == "KFULL1"
        # No connect is left pending, and the same callback URL does not work twice.
        assert list(world.cli.redis.scan_iter(match=account_keys("acme").oauth_pending_pattern)) == []
        again = httpx.get(str(r.url))
        assert again.status_code == 400
        assert "unknown or expired" in again.json()["detail"]

    def test_browser_sees_a_page(self, world: World) -> None:
        world.cli.ok("accounts", "add", "acme", "--name", "Acme <Coffee>")
        r = world.connect("acme", "cid-ok", "cs-ok", accept="text/html")
        assert r.status_code == 200
        assert "Acme &lt;Coffee&gt; is now connected to Klaviyo" in r.text

    def test_denied_by_the_merchant(self, world: World) -> None:
        world.cli.ok("accounts", "add", "acme")
        r = world.connect("acme", "cid-deny", "cs-deny")
        assert r.status_code == 400
        assert r.json()["detail"].startswith("access_denied")
        assert world.cli.account("acme").secrets.klaviyo_oauth is None

    def test_wrong_client_secret_is_refused_at_the_token_endpoint(self, world: World) -> None:
        world.cli.ok("accounts", "add", "acme")
        r = world.connect("acme", "cid-ok", "not-the-secret")
        assert r.status_code == 400
        assert "invalid_client" in r.json()["detail"]
        assert world.cli.account("acme").secrets.klaviyo_oauth is None

    def test_reconnect_replaces_the_grant(self, world: World) -> None:
        world.cli.ok("accounts", "add", "acme")
        assert world.connect("acme", "cid-ok", "cs-ok").status_code == 200
        first = world.cli.account("acme").secrets.klaviyo_oauth
        assert world.connect("acme", "cid-ok", "cs-ok").status_code == 200
        second = world.cli.account("acme").secrets.klaviyo_oauth
        assert first is not None
        assert second is not None
        assert first.refresh_token != second.refresh_token


class TestCheck:
    def test_healthy_private_key(self, world: World) -> None:
        world.cli.ok("accounts", "add", "acme", "--klaviyo-api-key", FULL_KEY)
        code, f = world.check("acme")
        assert code == 0
        assert f["credentials"]["status"] == "ok"
        assert "Acme on Klaviyo" in f["credentials"]["words"]
        assert f["scopes"]["status"] == "ok"
        assert f["revision"]["words"] == f"Klaviyo accepts revision {REVISION}"
        assert f["custom objects"]["status"] == "warn"
        assert (
            "not provisioned — run `passbridge klaviyo setup --account acme`" in f["custom objects"]["words"]
        )
        assert f["events"]["words"] == "no events waiting"
        table = " ".join(world.run("accounts", "check", "acme").stdout.split())
        assert "account acme: ready" in table

    def test_missing_scopes_are_named(self, world: World) -> None:
        world.cli.ok("accounts", "add", "acme", "--klaviyo-api-key", LIMITED_KEY)
        code, f = world.check("acme")
        assert code == 1
        assert f["scopes"]["status"] == "fail"
        assert "lacks events:write, lists:write" in f["scopes"]["words"]
        assert f["credentials"]["status"] == "ok"

    def test_wrong_key(self, world: World) -> None:
        world.cli.ok("accounts", "add", "acme", "--klaviyo-api-key", "pk_not_a_sandbox_key_000")
        code, f = world.check("acme")
        assert code == 1
        assert f["credentials"]["status"] == "fail"
        assert "Klaviyo rejects the private API key (authentication_failed)" in f["credentials"]["words"]
        assert f["scopes"]["status"] == "skip"

    @pytest.mark.parametrize(
        "key", ["pk_sandbox_full\n0123456789abcdef", "pk_sandbox_full\u00e90123456789abcdef"]
    )
    def test_a_key_http_cannot_carry_is_named_never_quoted(self, world: World, key: str) -> None:
        # Stored as it was given (the registry does not vet keys): httpx refuses the header and quotes it,
        # credential included, or cannot encode it at all.
        _store_key(world.cli, "acme", key)
        result = world.run("accounts", "check", "acme", "--json")
        assert result.exit_code == 1
        assert "Traceback" not in result.stderr
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        f = {x["topic"]: x for x in orjson.loads(result.stdout)["findings"]}
        assert f["credentials"]["status"] == "fail"
        assert "cannot be sent in an HTTP header" in f["credentials"]["words"]
        table = world.run("accounts", "check", "acme")
        for shown in (result.stdout, result.stderr, table.stdout, table.stderr):
            assert "0123456789abcdef" not in shown

    def test_unserved_revision(self, world: World) -> None:
        world.cli.ok("accounts", "add", "acme", "--klaviyo-api-key", FULL_KEY)
        code, f = world.check("acme", env={"PASSBRIDGE_KLAVIYO_REVISION": "2026-08-01"})
        assert code == 1
        assert f["revision"]["status"] == "fail"
        assert "Klaviyo refuses revision 2026-08-01" in f["revision"]["words"]

    def test_retired_revision(self, world: World, sandbox: SandboxServer) -> None:
        world.cli.ok("accounts", "add", "acme", "--klaviyo-api-key", FULL_KEY)
        with SandboxClient(sandbox.url) as control:
            control.set_faults(retired_revisions={REVISION: 410})
            try:
                code, f = world.check("acme")
            finally:
                control.clear_faults()
        assert code == 1
        assert f["revision"]["status"] == "fail"
        assert f"Klaviyo refuses revision {REVISION}" in f["revision"]["words"]

    def test_walletpass_object_type_shows_entitlement(self, world: World) -> None:
        world.cli.ok("accounts", "add", "acme", "--klaviyo-api-key", FULL_KEY)
        created = httpx.post(
            f"{world.sandbox}/api/object-types",
            headers={"Authorization": f"Klaviyo-API-Key {FULL_KEY}", "revision": REVISION},
            json={
                "data": {
                    "type": "object-type",
                    "attributes": {"title": "WalletPass", "description": "passes"},
                }
            },
        )
        assert created.status_code == 201, created.text
        try:
            _, f = world.check("acme")
            assert (
                "entitled (a WalletPass object type exists) but not provisioned"
                in f["custom objects"]["words"]
            )
        finally:
            httpx.delete(
                f"{world.sandbox}/api/object-types/{created.json()['data']['id']}",
                headers={"Authorization": f"Klaviyo-API-Key {FULL_KEY}", "revision": REVISION},
            )

    def test_provisioned_by_klaviyo_setup(self, world: World) -> None:
        world.cli.ok("accounts", "add", "acme", "--klaviyo-api-key", FULL_KEY)
        setup = world.run("accounts", "check", "acme")  # before: points at setup
        assert "passbridge klaviyo setup --account acme" in " ".join(setup.stdout.split())
        done = world.run("klaviyo", "setup", "--account", "acme", "--json")
        assert done.exit_code == 0, done.stderr
        try:
            code, f = world.check("acme")
            assert code == 0
            assert f["custom objects"] == {
                "topic": "custom objects",
                "status": "ok",
                "words": "entitled and provisioned (WalletPass schema active)",
            }
        finally:
            delete_object_type(world.cli.redis, "acme", world.sandbox)
        # The object type is gone from Klaviyo (deleted above): the check notices and says how to repair.
        code, f = world.check("acme")
        assert code == 1
        assert "klaviyo setup --account acme` to repair it" in f["custom objects"]["words"]

    @pytest.mark.parametrize("how", ["stored expiry passed", "Klaviyo answers 401"])
    def test_oauth_grant_expired_token_is_refreshed(self, world: World, how: str) -> None:
        world.cli.ok("accounts", "add", "acme")
        assert world.connect("acme", "cid-ok", "cs-ok").status_code == 200
        before = world.cli.account("acme").secrets.klaviyo_oauth
        assert before is not None
        if how == "stored expiry passed":
            _expire_stored_token(world)
        else:
            # Klaviyo expired it early (our stored expiry still lies ahead): refresh on 401, then retry.
            assert httpx.post(f"{world.sandbox}/_sandbox/oauth/expire-access-tokens").status_code == 200
        code, f = world.check("acme")
        assert code == 0, f
        assert f["credentials"]["status"] == "ok"
        assert f["scopes"]["words"] == "the OAuth grant holds every scope passbridge needs"
        after = world.cli.account("acme").secrets.klaviyo_oauth
        assert after is not None
        assert after.access_token != before.access_token
        assert after.refresh_token == before.refresh_token  # this sandbox does not rotate refresh tokens
        assert after.expires_at is not None
        assert after.expires_at > time.time() + 3000

    def test_revoked_grant_says_connect_again(self, world: World) -> None:
        world.cli.ok("accounts", "add", "acme")
        assert world.connect("acme", "cid-ok", "cs-ok").status_code == 200
        oauth = world.cli.account("acme").secrets.klaviyo_oauth
        assert oauth is not None
        assert oauth.refresh_token is not None
        revoked = httpx.post(
            f"{world.sandbox}/oauth/revoke",
            data={"token": oauth.refresh_token.get_secret_value()},
            auth=("cid-ok", "cs-ok"),
        )
        assert revoked.status_code == 200
        code, f = world.check("acme")
        assert code == 1
        assert f["credentials"]["status"] == "fail"
        assert "invalid_grant" in f["credentials"]["words"]
        assert "passbridge accounts connect acme" in f["credentials"]["words"]
        # As a worker would: the refused grant disconnects the account until it is connected again …
        account = world.cli.account("acme")
        assert account.state == AccountState.disconnected
        assert "invalid_grant" in account.state_reason
        # … and connecting again makes it connected.
        assert world.connect("acme", "cid-ok", "cs-ok").status_code == 200
        assert world.cli.account("acme").state == AccountState.connected
        assert world.check("acme")[0] == 0

    def test_narrow_oauth_grant_names_missing_scopes(self, world: World) -> None:
        world.cli.ok("accounts", "add", "acme")
        r = world.connect(
            "acme", "cid-narrow", "cs-narrow", "--scope", "accounts:read", "--scope", "events:write"
        )
        assert r.status_code == 200
        code, f = world.check("acme")
        assert code == 1
        assert "the OAuth grant lacks custom-objects:read" in f["scopes"]["words"]


def _expire_stored_token(world: World) -> None:
    """Set the stored access-token expiry into the past (what an hour of waiting would do)."""

    async def go() -> None:
        redis = Redis.from_url(world.cli.env["REDIS_URL"])
        store = AccountStore(
            redis, load_cipher(world.cli.env["PASSBRIDGE_SECRET_KEY"], world.cli.account_state_dir())
        )

        def expire(a: Account | None) -> Account:
            assert a is not None
            assert a.secrets.klaviyo_oauth is not None
            oauth = a.secrets.klaviyo_oauth.model_copy(update={"expires_at": time.time() - 1})
            return a.model_copy(update={"secrets": a.secrets.model_copy(update={"klaviyo_oauth": oauth})})

        await store.update("acme", expire)
        await redis.aclose()

    asyncio.run(go())


def test_sandbox_is_where_the_authorize_url_points(world: World) -> None:
    world.cli.ok("accounts", "add", "acme")
    doc = world.cli.json(
        "accounts", "connect", "acme", "--client-id", "cid-ok", "--client-secret", "cs-ok", env=world.env
    )
    url = urlsplit(doc["authorize_url"])
    assert f"{url.scheme}://{url.netloc}" == world.sandbox
    assert parse_qs(url.query)["code_challenge_method"] == ["S256"]


@pytest.fixture
def elsewhere(cli: Cli, sandbox: SandboxServer, settings: Settings, redis_url: str) -> Iterator[World]:
    """The global Klaviyo (``PASSBRIDGE_KLAVIYO_BASE_URL``, for the CLI and the producer) is a port where nothing
    listens: only an account whose own ``klaviyo_base_url`` is the sandbox can reach Klaviyo."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connection refused, and no one else gets it
        nowhere = f"http://127.0.0.1:{closed.getsockname()[1]}"
        settings.klaviyo_base_url = nowhere
        settings.klaviyo_revision = REVISION
        server: LiveServer = serve(create_app(settings, redis_url))
        yield World(cli, nowhere, server.url)
        server.stop()


class TestAccountOwnKlaviyo:
    def test_connect_and_check_use_the_accounts_klaviyo(
        self, elsewhere: World, sandbox: SandboxServer
    ) -> None:
        elsewhere.cli.ok("accounts", "add", "trial", "--klaviyo-base-url", sandbox.url)
        doc = elsewhere.cli.json(
            "accounts", "connect", "trial", "--client-id", "cid-ok", "--client-secret", "cs-ok",
            "--redirect-uri", f"{elsewhere.producer}/oauth/klaviyo/callback", env=elsewhere.env,
        )  # fmt: skip
        url = urlsplit(doc["authorize_url"])
        assert f"{url.scheme}://{url.netloc}{url.path}" == f"{sandbox.url}/oauth/authorize"
        # The merchant approves; the producer's callback exchanges the code at the account's token endpoint.
        r = httpx.get(
            doc["authorize_url"], follow_redirects=True, timeout=10, headers={"accept": "application/json"}
        )
        assert r.status_code == 200, r.text
        assert r.json()["connected"] is True
        before = elsewhere.cli.account("trial").secrets.klaviyo_oauth
        assert before is not None
        assert before.refresh_token is not None

        code, f = elsewhere.check("trial")
        assert code == 0, f
        assert f["credentials"]["status"] == "ok"
        assert "Acme on Klaviyo" in f["credentials"]["words"]
        # Klaviyo expires the token early: the check refreshes it at the account's own token endpoint.
        assert httpx.post(f"{sandbox.url}/_sandbox/oauth/expire-access-tokens").status_code == 200
        code, f = elsewhere.check("trial")
        assert code == 0, f
        after = elsewhere.cli.account("trial")
        assert after.state == AccountState.connected
        assert after.secrets.klaviyo_oauth is not None
        assert after.secrets.klaviyo_oauth.access_token != before.access_token

    def test_check_and_setup_of_a_private_key_account(self, elsewhere: World, sandbox: SandboxServer) -> None:
        elsewhere.cli.ok(
            "accounts", "add", "trial", "--klaviyo-api-key", FULL_KEY, "--klaviyo-base-url", sandbox.url
        )
        elsewhere.cli.ok("accounts", "add", "prod", "--klaviyo-api-key", FULL_KEY)
        code, f = elsewhere.check("prod")  # on the global Klaviyo, which does not answer
        assert code == 1
        assert f["credentials"]["words"].startswith("cannot reach Klaviyo")
        done = elsewhere.run("klaviyo", "setup", "--account", "trial", "--json")
        assert done.exit_code == 0, done.stderr
        try:
            code, f = elsewhere.check("trial")
            assert code == 0, f
            assert f["credentials"]["status"] == "ok"
            assert f["custom objects"]["words"] == "entitled and provisioned (WalletPass schema active)"
        finally:
            delete_object_type(elsewhere.cli.redis, "trial", sandbox.url)
