"""Accounts with a Klaviyo of their own (``Account.klaviyo_base_url``): one KlaviyoClient whose global base URL
is the session sandbox, and a second sandbox over real loopback HTTP that only the overriding account talks to
— set-up, profile, event and record writes, and the OAuth refresh."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from passbridge.accounts import Account, AccountSecrets, AccountState, AccountStore
from passbridge.event import EventKind
from tests.sync.conftest import (
    API_KEY,
    KLAVIYO_ACCOUNT,
    RequestRecorder,
    grant_tokens,
    oauth_grant,
    put_account,
)
from tests.sync.test_oauth import event
from tests.sync.test_sync_sandbox import klaviyo_view, pass_event
from worker.klaviyo.client import KlaviyoClient
from worker.klaviyo.endpoints import CREATE_EVENT
from worker.setup import load_provisioned, provision
from worker.sync import Syncer


@pytest.fixture
def second(rotating_sandbox_server: Any) -> Iterator[Any]:
    from klaviyo_sandbox.client import SandboxClient

    with SandboxClient(rotating_sandbox_server.url, account=KLAVIYO_ACCOUNT) as c:
        c.reset()
        yield c


async def test_each_account_sets_up_and_writes_in_its_own_klaviyo(
    client: KlaviyoClient,
    redis: Redis,
    store: AccountStore,
    sandbox: Any,
    second: Any,
    rotating_sandbox_server: Any,
    recorder: RequestRecorder,
) -> None:
    prod = await put_account(store, "acme", klaviyo_api_key=API_KEY)
    trial = Account(
        account_id="trial",
        klaviyo_base_url=rotating_sandbox_server.url + "/",
        secrets=AccountSecrets(klaviyo_api_key=SecretStr(API_KEY)),
    )
    await store.put(trial)
    assert trial.klaviyo_base_url == rotating_sandbox_server.url
    for account in (prod, trial):
        await provision(client, redis, account)
    # Set-up ran once in each Klaviyo (each its own data source and object type).
    assert await load_provisioned(redis, "acme") is not None
    assert await load_provisioned(redis, "trial") is not None
    for box in (sandbox, second):
        assert (box.count("create_data_source", 201), box.count("create_object_type", 201)) == (1, 1)

    syncer = Syncer(client, redis)
    await syncer.sync_event(prod, None, pass_event("PROD-1", 1, EventKind.installed, 0))
    trial_event = pass_event("TRIAL-1", 1, EventKind.installed, 0).model_copy(update={"account_id": "trial"})
    await syncer.sync_event(trial, None, trial_event)

    for box, mine, other in ((sandbox, "PROD-1", "TRIAL-1"), (second, "TRIAL-1", "PROD-1")):
        view = klaviyo_view(box, mine)
        assert view["profile"] is not None
        assert view["profile"]["external_id"] == mine
        assert [e[0] for e in view["events"]] == ["Pass Installed"]
        assert view["record"] is not None
        assert view["record"]["serial_number"] == mine
        assert klaviyo_view(box, other) == {
            "profile": None,
            "events": [],
            "record": None,
            "record_profile": None,
            "profile_id": None,
        }
    hosts = {urlsplit(r.url).netloc for r in recorder.api_requests()}
    assert hosts == {urlsplit(sandbox.base_url).netloc, urlsplit(rotating_sandbox_server.url).netloc}


async def test_an_oauth_account_refreshes_at_its_own_token_endpoint(
    client: KlaviyoClient, store: AccountStore, sandbox: Any, second: Any, rotating_sandbox_server: Any
) -> None:
    """The grant was issued by the second Klaviyo: only its token endpoint knows the refresh token (the global
    one would refuse it and the account would be disconnected)."""
    tokens = grant_tokens(oauth_grant(rotating_sandbox_server.url))
    trial = Account(
        account_id="trial",
        klaviyo_base_url=rotating_sandbox_server.url,
        secrets=AccountSecrets(klaviyo_oauth=tokens),
    )
    await store.put(trial)
    assert second.expire_access_tokens() >= 1
    assert (await client.call(trial, CREATE_EVENT, body=event(1))).status == 202
    assert client.oauth.refreshes == 1
    stored = await store.get("trial")
    assert stored.state is AccountState.connected
    held = stored.secrets.klaviyo_oauth
    assert held is not None
    assert held.expires_at is not None
    assert held.expires_at > time.time() + 3000
    assert held.refresh_token != tokens.refresh_token  # the second sandbox rotated it
    assert second.count("create_event", 401) == 1
    assert second.count("create_event", 202) == 1
    assert sandbox.count("create_event") == 0
