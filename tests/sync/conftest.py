"""Fixtures for the sync tests: the Klaviyo sandbox over real HTTP, registry accounts holding its credentials,
and a KlaviyoClient whose every request is checked against Klaviyo's official spec when the test ends."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from cryptography.fernet import MultiFernet
from redis.asyncio import Redis

from passbridge.accounts import Account, AccountSecrets, AccountStore, OAuthTokens
from passbridge.crypto import load_cipher
from passbridge.oauth import authorize_url, pkce_pair
from passbridge.settings import Settings
from tests.sync.spec import load_spec, shared_dir
from worker.klaviyo.client import ClientOptions, KlaviyoClient
from worker.klaviyo.endpoints import OAUTH_SCOPES

if TYPE_CHECKING:
    from klaviyo_sandbox.client import SandboxClient
    from klaviyo_sandbox.testing import SandboxServer

#: The sandbox and our limiter run Klaviyo's rate-limit clock this much faster (same budgets per window).
RATE_SCALE = 60.0
REVISION = "2026-10-15"

API_KEY = "pk_sync_" + "a1b2c3d4e5f6a7b8c9d0"
NOCO_KEY = "pk_sync_" + "noco00000000000000000"
READONLY_KEY = "pk_sync_" + "readonly000000000000"
OAUTH_CLIENT_ID = "passbridge-test-app"
OAUTH_CLIENT_SECRET = "cs_" + "0123456789abcdef0123"
KLAVIYO_ACCOUNT = "KSYNC1"
NOCO_ACCOUNT = "KNOCO1"


def sandbox_accounts() -> tuple[Any, ...]:
    """The sandbox's Klaviyo accounts: one with everything, one without the Custom Objects entitlement."""
    c = pytest.importorskip("klaviyo_sandbox.config", reason="the Klaviyo sandbox package is not present")
    return (
        c.AccountConfig(
            account_id=KLAVIYO_ACCOUNT,
            api_keys=(
                c.ApiKeyConfig(API_KEY),
                c.ApiKeyConfig(READONLY_KEY, scopes=frozenset({"profiles:read", "events:read"})),
            ),
            oauth_clients=(c.OAuthClientConfig(OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET),),
        ),
        c.AccountConfig(account_id=NOCO_ACCOUNT, api_keys=(c.ApiKeyConfig(NOCO_KEY),), custom_objects=False),
    )


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[SandboxServer]:
    """One sandbox for the session (reset before each test that uses it)."""
    config = pytest.importorskip(
        "klaviyo_sandbox.config", reason="the Klaviyo sandbox package is not present"
    )
    from klaviyo_sandbox.testing import start_sandbox

    server = start_sandbox(config.SandboxConfig(accounts=sandbox_accounts(), rate_scale=RATE_SCALE))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def rotating_sandbox_server() -> Iterator[SandboxServer]:
    """A sandbox of the test module's own: the session sandbox's accounts and keys, its own data and grants,
    refresh tokens rotating (a refresh sent twice, or to the wrong server, cannot pass)."""
    config = pytest.importorskip(
        "klaviyo_sandbox.config", reason="the Klaviyo sandbox package is not present"
    )
    from klaviyo_sandbox.testing import start_sandbox

    server = start_sandbox(
        config.SandboxConfig(accounts=sandbox_accounts(), rate_scale=RATE_SCALE, rotate_refresh_tokens=True)
    )
    yield server
    server.stop()


@pytest.fixture
def sandbox(sandbox_server: SandboxServer) -> Iterator[SandboxClient]:
    """Inspection/control of the session sandbox, reset, defaulting to the main account."""
    from klaviyo_sandbox.client import SandboxClient

    client = SandboxClient(sandbox_server.url, account=KLAVIYO_ACCOUNT)
    client.reset()
    yield client
    client.clear_faults()
    client.close()


@dataclass
class Captured:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes | None


@dataclass
class RequestRecorder:
    """Every request a client sent, checked against the official spec on demand."""

    requests: list[Captured] = field(default_factory=list)

    async def hook(self, request: httpx.Request) -> None:
        self.requests.append(
            Captured(
                request.method,
                str(request.url),
                {k.lower(): v for k, v in request.headers.items()},
                request.content or None,
            )
        )

    def api_requests(self) -> list[Captured]:
        return [r for r in self.requests if urlsplit(r.url).path.startswith("/api/")]

    def spec_problems(self) -> list[str]:
        if shared_dir() is None:
            return []
        spec = load_spec()
        problems: list[str] = []
        for r in self.api_requests():
            problems += spec.check_request(r.method, r.url, r.headers, r.body)
        return problems


@pytest.fixture
def recorder() -> Iterator[RequestRecorder]:
    """Records requests; at the end of the test every /api request must conform to Klaviyo's spec."""
    rec = RequestRecorder()
    yield rec
    problems = rec.spec_problems()
    assert problems == [], "requests that break Klaviyo's spec:\n" + "\n".join(problems)


@pytest.fixture
def cipher(settings: Settings) -> MultiFernet:
    assert settings.secret_key is not None
    return load_cipher(settings.secret_key.get_secret_value(), settings.state_dir)


@pytest.fixture
def store(redis: Redis, cipher: MultiFernet) -> AccountStore:
    return AccountStore(redis, cipher)


async def put_account(store: AccountStore, account_id: str, **secrets_: Any) -> Account:
    """A registry account in its minimal form, holding Klaviyo credentials."""
    account = Account(account_id=account_id, name=account_id, secrets=AccountSecrets.model_validate(secrets_))
    await store.put(account)
    return account


@pytest.fixture
async def account(store: AccountStore) -> Account:
    """``acme``: connected with the sandbox account's private key."""
    return await put_account(store, "acme", klaviyo_api_key=API_KEY)


def make_client(
    redis: Redis, store: AccountStore, base_url: str, recorder: RequestRecorder | None = None, **options: Any
) -> KlaviyoClient:
    return KlaviyoClient(
        redis,
        store,
        base_url=base_url,
        revision=REVISION,
        rate_scale=RATE_SCALE,
        options=ClientOptions(**options),
        event_hooks={"request": [recorder.hook]} if recorder else None,
    )


@pytest.fixture
async def client(
    redis: Redis,
    store: AccountStore,
    sandbox: SandboxClient,
    sandbox_server: SandboxServer,
    recorder: RequestRecorder,
) -> AsyncIterator[KlaviyoClient]:
    """A KlaviyoClient on the sandbox, requests recorded (and spec-checked by ``recorder``)."""
    async with make_client(redis, store, sandbox_server.url, recorder) as c:
        yield c


def oauth_grant(base_url: str) -> dict[str, Any]:
    """Connect the test app the way a merchant would: authorize (PKCE S256) and exchange the code."""
    verifier, challenge = pkce_pair()
    redirect_uri = "http://127.0.0.1/callback"
    url = authorize_url(
        f"{base_url}/oauth/authorize",
        client_id=OAUTH_CLIENT_ID,
        redirect_uri=redirect_uri,
        scopes=tuple(OAUTH_SCOPES),
        state="s1",
        challenge=challenge,
    )
    with httpx.Client(timeout=10) as http:
        r = http.get(url)
        assert r.status_code == 302, r.text
        back = parse_qs(urlsplit(r.headers["location"]).query)
        assert back["state"] == ["s1"]
        code = back["code"][0]
        r = http.post(
            f"{base_url}/oauth/token",
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": redirect_uri,
                "code_verifier": verifier,
            },
            auth=(OAUTH_CLIENT_ID, OAUTH_CLIENT_SECRET),
        )
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc


def grant_tokens(grant: dict[str, Any]) -> OAuthTokens:
    """How an account stores a grant the sandbox's token endpoint answered (:func:`oauth_grant`)."""
    import time

    return OAuthTokens.model_validate(
        {
            "client_id": OAUTH_CLIENT_ID,
            "client_secret": OAUTH_CLIENT_SECRET,
            "access_token": grant["access_token"],
            "refresh_token": grant["refresh_token"],
            "expires_at": time.time() + float(grant["expires_in"]),
            "scopes": grant["scope"].split(),
        }
    )


async def put_oauth_account(store: AccountStore, base_url: str, account_id: str = "oauthco") -> Account:
    tokens = grant_tokens(oauth_grant(base_url))
    account = Account(account_id=account_id, secrets=AccountSecrets(klaviyo_oauth=tokens))
    await store.put(account)
    return account
