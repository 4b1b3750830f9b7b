"""OAuth: authorize (approve/deny) → code → token with PKCE S256, bearer calls with scopes, expiry,
refresh, revoke; rate limits are per app and account."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Iterator
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from klaviyo_sandbox.client import SandboxClient
from klaviyo_sandbox.config import AccountConfig, ApiKeyConfig, OAuthClientConfig
from klaviyo_sandbox.testing import SandboxServer, start_sandbox
from tests.sandbox import payloads
from tests.sandbox.conftest import (
    CLIENT_ID,
    CLIENT_SECRET,
    KEY,
    REDIRECT,
    REVISION,
    assert_klaviyo_error,
    config,
    klaviyo_headers,
)


def _pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    return verifier, challenge


def _authorize(
    base: str, challenge: str, scope: str = "profiles:read profiles:write", client_id: str = CLIENT_ID
) -> dict[str, list[str]]:
    response = httpx.get(
        f"{base}/oauth/authorize",
        params={
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": REDIRECT,
            "scope": scope,
            "state": "st-1",
            "code_challenge_method": "S256",
            "code_challenge": challenge,
        },
    )
    assert response.status_code == 302
    location = response.headers["location"]
    assert location.startswith(REDIRECT + "?")
    return parse_qs(urlparse(location).query)


def _token(
    base: str, form: dict[str, str], client_id: str = CLIENT_ID, secret: str = CLIENT_SECRET
) -> httpx.Response:
    basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return httpx.post(f"{base}/oauth/token", data=form, headers={"Authorization": f"Basic {basic}"})


def _bearer(token: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token}",
        "revision": REVISION,
        "content-type": "application/vnd.api+json",
    }


def _login(base: str, scope: str = "profiles:read profiles:write") -> dict[str, object]:
    verifier, challenge = _pkce()
    query = _authorize(base, challenge, scope)
    assert query["state"] == ["st-1"]
    response = _token(
        base,
        {
            "grant_type": "authorization_code",
            "code": query["code"][0],
            "redirect_uri": REDIRECT,
            "code_verifier": verifier,
        },
    )
    assert response.status_code == 200, response.text
    doc: dict[str, object] = response.json()
    return doc


def test_code_exchange_then_bearer_calls_with_scopes(sandbox: SandboxClient) -> None:
    base = sandbox.base_url
    tokens = _login(base)
    assert tokens["token_type"] == "Bearer"
    assert tokens["expires_in"] == 3600
    assert tokens["scope"] == "profiles:read profiles:write"
    headers = _bearer(str(tokens["access_token"]))
    created = httpx.post(
        f"{base}/api/profile-import", json=payloads.profile_import(external_id="o1"), headers=headers
    )
    assert created.status_code == 201
    assert_klaviyo_error(httpx.get(f"{base}/api/events", headers=headers), 403, "permission_denied")


def test_code_is_single_use_and_pkce_is_checked(sandbox: SandboxClient) -> None:
    base = sandbox.base_url
    verifier, challenge = _pkce()
    code = _authorize(base, challenge)["code"][0]
    wrong = _token(
        base,
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "code_verifier": "x" * 50,
        },
    )
    assert wrong.status_code == 400
    assert wrong.json()["error"] == "invalid_grant"
    # A failed exchange burns the code, as a one-time code should.
    again = _token(
        base,
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "code_verifier": verifier,
        },
    )
    assert again.json()["error"] == "invalid_grant"
    bad_client = _token(base, {"grant_type": "refresh_token", "refresh_token": "x"}, secret="wrong")
    assert (bad_client.status_code, bad_client.json()["error"]) == (401, "invalid_client")
    unsupported = _token(base, {"grant_type": "password"})
    assert unsupported.json()["error"] == "unsupported_grant_type"


def test_authorize_requires_pkce_and_a_known_client(sandbox: SandboxClient) -> None:
    base = sandbox.base_url
    no_pkce = httpx.get(
        f"{base}/oauth/authorize",
        params={"response_type": "code", "client_id": CLIENT_ID, "redirect_uri": REDIRECT, "state": "s"},
    )
    assert parse_qs(urlparse(no_pkce.headers["location"]).query)["error"] == ["invalid_request"]
    unknown = httpx.get(
        f"{base}/oauth/authorize",
        params={"response_type": "code", "client_id": "nope", "redirect_uri": REDIRECT},
    )
    assert unknown.status_code == 400
    _, challenge = _pkce()
    other_redirect = httpx.get(
        f"{base}/oauth/authorize",
        params={
            "response_type": "code",
            "client_id": CLIENT_ID,
            "redirect_uri": "http://evil.test/",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        },
    )
    assert other_redirect.status_code == 400  # never redirect to an unregistered URI
    too_broad = _authorize(base, challenge, scope="profiles:read secret:all")
    assert too_broad["error"] == ["invalid_scope"]


def test_expired_token_is_401_and_refresh_recovers(sandbox: SandboxClient) -> None:
    base = sandbox.base_url
    tokens = _login(base)
    headers = _bearer(str(tokens["access_token"]))
    assert httpx.get(f"{base}/api/profiles", headers=headers).status_code == 200
    assert sandbox.expire_access_tokens() >= 1
    expired = httpx.get(f"{base}/api/profiles", headers=headers)
    assert_klaviyo_error(expired, 401, "authentication_failed")
    refreshed = _token(base, {"grant_type": "refresh_token", "refresh_token": str(tokens["refresh_token"])})
    assert refreshed.status_code == 200
    new = refreshed.json()
    assert new["refresh_token"] == tokens["refresh_token"]  # not rotated by default
    assert httpx.get(f"{base}/api/profiles", headers=_bearer(new["access_token"])).status_code == 200


def test_revoke_refresh_token_kills_its_access_tokens(sandbox: SandboxClient) -> None:
    base = sandbox.base_url
    tokens = _login(base)
    basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    revoked = httpx.post(
        f"{base}/oauth/revoke",
        data={"token": str(tokens["refresh_token"])},
        headers={"Authorization": f"Basic {basic}"},
    )
    assert revoked.status_code == 200
    assert httpx.get(f"{base}/api/profiles", headers=_bearer(str(tokens["access_token"]))).status_code == 401
    refresh = _token(base, {"grant_type": "refresh_token", "refresh_token": str(tokens["refresh_token"])})
    assert refresh.json()["error"] == "invalid_grant"


@pytest.fixture
def short_lived() -> Iterator[SandboxServer]:
    accounts = (
        AccountConfig(
            "main",
            api_keys=(ApiKeyConfig(KEY),),
            oauth_clients=(
                OAuthClientConfig(CLIENT_ID, CLIENT_SECRET, redirect_uris=(REDIRECT,)),
                OAuthClientConfig("denied", "s", approve=False),
            ),
        ),
    )
    server = start_sandbox(
        config(accounts=accounts, access_token_ttl_s=1.0, unlimited=False, rotate_refresh_tokens=True)
    )
    yield server
    server.stop()


def test_lifetime_rotation_denial_and_per_app_limits(short_lived: SandboxServer) -> None:
    import time

    base = short_lived.url
    tokens = _login(base, scope="accounts:read")
    issued = time.monotonic()  # the token was issued before this
    # A lifetime of 1 s: long enough for the three calls below on a loaded machine (0.3 s was flaky).
    assert tokens["expires_in"] == pytest.approx(1.0)
    headers = _bearer(str(tokens["access_token"]))
    # The app's accounts budget (1/s) is its own: the private key still has one.
    assert httpx.get(f"{base}/api/accounts", headers=headers).status_code == 200
    assert httpx.get(f"{base}/api/accounts", headers=headers).status_code == 429
    assert httpx.get(f"{base}/api/accounts", headers=klaviyo_headers()).status_code == 200
    time.sleep(max(0.0, 1.05 - (time.monotonic() - issued)))
    assert httpx.get(f"{base}/api/profiles", headers=headers).status_code == 401
    rotated = _token(
        base, {"grant_type": "refresh_token", "refresh_token": str(tokens["refresh_token"])}
    ).json()
    assert rotated["refresh_token"] != tokens["refresh_token"]
    stale = _token(base, {"grant_type": "refresh_token", "refresh_token": str(tokens["refresh_token"])})
    assert stale.json()["error"] == "invalid_grant"
    _, challenge = _pkce()
    denied = httpx.get(
        f"{base}/oauth/authorize",
        params={
            "response_type": "code",
            "client_id": "denied",
            "redirect_uri": REDIRECT,
            "state": "z",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        },
    )
    query = parse_qs(urlparse(denied.headers["location"]).query)
    assert query["error"] == ["access_denied"]
    assert query["state"] == ["z"]
    assert "code" not in query
