"""``accounts check``: the pure judgements, the flow facts read from Redis, and the command without Klaviyo.

Checks against a live Klaviyo (the sandbox) are in ``test_sandbox.py``.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from passbridge.account_check import (
    Answer,
    FlowFacts,
    KlaviyoFacts,
    Status,
    judge_credentials,
    judge_custom_objects,
    judge_flow,
    judge_revision,
    judge_scopes,
    judge_state,
    read_flow,
)
from passbridge.accounts import Account, AccountSecrets, AccountState
from passbridge.keys import WORKERS, account_keys
from passbridge.oauth import DEFAULT_SCOPES
from tests.accounts.conftest import Cli
from tests.accounts.test_cli import enqueue
from tests.factories import event

OK = Answer(
    200,
    body={"data": [{"id": "XyZ123", "attributes": {"contact_information": {"organization_name": "Acme"}}}]},
)
INVALID = Answer(400, "invalid", "body is invalid")
FORBIDDEN = Answer(403, "permission_denied", "You do not have permission to perform this action.")


def account(**fields: object) -> Account:
    return Account.model_validate(
        {"account_id": "acme", "secrets": AccountSecrets(klaviyo_api_key=SecretStr("pk_x")), **fields}
    )


def key_facts(**answers: Answer) -> KlaviyoFacts:
    """A private key's probes: every one fine unless overridden."""
    base = {
        "/api/accounts": OK,
        "/api/profiles?page[size]=1": Answer(200, body={"data": []}),
        "/api/profile-bulk-import-jobs?page[size]=1": Answer(200, body={"data": []}),
        "/api/data-sources": Answer(200, body={"data": []}),
        "/api/events": INVALID,
        "/api/profile-import": INVALID,
        "/api/profile-bulk-import-jobs": INVALID,
        "/api/data-source-record-create-jobs": INVALID,
    }
    return KlaviyoFacts(auth="api_key", answers={**base, **answers})


def flow(**over: object) -> FlowFacts:
    doc: dict[str, object] = {
        "depth": 0, "ready": 0, "stalled": 0, "oldest_stalled_s": None, "leased": 0, "expired_leases": 0,
        "stats": {}, "provisioning": None,
    }  # fmt: skip
    return FlowFacts(**{**doc, **over})  # type: ignore[arg-type]


class TestCredentials:
    def test_valid_names_the_klaviyo_account(self) -> None:
        f = judge_credentials(account(), key_facts())
        assert f.status == Status.ok
        assert f.words == "the private API key is valid (Klaviyo account Acme XyZ123)"

    @pytest.mark.parametrize(
        ("answer", "status", "says"),
        [
            (
                Answer(401, "authentication_failed", "Incorrect authentication credentials."),
                Status.fail,
                "rejects the private API key",
            ),
            (FORBIDDEN, Status.ok, "lacks accounts:read"),
            (Answer(None, "ConnectError", "connection refused"), Status.fail, "cannot reach Klaviyo"),
            (Answer(429, "throttled", "slow down"), Status.warn, "rate-limiting"),
            (Answer(500, "error", "oops"), Status.fail, "answered 500"),
        ],
    )
    def test_answers_in_words(self, answer: Answer, status: Status, says: str) -> None:
        f = judge_credentials(account(), key_facts(**{"/api/accounts": answer}))
        assert f.status == status
        assert says in f.words

    def test_none_configured(self) -> None:
        f = judge_credentials(account(secrets=AccountSecrets()), None)
        assert f.status == Status.fail
        assert "no Klaviyo credentials" in f.words
        assert "passbridge accounts connect acme" in f.words

    def test_revoked_grant(self) -> None:
        facts = KlaviyoFacts(
            auth="oauth", refresh_error="Klaviyo's token endpoint refused the request (invalid_grant)"
        )
        f = judge_credentials(account(), facts)
        assert f.status == Status.fail
        assert "invalid_grant" in f.words
        assert "connect again" in f.words


class TestScopes:
    def test_all_present(self) -> None:
        assert judge_scopes(key_facts()).status == Status.ok

    def test_missing_write_scope_is_found_by_its_403(self) -> None:
        f = judge_scopes(key_facts(**{"/api/events": FORBIDDEN}))
        assert f.status == Status.fail
        assert "lacks events:write" in f.words

    def test_two_scope_endpoint_blames_the_one_not_proven(self) -> None:
        # profile-import answered 400 (profiles:write present) and bulk import 403: lists:write is missing.
        f = judge_scopes(key_facts(**{"/api/profile-bulk-import-jobs": FORBIDDEN}))
        assert "lacks lists:write:" in f.words

    def test_oauth_grant_is_compared_with_the_scopes_needed(self) -> None:
        facts = KlaviyoFacts(auth="oauth", answers={"/api/accounts": OK}, granted_scopes=DEFAULT_SCOPES[:-1])
        f = judge_scopes(facts)
        assert f.status == Status.fail
        assert DEFAULT_SCOPES[-1] in f.words
        facts.granted_scopes = DEFAULT_SCOPES
        assert judge_scopes(facts).status == Status.ok

    def test_unknown_without_working_credentials(self) -> None:
        assert judge_scopes(None).status == Status.skip
        assert judge_scopes(key_facts(**{"/api/accounts": Answer(401)})).status == Status.skip


class TestRevision:
    def test_accepted(self) -> None:
        assert judge_revision("2026-10-15", key_facts()).words == "Klaviyo accepts revision 2026-10-15"

    def test_too_old_for_custom_objects(self) -> None:
        f = judge_revision("2025-10-15", key_facts())
        assert f.status == Status.fail
        assert "predates Custom Objects" in f.words

    def test_refused(self) -> None:
        refused = Answer(400, "invalid", "Invalid revision header: 2031-01-01")
        f = judge_revision("2031-01-01", key_facts(**{"/api/accounts": refused}))
        assert f.status == Status.fail
        assert "Invalid revision header" in f.words


class TestCustomObjects:
    walletpass = Answer(
        200, body={"data": [{"id": "01K", "attributes": {"title": "WalletPass", "status": "active"}}]}
    )

    def test_not_provisioned_points_at_setup(self) -> None:
        f = judge_custom_objects("acme", key_facts(), flow())
        assert f.status == Status.warn
        assert "not provisioned — run `passbridge klaviyo setup --account acme`" in f.words

    def test_provisioned_and_active(self) -> None:
        facts = key_facts()
        facts.object_types = self.walletpass
        f = judge_custom_objects("acme", facts, flow(provisioning={"object_type_id": "01K"}))
        assert f.status == Status.ok
        assert "entitled and provisioned" in f.words

    def test_provisioned_but_gone(self) -> None:
        facts = key_facts()
        facts.object_types = self.walletpass  # a WalletPass type, but not the one provisioned
        f = judge_custom_objects("acme", facts, flow(provisioning={"object_type_id": "01OTHER"}))
        assert f.status == Status.fail
        assert "no longer has that WalletPass object type" in f.words

    def test_no_read_scope(self) -> None:
        f = judge_custom_objects("acme", key_facts(**{"/api/data-sources": FORBIDDEN}), flow())
        assert f.status == Status.fail
        assert "custom-objects:read" in f.words


class TestFlow:
    def test_idle(self) -> None:
        f = judge_flow(account(), flow(stats={"skipped": 3}))
        assert (f.status, f.words) == (
            Status.ok,
            "no events waiting; 3 events skipped so far (pass types not synced)",
        )

    def test_stalled_with_no_live_worker_fails(self) -> None:
        f = judge_flow(account(), flow(depth=12, ready=4, stalled=4, oldest_stalled_s=95.0))
        assert f.status == Status.fail
        assert "12 events waiting; 4 passes ready for over 60 s" in f.words
        assert "the oldest for 95 s" in f.words
        assert "no worker alive" in f.words

    def test_stalled_with_live_workers_is_a_warning(self) -> None:
        f = judge_flow(account(), flow(depth=12, ready=4, stalled=4, oldest_stalled_s=95.0, live_workers=3))
        assert f.status == Status.warn
        assert "although 3 workers are alive: busy with other accounts' work (fair share)" in f.words

    def test_stalled_while_klaviyo_throttles(self) -> None:
        f = judge_flow(account(), flow(depth=2, ready=1, stalled=1, throttled_s=42.0))
        assert f.status == Status.warn
        assert "Klaviyo throttled the account (429), workers take its passes again in 42 s" in f.words

    def test_engine_pause_holds_events(self) -> None:
        f = judge_flow(account(), flow(depth=2, ready=1, stalled=1, engine_pause="auth: HTTP 401"))
        assert f.status == Status.warn
        assert "held because the engine paused the account (auth: HTTP 401)" in f.words

    def test_flowing(self) -> None:
        f = judge_flow(account(), flow(depth=5, ready=1, leased=2))
        assert f.status == Status.ok
        assert f.words.startswith("5 events waiting, flowing: workers hold 2 passes")

    def test_paused_account_holds_events(self) -> None:
        f = judge_flow(
            account(state="paused", state_reason="merchant asked"), flow(depth=2, ready=2, stalled=2)
        )
        assert f.status == Status.warn
        assert "held because the account is paused (merchant asked)" in f.words

    def test_state(self) -> None:
        assert judge_state(account()).status == Status.ok
        assert "--state connected" in judge_state(account(state=AccountState.disconnected)).words


async def test_read_flow_counts_from_redis(redis: Redis) -> None:
    keys = account_keys("acme")
    now = time.time()
    await redis.set(keys.depth, 7)
    await redis.zadd(keys.ready, {"S1": (now - 120) * 1000, "S2": (now - 1) * 1000, "S3": (now + 30) * 1000})
    await redis.zadd(keys.leased, {"S4": (now + 10) * 1000, "S5": (now - 5) * 1000})
    await redis.hset(keys.stats, mapping={"skipped": 4, "skipped:ptk_x": 4})
    facts = await read_flow(redis, "acme", now)
    assert (facts.depth, facts.ready, facts.stalled, facts.leased, facts.expired_leases) == (7, 3, 1, 2, 1)
    assert facts.oldest_stalled_s == pytest.approx(120, abs=0.01)
    assert facts.stats == {"skipped": 4, "skipped:ptk_x": 4}
    assert (facts.live_workers, facts.engine_pause, facts.throttled_s) == (0, None, None)

    # Heartbeats as the workers write them (one silent for a minute), a 429 deferral and an engine pause.
    await redis.zadd(WORKERS, {"w-alive": now * 1000 - 2000, "w-silent": now * 1000 - 60_000})
    await redis.set(keys.deferred, b"1", px=30_000)
    await redis.hset(keys.paused, mapping={"since_ms": int(now * 1000), "kind": "auth", "reason": "HTTP 401"})
    facts = await read_flow(redis, "acme", now)
    assert facts.live_workers == 1
    assert facts.throttled_s == pytest.approx(30, abs=1)
    assert facts.engine_pause == "auth: HTTP 401"


class TestCommandWithoutKlaviyo:
    def test_no_credentials_fails_with_the_fix(self, cli: Cli) -> None:
        cli.ok("accounts", "add", "acme")
        result = cli("accounts", "check", "acme", "--json")
        assert result.exit_code == 1
        doc = orjson.loads(result.stdout)
        findings = {f["topic"]: f for f in doc["findings"]}
        assert doc["ok"] is False
        assert findings["credentials"]["status"] == "fail"
        assert findings["scopes"]["status"] == "skip"
        assert findings["events"]["words"] == "no events waiting"

    def test_unreachable_klaviyo_and_waiting_events(self, cli: Cli) -> None:
        cli.ok("accounts", "add", "acme", "--klaviyo-api-key", "pk_abcdef123456")
        enqueue(cli, "acme", [event(1), event(2)])
        result = cli("accounts", "check", "acme", env={"PASSBRIDGE_KLAVIYO_BASE_URL": "http://127.0.0.1:9"})
        assert result.exit_code == 1
        text = " ".join(result.stdout.split())
        assert "cannot reach Klaviyo" in text
        assert "2 events waiting" in text
        assert "needs attention" in text

    def test_unknown_account(self, cli: Cli) -> None:
        assert "no account 'nope'" in cli.fails("accounts", "check", "nope")


def test_flow_facts_of_a_real_enqueue(cli: Cli) -> None:
    cli.ok("accounts", "add", "acme", "--sync-pass-type", "ptk_0x216")
    enqueue(cli, "acme", [event(1), event(2, pass_type="ptk_other")])

    async def go() -> FlowFacts:
        redis = Redis.from_url(cli.env["REDIS_URL"])
        try:
            return await read_flow(redis, "acme", time.time() + 61)
        finally:
            await redis.aclose()

    facts = asyncio.run(go())
    assert (facts.depth, facts.ready, facts.stalled) == (1, 1, 1)
    assert facts.stats["skipped"] == 1
