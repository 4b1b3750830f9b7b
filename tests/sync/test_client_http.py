"""KlaviyoClient over real HTTP against the sandbox: request shape, each error class from the statuses that
produce it, rate limiting shared with the sandbox's, and secrets kept out of logs, errors and reprs."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from passbridge.accounts import Account, AccountStore
from tests.sync.conftest import (
    API_KEY,
    READONLY_KEY,
    REVISION,
    RequestRecorder,
    make_client,
    put_account,
    sandbox_accounts,
)
from worker.klaviyo.client import ClientOptions, KlaviyoClient, check_revision
from worker.klaviyo.endpoints import (
    CREATE_EVENT,
    CREATE_OR_UPDATE_PROFILE,
    GET_DATA_SOURCES,
    GET_OBJECT_SCHEMA,
)
from worker.klaviyo.errors import AuthError, PermanentError, ThrottledError, TransientError


def event(serial: str = "S1", unique: str = "evt-1") -> dict[str, Any]:
    return {
        "data": {
            "type": "event",
            "attributes": {
                "properties": {"serial_number": serial},
                "time": "2026-11-25T10:00:00Z",
                "unique_id": unique,
                "metric": {"data": {"type": "metric", "attributes": {"name": "Pass Created"}}},
                "profile": {"data": {"type": "profile", "attributes": {"external_id": serial}}},
            },
        }
    }


def profile(**attributes: Any) -> dict[str, Any]:
    return {"data": {"type": "profile", "attributes": {"external_id": "S1", **attributes}}}


async def test_request_shape(
    client: KlaviyoClient, account: Account, recorder: RequestRecorder, sandbox: Any
) -> None:
    reply = await client.call(account, CREATE_EVENT, body=event())
    assert (reply.status, reply.body) == (202, None)
    sent = recorder.api_requests()[-1]
    assert sent.method == "POST"
    assert sent.url.endswith("/api/events")
    assert sent.headers["revision"] == REVISION
    assert sent.headers["authorization"] == f"Klaviyo-API-Key {API_KEY}"
    assert sent.headers["content-type"] == "application/vnd.api+json"
    assert sent.headers["accept"] == "application/vnd.api+json"
    assert "gzip" in sent.headers["accept-encoding"]
    assert sent.headers["user-agent"].startswith("passbridge/")
    assert sandbox.count("create_event", 202) == 1


async def test_profile_import_created_then_updated(client: KlaviyoClient, account: Account) -> None:
    first = await client.call(account, CREATE_OR_UPDATE_PROFILE, body=profile(email="ada@example.com"))
    second = await client.call(account, CREATE_OR_UPDATE_PROFILE, body=profile(properties={"points": 1}))
    assert (first.status, second.status) == (201, 200)
    assert first.body["data"]["id"] == second.body["data"]["id"]


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_5xx_is_transient(client: KlaviyoClient, account: Account, sandbox: Any, status: int) -> None:
    sandbox.set_faults(error_rates={status: 1.0}, operations=["create_event"])
    with pytest.raises(TransientError) as info:
        await client.call(account, CREATE_EVENT, body=event())
    assert (info.value.status, info.value.endpoint) == (status, "create_event")
    # Only that endpoint fails.
    assert (await client.call(account, CREATE_OR_UPDATE_PROFILE, body=profile())).status == 201


async def test_501_is_permanent(client: KlaviyoClient, account: Account, sandbox: Any) -> None:
    sandbox.set_faults(error_rates={501: 1.0}, operations=["create_event"])
    with pytest.raises(PermanentError) as info:
        await client.call(account, CREATE_EVENT, body=event())
    assert info.value.status == 501


async def test_400_is_permanent_with_klaviyos_details(client: KlaviyoClient, account: Account) -> None:
    with pytest.raises(PermanentError) as info:
        await client.call(account, CREATE_OR_UPDATE_PROFILE, body=profile(phone_number="+1555"))
    err = info.value
    assert err.status == 400
    assert err.code == "invalid"
    assert err.pointer == "/data/attributes/phone_number"
    assert "phone" in err.detail.lower()


async def test_404_is_permanent(client: KlaviyoClient, account: Account) -> None:
    with pytest.raises(PermanentError) as info:
        await client.call(account, GET_OBJECT_SCHEMA, path_params={"id": "01JZZZZZZZZZZZZZZZZZZZZZZZ"})
    assert (info.value.status, info.value.code) == (404, "not_found")


async def test_401_with_a_wrong_key_is_auth(client: KlaviyoClient, store: AccountStore) -> None:
    wrong = await put_account(store, "wrongkey", klaviyo_api_key="pk_not_a_key_1234567890")
    with pytest.raises(AuthError) as info:
        await client.call(wrong, CREATE_EVENT, body=event())
    assert (info.value.status, info.value.code) == (401, "authentication_failed")
    assert "pk_not_a_key" not in str(info.value)
    assert "pk_not_a_key" not in repr(info.value)


async def test_403_for_a_missing_scope_is_auth(client: KlaviyoClient, store: AccountStore) -> None:
    readonly = await put_account(store, "readonly", klaviyo_api_key=READONLY_KEY)
    with pytest.raises(AuthError) as info:
        await client.call(readonly, CREATE_EVENT, body=event())
    assert info.value.status == 403


async def test_no_credentials_is_auth(client: KlaviyoClient, store: AccountStore) -> None:
    bare = await put_account(store, "bare")
    with pytest.raises(AuthError) as info:
        await client.call(bare, CREATE_EVENT, body=event())
    assert info.value.code == "no_credentials"


def requests_counted(account: Account, status: str) -> float:
    """``passbridge_klaviyo_requests_total`` of create_event with ``status``, as this process exposes it."""
    value = REGISTRY.get_sample_value(
        "passbridge_klaviyo_requests_total",
        {"account": account.account_id, "endpoint": "create_event", "status": status},
    )
    return value or 0.0


async def test_timeout_and_dropped_connection_are_transient(
    redis: Redis, store: AccountStore, account: Account, sandbox: Any, sandbox_server: Any
) -> None:
    before = {s: requests_counted(account, s) for s in ("timeout", "network")}
    async with make_client(redis, store, sandbox_server.url, read_timeout_s=0.3) as client:
        sandbox.set_faults(hang_rate=1.0, hang_s=5, operations=["create_event"])
        with pytest.raises(TransientError, match="timed out"):
            await client.call(account, CREATE_EVENT, body=event())
        sandbox.set_faults(drop_rate=1.0, operations=["create_event"])
        with pytest.raises(TransientError, match="network error"):
            await client.call(account, CREATE_EVENT, body=event())
    # Requests that got no answer are counted too, or an outage of timeouts would look like no traffic.
    assert requests_counted(account, "timeout") == before["timeout"] + 1
    assert requests_counted(account, "network") == before["network"] + 1


async def test_unreachable_server_is_transient(redis: Redis, store: AccountStore, account: Account) -> None:
    before = requests_counted(account, "network")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connection refused
        async with make_client(redis, store, f"http://127.0.0.1:{port}") as client:
            with pytest.raises(TransientError, match="network error"):
                await client.call(account, CREATE_EVENT, body=event())
    assert requests_counted(account, "network") == before + 1


@pytest.fixture(scope="module")
def real_clock_server() -> Iterator[Any]:
    """A sandbox on Klaviyo's real clock (rate scale 1): its windows dwarf any scheduling jitter here."""
    config = pytest.importorskip(
        "klaviyo_sandbox.config", reason="the Klaviyo sandbox package is not present"
    )
    from klaviyo_sandbox.testing import start_sandbox

    server = start_sandbox(config.SandboxConfig(accounts=sandbox_accounts(), rate_scale=1.0))
    yield server
    server.stop()


@pytest.fixture
def real_clock(real_clock_server: Any) -> Iterator[Any]:
    from klaviyo_sandbox.client import SandboxClient

    with SandboxClient(real_clock_server.url, account="KSYNC1") as control:
        control.reset()
        yield control


async def test_429_is_throttled_and_pauses_the_endpoint(
    redis: Redis, store: AccountStore, account: Account, real_clock: Any
) -> None:
    """Our limiter switched off (a huge scale): Klaviyo's 3/s tier refuses a burst of six with 429."""
    client = KlaviyoClient(
        redis,
        store,
        base_url=real_clock.base_url,
        revision=REVISION,
        rate_scale=1e9,
        options=ClientOptions(max_throttle_retries=0, rate_pad_s=0),
    )
    async with client:
        results = await asyncio.gather(
            *(client.call(account, GET_DATA_SOURCES) for _ in range(6)), return_exceptions=True
        )
        throttled = [r for r in results if isinstance(r, ThrottledError)]
        assert len(throttled) == 3
        assert all(t.retry_after_s == 1 for t in throttled)
        assert all(t.endpoint == "get_data_sources" for t in throttled)
        assert all(t.status == 429 for t in throttled)
        # The pause is recorded for (account, endpoint): every process's limiter now holds callers back.
        wait = await client.limiter.try_acquire("acme", "get_data_sources", GET_DATA_SOURCES.tier)
        assert 0.5 < wait <= 1
        assert await client.limiter.try_acquire("acme", "create_event", CREATE_EVENT.tier) == 0
    assert real_clock.count("get_data_sources", 429) == 3


async def test_short_429s_are_waited_out(
    redis: Redis, store: AccountStore, account: Account, real_clock: Any
) -> None:
    """A 429 whose Retry-After the client can afford is waited out and the request sent again."""
    client = KlaviyoClient(
        redis,
        store,
        base_url=real_clock.base_url,
        revision=REVISION,
        rate_scale=1e9,
        options=ClientOptions(rate_pad_s=0, max_slot_wait_s=2),
    )
    async with client:
        results = await asyncio.gather(*(client.call(account, GET_DATA_SOURCES) for _ in range(5)))
    assert all(r.status == 200 for r in results)
    assert real_clock.count("get_data_sources", 429) >= 2
    assert real_clock.count("get_data_sources", 200) == 5


async def test_our_limiter_keeps_us_under_klaviyos_limit(
    redis: Redis, store: AccountStore, account: Account, real_clock: Any
) -> None:
    """Same tiers on both sides at Klaviyo's real clock: a burst is spread by our limiter, never refused."""
    client = KlaviyoClient(redis, store, base_url=real_clock.base_url, revision=REVISION, rate_scale=1.0)
    async with client:
        results = await asyncio.gather(*(client.call(account, GET_DATA_SOURCES) for _ in range(7)))
    assert all(r.status == 200 for r in results)
    assert real_clock.count("get_data_sources", 429) == 0
    assert real_clock.count("get_data_sources", 200) == 7


async def test_secrets_stay_out_of_logs_errors_and_reprs(
    client: KlaviyoClient, account: Account, store: AccountStore, sandbox: Any
) -> None:
    wrong = await put_account(store, "wrongkey", klaviyo_api_key="pk_secret_never_shown_123")
    with structlog.testing.capture_logs() as logs:
        await client.call(account, CREATE_EVENT, body=event())
        sandbox.set_faults(error_rates={503: 1.0}, operations=["create_event"])
        with pytest.raises(TransientError) as transient:
            await client.call(account, CREATE_EVENT, body=event())
        with pytest.raises(AuthError) as auth:
            await client.call(wrong, CREATE_OR_UPDATE_PROFILE, body=profile())
    text = " ".join(
        [
            repr(logs),
            str(transient.value),
            repr(transient.value),
            str(auth.value),
            repr(auth.value),
            repr(client),
            str(auth.value.as_record()),
            repr(account),
            str(account),
        ]
    )
    assert logs, "the failures were logged"
    for secret in (API_KEY, "pk_secret_never_shown_123"):
        assert secret not in text


def test_revision_must_be_recent_and_well_formed() -> None:
    assert check_revision("2026-07-15") == "2026-07-15"
    assert check_revision("2026-10-15.pre") == "2026-10-15.pre"
    with pytest.raises(ValueError, match="older than 2026-07-15"):
        check_revision("2026-04-15")
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        check_revision("latest")


async def test_timeouts_and_pool_are_explicit(redis: Redis, store: AccountStore) -> None:
    options = ClientOptions(
        connect_timeout_s=1.5, read_timeout_s=7, max_connections=11, max_keepalive_connections=3
    )
    async with make_client(redis, store, "http://127.0.0.1:9", **vars_of(options)) as client:
        timeout = client._http.timeout
        assert (timeout.connect, timeout.read, timeout.write, timeout.pool) == (1.5, 7, 30.0, 10.0)
        pool = client._http._transport._pool  # type: ignore[attr-defined]
        assert (pool._max_connections, pool._max_keepalive_connections) == (11, 3)


def vars_of(options: ClientOptions) -> dict[str, Any]:
    return {f: getattr(options, f) for f in options.__dataclass_fields__}
