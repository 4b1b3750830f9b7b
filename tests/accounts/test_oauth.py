"""OAuth connect: PKCE, the authorize URL, the pending state in Redis and the callback's refusals.

The end-to-end flow against the Klaviyo sandbox lives in ``test_sandbox.py``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from urllib.parse import parse_qs, urlsplit

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from passbridge.crypto import load_cipher
from passbridge.keys import account_keys
from passbridge.oauth import DEFAULT_SCOPES, PENDING_TTL_S, OAuthError, parse_state, pkce_pair, take_pending
from passbridge.settings import Settings
from tests.accounts.conftest import Cli
from tests.conftest import LiveServer


def test_pkce_pair_is_s256() -> None:
    verifier, challenge = pkce_pair()
    assert 43 <= len(verifier) <= 128
    assert set(verifier) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
    expected = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    assert challenge == expected
    assert pkce_pair()[0] != verifier


def test_state_names_its_account() -> None:
    assert parse_state("acme.co.x-Y_z") == ("acme.co", "x-Y_z")
    # Only what start_connect issues: nothing that could make the state name another Redis key.
    for forged in ("no-dot", "acme.", ".nonce", "acme:apple-gen.x", "acme.x:y", "acme.x y", "a" * 65 + ".x"):
        with pytest.raises(OAuthError, match="not issued by passbridge"):
            parse_state(forged)


class TestConnectCommand:
    def test_prints_authorize_url_and_keeps_the_verifier_in_redis(self, cli: Cli) -> None:
        cli.ok("accounts", "add", "acme")
        env = {
            "PASSBRIDGE_KLAVIYO_BASE_URL": "http://127.0.0.1:9",
            "PASSBRIDGE_PUBLIC_URL": "https://pb.example.com",
        }
        doc = cli.json(
            "accounts", "connect", "acme", "--client-id", "cid", "--client-secret", "csecret", env=env
        )
        url = urlsplit(doc["authorize_url"])
        assert f"{url.scheme}://{url.netloc}{url.path}" == "http://127.0.0.1:9/oauth/authorize"
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        assert q["response_type"] == "code"
        assert q["client_id"] == "cid"
        assert q["redirect_uri"] == "https://pb.example.com/oauth/klaviyo/callback" == doc["redirect_uri"]
        assert q["scope"].split() == list(DEFAULT_SCOPES)
        assert q["code_challenge_method"] == "S256"
        assert parse_state(q["state"])[0] == "acme"

        [key] = list(cli.redis.scan_iter(match=account_keys("acme").oauth_pending_pattern))
        assert 0 < cli.redis.ttl(key) <= PENDING_TTL_S
        raw = cli.redis.get(key)
        assert b"csecret" not in raw
        # The challenge sent is the S256 of the verifier kept (encrypted) in Redis.
        cipher = load_cipher(cli.env["PASSBRIDGE_SECRET_KEY"], cli.account_state_dir())
        kept = orjson.loads(cipher.decrypt(raw))
        digest = hashlib.sha256(kept["verifier"].encode()).digest()
        assert base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == q["code_challenge"]
        # Connecting changes nothing in the account until the merchant approves.
        assert cli.account("acme").secrets.klaviyo_oauth is None

    def test_real_klaviyo_authorizes_on_www(self, cli: Cli) -> None:
        cli.ok("accounts", "add", "acme")
        out = cli.ok("accounts", "connect", "acme", "--client-id", "c", "--client-secret", "s").stdout
        assert "https://www.klaviyo.com/oauth/authorize?" in "".join(out.split())

    def test_reuses_the_stored_client_and_asks_for_chosen_scopes(self, cli: Cli) -> None:
        cli.ok(
            "accounts",
            "add",
            "acme",
            "--klaviyo-oauth-client-id",
            "cid",
            "--klaviyo-oauth-client-secret",
            "cs",
        )
        doc = cli.json("accounts", "connect", "acme", "--scope", "accounts:read", "--scope", "events:write")
        q = parse_qs(urlsplit(doc["authorize_url"]).query)
        assert q["client_id"] == ["cid"]
        assert q["scope"] == ["accounts:read events:write"]

    def test_client_secret_from_the_environment(self, cli: Cli) -> None:
        env = {"PASSBRIDGE_KLAVIYO_CLIENT_SECRET": "env-secret"}
        cli.ok("accounts", "add", "acme", env=env)  # only `connect` reads it: other commands ignore it
        cli.ok("accounts", "update", "acme", "--name", "Acme", env=env)
        cli.ok("accounts", "connect", "acme", "--client-id", "cid", env=env)
        [key] = list(cli.redis.scan_iter(match=account_keys("acme").oauth_pending_pattern))
        cipher = load_cipher(cli.env["PASSBRIDGE_SECRET_KEY"], cli.account_state_dir())
        assert orjson.loads(cipher.decrypt(cli.redis.get(key)))["client_secret"] == "env-secret"

    def test_refusals(self, cli: Cli) -> None:
        assert "no account 'acme'" in cli.fails(
            "accounts", "connect", "acme", "--client-id", "c", "--client-secret", "s"
        )
        cli.ok("accounts", "add", "acme")
        assert "--client-id and --client-secret" in cli.fails("accounts", "connect", "acme")
        assert "--client-id and --client-secret" in cli.fails(
            "accounts", "connect", "acme", "--client-id", "c"
        )


class TestCallbackRefusals:
    """What the producer's callback answers when it cannot complete a connect (no Klaviyo involved)."""

    def test_missing_parameters_name_the_field(self, producer: LiveServer) -> None:
        with httpx.Client(base_url=producer.url) as http:
            r = http.get("/oauth/klaviyo/callback", params={"state": "acme.x"})
        assert r.status_code == 400
        assert r.headers["content-type"] == "application/problem+json"
        assert [e["field"] for e in r.json()["errors"]] == ["code"]

    def test_unknown_or_forged_state(self, producer: LiveServer) -> None:
        with httpx.Client(base_url=producer.url) as http:
            r = http.get("/oauth/klaviyo/callback", params={"state": "acme.forged", "code": "c"})
            assert r.status_code == 400
            assert "unknown or expired" in r.json()["detail"]
            r = http.get("/oauth/klaviyo/callback", params={"state": "nodot", "code": "c"})
            assert r.status_code == 400
            assert "not issued by passbridge" in r.json()["detail"]

    def test_a_pending_connect_that_does_not_decrypt_is_a_400(self, cli: Cli, producer: LiveServer) -> None:
        # Sealed with another key (a CLI and a producer that disagree on PASSBRIDGE_SECRET_KEY), or damaged.
        cli.redis.set(account_keys("acme").oauth_pending("sealedelsewhere"), b"gAAAAA-not-a-token")
        with httpx.Client(base_url=producer.url) as http:
            r = http.get("/oauth/klaviyo/callback", params={"state": "acme.sealedelsewhere", "code": "c"})
        assert r.status_code == 400
        assert r.headers["content-type"] == "application/problem+json"
        assert "PASSBRIDGE_SECRET_KEY" in r.json()["detail"]

    def test_denied_access_spends_the_pending_connect(self, cli: Cli, producer: LiveServer) -> None:
        cli.ok("accounts", "add", "acme")
        doc = cli.json("accounts", "connect", "acme", "--client-id", "c", "--client-secret", "s")
        state = parse_qs(urlsplit(doc["authorize_url"]).query)["state"][0]
        with httpx.Client(base_url=producer.url) as http:
            r = http.get(
                "/oauth/klaviyo/callback",
                params={"state": state, "error": "access_denied", "error_description": "The user declined"},
            )
        assert r.status_code == 400
        assert r.json()["detail"] == "access_denied: The user declined"
        assert list(cli.redis.scan_iter(match=account_keys("acme").oauth_pending_pattern)) == []
        assert cli.account("acme").secrets.klaviyo_oauth is None

    def test_unreachable_token_endpoint_is_502(
        self, cli: Cli, producer: LiveServer, settings: Settings
    ) -> None:
        # The producer's settings point at a port where nothing listens.
        settings.klaviyo_base_url = "http://127.0.0.1:9"
        cli.ok("accounts", "add", "acme")
        doc = cli.json("accounts", "connect", "acme", "--client-id", "c", "--client-secret", "s")
        state = parse_qs(urlsplit(doc["authorize_url"]).query)["state"][0]
        with httpx.Client(base_url=producer.url) as http:
            r = http.get("/oauth/klaviyo/callback", params={"state": state, "code": "c"})
        assert r.status_code == 502
        assert "cannot reach Klaviyo's token endpoint" in r.json()["detail"]
        assert cli.account("acme").secrets.klaviyo_oauth is None


def test_a_state_works_once_and_only_for_its_account(cli: Cli) -> None:
    cli.ok("accounts", "add", "acme")
    first = cli.json("accounts", "connect", "acme", "--client-id", "c", "--client-secret", "s")
    second = cli.json("accounts", "connect", "acme", "--client-id", "c", "--client-secret", "s")
    state, other = (parse_qs(urlsplit(d["authorize_url"]).query)["state"][0] for d in (first, second))
    cipher = load_cipher(cli.env["PASSBRIDGE_SECRET_KEY"], cli.account_state_dir())

    async def go() -> None:
        redis = Redis.from_url(cli.env["REDIS_URL"])
        try:
            pending = await take_pending(redis, cipher, state)
            assert (pending.account_id, pending.client_id) == ("acme", "c")
            assert pending.client_secret.get_secret_value() == "s"
            with pytest.raises(OAuthError, match="unknown or expired"):
                await take_pending(redis, cipher, state)
            # A nonce is good only under the account it was issued for.
            with pytest.raises(OAuthError, match="unknown or expired"):
                await take_pending(redis, cipher, "beta." + parse_state(other)[1])
            assert (await take_pending(redis, cipher, other)).account_id == "acme"
        finally:
            await redis.aclose()

    asyncio.run(go())


def test_default_scopes_are_exactly_what_the_endpoints_we_call_require() -> None:
    """The scopes `connect` asks for = the union of `x-klaviyo-scopes` of every operation passbridge calls."""
    from tests.conftest import SHARED

    spec_file = SHARED / "klaviyo" / "stable.json"
    if not spec_file.exists():
        pytest.skip(f"the Klaviyo spec is not at {spec_file}")
    paths = orjson.loads(spec_file.read_bytes())["paths"]
    used = [
        ("get", "/api/accounts"),  # accounts check
        ("post", "/api/profile-import"),
        ("post", "/api/profile-bulk-import-jobs"),
        ("get", "/api/profile-bulk-import-jobs/{job_id}"),
        ("get", "/api/profile-bulk-import-jobs/{id}/import-errors"),
        ("post", "/api/events"),
        ("post", "/api/event-bulk-create-jobs"),
        ("post", "/api/data-source-record-create-jobs"),
        ("post", "/api/data-source-record-bulk-create-jobs"),
        ("get", "/api/data-sources"),  # provisioning
        ("post", "/api/data-sources"),
        ("get", "/api/object-types"),
        ("post", "/api/object-types"),
    ]
    needed = {scope for method, path in used for scope in paths[path][method]["x-klaviyo-scopes"]}
    assert needed == set(DEFAULT_SCOPES)
