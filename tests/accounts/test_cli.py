"""``passbridge accounts add|list|show|update|remove``: real commands against the test Redis."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from passbridge.accounts import AccountState, hash_token
from passbridge.keys import ACCOUNTS_INDEX, ACTIVE_ACCOUNTS, REMOVED_ACCOUNTS, account_keys
from producer.api import publish
from tests.accounts.conftest import Cli
from tests.factories import event, webhook_secret

KEY = "pk_live0123456789abcdefABCDEF"


def enqueue(cli: Cli, account_id: str, items: list[dict[str, object]]) -> None:
    """Publish events straight into Redis the way the producer does (publish() is its Python API)."""

    account = cli.account(account_id)

    async def go() -> None:
        redis = Redis.from_url(cli.env["REDIS_URL"])
        try:
            await publish(redis, account, items)
        finally:
            await redis.aclose()

    asyncio.run(go())


class TestAdd:
    def test_generates_credentials_shows_them_once_and_stores_them_protected(self, cli: Cli) -> None:
        doc = cli.json("accounts", "add", "acme", "--name", "Acme Coffee", "--klaviyo-api-key", KEY)
        shown = doc["shown_once"]
        assert shown["ingest_token"].startswith("pbi_")
        assert shown["webhook_secret"][0].startswith("whsec_")
        stored = cli.account("acme")
        assert stored.name == "Acme Coffee"
        assert stored.check_ingest_token(shown["ingest_token"])
        assert stored.ingest_token_sha256 == hash_token(shown["ingest_token"])
        assert [s.get_secret_value() for s in stored.secrets.webhook_secrets] == shown["webhook_secret"]
        assert stored.secrets.apple_token_secret is not None
        assert stored.secrets.apple_token_secret.get_secret_value() == shown["apple_token_secret"]
        assert stored.secrets.klaviyo_api_key is not None
        assert stored.secrets.klaviyo_api_key.get_secret_value() == KEY
        # The answer itself masks what it did not generate.
        assert KEY not in str(doc["secrets"])
        assert doc["secrets"]["klaviyo_api_key"] == "pk_…CDEF"
        assert cli.redis.smembers(ACCOUNTS_INDEX) == {b"acme"}

    def test_table_output_names_the_account_and_prints_generated_secrets(self, cli: Cli) -> None:
        out = cli.ok("accounts", "add", "acme").stdout
        assert "created account acme" in out
        assert "ingest token (shown once): pbi_" in out
        assert "webhook secret (shown once): whsec_" in out

    def test_every_setting_from_options(self, cli: Cli) -> None:
        secret = webhook_secret()
        cli.ok(
            "accounts", "add", "acme",
            "--ingest-token", "my-ingest-token",
            "--webhook-secret", secret,
            "--apple-token-secret", "apple-s3cret",
            "--apple-pass-type", "pass.com.acme.loyalty=ptk_0x216",
            "--google-issuer-id", "3388000000022",
            "--google-keys-file", "/etc/google-keys.json",
            "--google-class", "3388000000022.loyalty=ptk_0x216",
            "--google-serial-from", "object_id",
            "--pass-url-template", "https://wallet.acme.com/p/{serial_number}",
            "--sync-pass-type", "ptk_0x216",
            "--klaviyo-oauth-client-id", "client-1",
            "--klaviyo-oauth-client-secret", "client-secret-1",
            "--rate-limit", "create_event.burst=100",
            "--rate-limit", "create_event.steady=2000",
            "--rate-limit", "*.fraction=0.5",
            "--retry", "max_attempts=5",
            "--retry", "max_age_s=3600",
        )  # fmt: skip
        a = cli.account("acme")
        assert a.check_ingest_token("my-ingest-token")
        assert [s.get_secret_value() for s in a.secrets.webhook_secrets] == [secret]
        assert a.secrets.apple_token_secret
        assert a.secrets.apple_token_secret.get_secret_value() == "apple-s3cret"
        assert a.apple_pass_types == {"pass.com.acme.loyalty": "ptk_0x216"}
        assert (a.google_issuer_id, a.google_keys_file) == ("3388000000022", "/etc/google-keys.json")
        assert a.google_classes == {"3388000000022.loyalty": "ptk_0x216"}
        assert a.google_serial_from == "object_id"
        assert a.pass_url_template == "https://wallet.acme.com/p/{serial_number}"
        assert a.sync_pass_types == ["ptk_0x216"]
        assert a.secrets.klaviyo_oauth is not None
        assert a.secrets.klaviyo_oauth.client_id == "client-1"
        assert a.secrets.klaviyo_oauth.client_secret.get_secret_value() == "client-secret-1"
        assert a.klaviyo_auth() is None  # a client without a grant is not a connection yet
        assert a.rate_limit_overrides == {
            "create_event": {"burst": 100, "steady": 2000},
            "*": {"fraction": 0.5},
        }
        assert a.retry_policy == {"max_attempts": 5, "max_age_s": 3600.0}

    def test_secret_read_from_stdin_stays_out_of_argv(self, cli: Cli) -> None:
        cli.ok("accounts", "add", "acme", "--klaviyo-api-key", "-", input=KEY + "\n")
        key = cli.account("acme").secrets.klaviyo_api_key
        assert key is not None
        assert key.get_secret_value() == KEY

    def test_existing_account_is_refused_and_kept(self, cli: Cli) -> None:
        first = cli.json("accounts", "add", "acme")["shown_once"]["ingest_token"]
        assert "exists" in cli.fails("accounts", "add", "acme")
        assert cli.account("acme").check_ingest_token(first)

    @pytest.mark.parametrize(
        ("args", "says"),
        [
            (["bad id!"], "account_id"),
            (
                ["acme", "--webhook-secret", "not-a-secret"],
                "webhook_secrets: Value error, a webhook secret starts with whsec_",
            ),
            (["acme", "--webhook-secret", "whsec_!!!"], "base64"),
            (["acme", "--pass-url-template", "https://x/p"], "must contain {serial_number}"),
            (["acme", "--pass-url-template", "ftp://x/{serial_number}"], "http(s)"),
            (["acme", "--rate-limit", "evnts.burst=1"], "unknown endpoint 'evnts'"),
            (["acme", "--rate-limit", "create_event.burst=0"], "greater than 0"),
            (["acme", "--rate-limit", "create_event=1"], "ENDPOINT.FIELD=VALUE"),
            (["acme", "--retry", "max_attempts=zero"], "retry.max_attempts"),
            (["acme", "--retry", "tries=3"], "retry.tries"),
            (["acme", "--apple-pass-type", "pass.x"], "KEY=VALUE"),
            (["acme", "--google-serial-from", "middle"], "google_serial_from"),
            (["acme", "--klaviyo-oauth-client-secret", "s"], "needs klaviyo_oauth_client_id"),
            *(
                (
                    ["acme", "--klaviyo-api-key", key],
                    "klaviyo_api_key: the Klaviyo private API key must be printable",
                )
                for key in ("pk_0123\n4567abcdef", "pk_0123 4567abcdef", "pk_0123\u00e94567abcdef")
            ),
            (["acme", "--klaviyo-oauth-client-id", "c"], "needs its klaviyo_oauth_client_secret"),
        ],
    )
    def test_invalid_input_is_refused_naming_the_field(self, cli: Cli, args: list[str], says: str) -> None:
        error = cli.fails("accounts", "add", *args)
        assert says.replace("Value error, ", "") in error
        assert cli.redis.smembers(ACCOUNTS_INDEX) == set()

    def test_no_environment_variable_supplies_a_klaviyo_key(self, cli: Cli) -> None:
        """A key left in the environment must never land on every new account (another tenant's Klaviyo)."""
        cli.ok("accounts", "add", "acme", env={"PASSBRIDGE_NEW_ACCOUNT_KLAVIYO_KEY": KEY})
        assert cli.account("acme").secrets.klaviyo_api_key is None

    def test_a_full_redis_is_one_line_without_the_account_record(self, cli: Cli) -> None:
        """Redis full (``noeviction``): redis-py's error quoted the whole pipeline command, the account record
        and its encrypted secrets included; now the command's name and what to do."""
        policy = cli.redis.config_get("maxmemory-policy")["maxmemory-policy"]
        cli.redis.config_set("maxmemory-policy", "noeviction")
        cli.redis.config_set("maxmemory", 1)  # below what any Redis uses: every write is refused
        try:
            error = cli.fails(
                "accounts", "add", "gamma", "--name", "Gamma", "--klaviyo-api-key", "pk_full_0123456789"
            )
        finally:
            cli.redis.config_set("maxmemory", 0)
            cli.redis.config_set("maxmemory-policy", policy)
        assert "refused the write" in error
        assert "Redis is full and refuses writes: free memory or raise maxmemory" in error
        assert "(HSET ...)" in error
        assert "gAAAA" not in error  # no Fernet token
        assert "Gamma" not in error
        assert "pk_full" not in error


class TestListAndShow:
    def test_list_counts_waiting_and_skipped_per_account(self, cli: Cli) -> None:
        cli.ok("accounts", "add", "acme", "--sync-pass-type", "ptk_0x216", "--klaviyo-api-key", KEY)
        cli.ok("accounts", "add", "bolt")
        enqueue(
            cli,
            "acme",
            [event(1), event(2), event(3, pass_type="ptk_other"), event(4, pass_type="ptk_other")],
        )
        enqueue(cli, "bolt", [event(5, pass_type="ptk_other")])
        rows = {r["account_id"]: r for r in cli.json("accounts", "list")}
        assert (rows["acme"]["waiting"], rows["acme"]["skipped"]) == (2, 2)
        assert (rows["bolt"]["waiting"], rows["bolt"]["skipped"]) == (1, 0)
        assert rows["acme"]["klaviyo_auth"] == "api_key"
        assert rows["bolt"]["klaviyo_auth"] is None
        assert cli.redis.hget(account_keys("acme").stats, "skipped:ptk_other") == b"2"
        table = cli.ok("accounts", "list").stdout
        assert "acme" in table
        assert "bolt" in table
        assert "ptk_0x216" in table
        assert "api_key" in table

    def test_list_empty_registry_says_how_to_start(self, cli: Cli) -> None:
        assert cli.json("accounts", "list") == []
        assert "accounts add" in cli.ok("accounts", "list").stdout

    def test_show_masks_every_secret(self, cli: Cli) -> None:
        secret = webhook_secret()
        cli.ok(
            "accounts", "add", "acme", "--ingest-token", "ingest-token-value-1",
            "--webhook-secret", secret, "--apple-token-secret", "apple-secret-value",
            "--klaviyo-api-key", KEY, "--klaviyo-oauth-client-id", "cid",
            "--klaviyo-oauth-client-secret", "oauth-client-secret-value",
        )  # fmt: skip
        for output in (
            cli.ok("accounts", "show", "acme").stdout,
            cli.ok("accounts", "show", "acme", "--json").stdout,
        ):
            for value in (secret, KEY, "apple-secret-value", "oauth-client-secret-value", "ingest-token-value-1",
                          hash_token("ingest-token-value-1")):  # fmt: skip
                assert value not in output
            assert secret[-4:] in output
            assert KEY[-4:] in output
        doc = cli.json("accounts", "show", "acme")
        assert doc["secrets"]["apple_token_secret"] == "set"
        assert doc["secrets"]["klaviyo_oauth"]["client_secret"] == "set"
        assert doc["secrets"]["klaviyo_oauth"]["client_id"] == "cid"

    def test_show_unknown_account_fails(self, cli: Cli) -> None:
        assert "no account 'nope'" in cli.fails("accounts", "show", "nope")
        assert "no account 'nope'" in cli.fails("accounts", "show", "nope", "--json")


class TestUpdate:
    def test_changes_only_the_options_given(self, cli: Cli) -> None:
        cli.ok(
            "accounts", "add", "acme", "--name", "Acme", "--klaviyo-api-key", KEY, "--sync-pass-type", "ptk_a"
        )
        before = cli.account("acme")
        cli.ok("accounts", "update", "acme", "--name", "Acme Coffee", "--sync-pass-type", "ptk_b")
        after = cli.account("acme")
        assert (after.name, after.sync_pass_types) == ("Acme Coffee", ["ptk_b"])
        assert after.secrets == before.secrets
        assert after.ingest_token_sha256 == before.ingest_token_sha256
        cli.ok("accounts", "update", "acme", "--sync-all")
        assert cli.account("acme").sync_pass_types == []

    def test_webhook_secret_rotation(self, cli: Cli) -> None:
        old = cli.json("accounts", "add", "acme")["shown_once"]["webhook_secret"][0]
        new = cli.json("accounts", "update", "acme", "--new-webhook-secret")["shown_once"]["webhook_secret"]
        assert [s.get_secret_value() for s in cli.account("acme").secrets.webhook_secrets] == [old, new]
        # Remove the old one by the tail `show` prints.
        shown_tail = cli.json("accounts", "show", "acme")["secrets"]["webhook_secrets"][0]
        cli.ok("accounts", "update", "acme", "--remove-webhook-secret", shown_tail)
        assert [s.get_secret_value() for s in cli.account("acme").secrets.webhook_secrets] == [new]
        error = cli.fails("accounts", "update", "acme", "--remove-webhook-secret", old)
        assert f"--remove-webhook-secret 'whsec_…{old[-4:]}' matches 0 secrets" in error
        assert old not in error
        assert old.removeprefix("whsec_")[:-4] not in error
        added = webhook_secret()
        cli.ok("accounts", "update", "acme", "--add-webhook-secret", added, "--remove-webhook-secret", new)
        assert [s.get_secret_value() for s in cli.account("acme").secrets.webhook_secrets] == [added]

    def test_invalid_added_secret_is_refused_without_echoing_secrets(self, cli: Cli) -> None:
        old = cli.json("accounts", "add", "acme")["shown_once"]["webhook_secret"][0]
        error = cli.fails("accounts", "update", "acme", "--add-webhook-secret", "not-a-secret")
        assert "webhook_secrets: a webhook secret starts with whsec_" in error
        assert old[6:20] not in error  # pydantic would quote the input list; ours never does
        assert [s.get_secret_value() for s in cli.account("acme").secrets.webhook_secrets] == [old]

    def test_new_ingest_token_replaces_the_old(self, cli: Cli) -> None:
        old = cli.json("accounts", "add", "acme")["shown_once"]["ingest_token"]
        new = cli.json("accounts", "update", "acme", "--new-ingest-token")["shown_once"]["ingest_token"]
        stored = cli.account("acme")
        assert stored.check_ingest_token(new)
        assert not stored.check_ingest_token(old)

    def test_clear_options_and_overrides(self, cli: Cli) -> None:
        cli.ok(
            "accounts",
            "add",
            "acme",
            "--klaviyo-api-key",
            KEY,
            "--rate-limit",
            "create_event.burst=9",
            "--retry",
            "max_attempts=2",
        )
        cli.ok(
            "accounts", "update", "acme", "--clear-klaviyo-api-key", "--clear-rate-limits", "--clear-retry"
        )
        a = cli.account("acme")
        assert a.secrets.klaviyo_api_key is None
        assert (a.rate_limit_overrides, a.retry_policy) == ({}, {})
        assert "contradicts" in cli.fails(
            "accounts", "update", "acme", "--clear-retry", "--retry", "max_attempts=2"
        )

    def test_state_pause_and_resume(self, cli: Cli) -> None:
        cli.ok("accounts", "add", "acme")
        cli.ok("accounts", "update", "acme", "--state", "paused", "--reason", "merchant asked")
        a = cli.account("acme")
        assert (a.state, a.state_reason) == (AccountState.paused, "merchant asked")
        cli.ok("accounts", "update", "acme", "--state", "connected")
        a = cli.account("acme")
        assert (a.state, a.state_reason) == (AccountState.connected, "")

    def test_new_credentials_reconnect_a_disconnected_account(self, cli: Cli) -> None:
        cli.ok("accounts", "add", "acme", "--klaviyo-api-key", KEY)
        cli.ok("accounts", "update", "acme", "--state", "disconnected", "--reason", "401 from Klaviyo")
        cli.ok("accounts", "update", "acme", "--klaviyo-api-key", KEY + "X")
        assert cli.account("acme").state == AccountState.connected

    def test_unknown_account_and_empty_update_fail(self, cli: Cli) -> None:
        assert "no account 'nope'" in cli.fails("accounts", "update", "nope", "--name", "x")
        cli.ok("accounts", "add", "acme")
        assert "nothing to change" in cli.fails("accounts", "update", "acme")
        assert "not both" in cli.fails(
            "accounts", "update", "acme", "--ingest-token", "a", "--new-ingest-token"
        )


class TestKlaviyoBaseUrl:
    """An account's own Klaviyo (``--klaviyo-base-url``): set, shown, changed, cleared, refused when invalid."""

    def test_add_show_update_clear_round_trip(self, cli: Cli) -> None:
        doc = cli.json("accounts", "add", "trial", "--klaviyo-base-url", "http://127.0.0.1:8089/")
        assert doc["klaviyo_base_url"] == "http://127.0.0.1:8089"  # stored without the trailing slash
        assert cli.account("trial").klaviyo_base_url == "http://127.0.0.1:8089"
        cli.ok("accounts", "add", "prod")
        assert cli.account("prod").klaviyo_base_url is None  # the global PASSBRIDGE_KLAVIYO_BASE_URL

        assert cli.json("accounts", "show", "trial")["klaviyo_base_url"] == "http://127.0.0.1:8089"
        shown = " ".join(cli.ok("accounts", "show", "trial").stdout.split())
        assert "klaviyo base url http://127.0.0.1:8089" in shown
        assert "klaviyo base url" not in cli.ok("accounts", "show", "prod").stdout
        listed = {r["account_id"]: r["klaviyo_base_url"] for r in cli.json("accounts", "list")}
        assert listed == {"trial": "http://127.0.0.1:8089", "prod": None}

        cli.ok("accounts", "update", "trial", "--klaviyo-base-url", "https://egress.example.com/klaviyo")
        assert cli.account("trial").klaviyo_base_url == "https://egress.example.com/klaviyo"
        cli.ok("accounts", "update", "trial", "--name", "Trial")  # other changes keep it
        assert cli.account("trial").klaviyo_base_url == "https://egress.example.com/klaviyo"
        assert "contradicts" in cli.fails(
            "accounts", "update", "trial", "--clear-klaviyo-base-url", "--klaviyo-base-url", "http://x"
        )
        cli.ok("accounts", "update", "trial", "--clear-klaviyo-base-url")
        assert cli.account("trial").klaviyo_base_url is None
        assert cli.json("accounts", "show", "trial")["klaviyo_base_url"] is None

    @pytest.mark.parametrize(
        ("url", "says"),
        [
            ("a.klaviyo.com", "must be an absolute http:// or https:// URL with a host"),
            ("ftp://a.klaviyo.com", "must be an absolute http:// or https:// URL with a host"),
            ("https://", "must be an absolute http:// or https:// URL with a host"),
            ("https://a.klaviyo.com?x=1", "must not have a query"),
            ("https://a.klaviyo.com/#top", "must not have a query (?...) or fragment"),
            ("https://a.klaviyo.com:99999", "has an invalid port"),
            ("https://a.klaviyo .com", "must be a URL with no blank or control character"),
            ("https://ops:hunter2secret@proxy.example.com", "must not contain a user name or password"),
        ],
    )
    def test_invalid_url_is_refused_naming_the_field(self, cli: Cli, url: str, says: str) -> None:
        error = cli.fails("accounts", "add", "trial", "--klaviyo-base-url", url)
        assert f"klaviyo_base_url: {says}" in error
        assert "hunter2" not in error  # a password in the URL is never echoed
        assert cli.redis.smembers(ACCOUNTS_INDEX) == set()
        cli.ok("accounts", "add", "prod")
        error = cli.fails("accounts", "update", "prod", "--klaviyo-base-url", url)
        assert f"klaviyo_base_url: {says}" in error
        assert "hunter2" not in error
        assert cli.account("prod").klaviyo_base_url is None

    def test_an_empty_url_says_how_to_clear(self, cli: Cli) -> None:
        cli.ok("accounts", "add", "trial", "--klaviyo-base-url", "http://127.0.0.1:8089")
        assert "--clear-klaviyo-base-url" in cli.fails(
            "accounts", "update", "trial", "--klaviyo-base-url", ""
        )
        assert cli.account("trial").klaviyo_base_url == "http://127.0.0.1:8089"


class TestRemove:
    def test_needs_yes_when_not_interactive(self, cli: Cli) -> None:
        cli.ok("accounts", "add", "acme")
        assert "--yes" in cli.fails("accounts", "remove", "acme")
        assert cli.redis.smembers(ACCOUNTS_INDEX) == {b"acme"}

    def test_remove_keeps_queue_unless_purged(self, cli: Cli) -> None:
        for a in ("acme", "bolt"):
            cli.ok("accounts", "add", a)
            enqueue(cli, a, [event(1), event(2)])
        doc = cli.json("accounts", "remove", "acme", "--yes")
        assert doc == {"account_id": "acme", "removed": True, "waiting": 2, "purged_keys": 0}
        assert cli.redis.smembers(ACCOUNTS_INDEX) == {b"bolt"}
        assert cli.redis.get(account_keys("acme").depth) == b"2"
        assert "no account 'acme'" in cli.fails("accounts", "remove", "acme", "--yes")

        out = cli.ok("accounts", "remove", "bolt", "--yes", "--purge").stdout
        assert "purged" in out
        assert list(cli.redis.scan_iter(match=account_keys("bolt").base + ":*")) == []
        assert cli.redis.zscore(ACTIVE_ACCOUNTS, "bolt") is None
        assert cli.redis.zscore(ACTIVE_ACCOUNTS, "acme") is not None  # the other account is untouched

    def test_purge_reaches_an_account_removed_earlier_without_it(self, cli: Cli) -> None:
        # A plain remove leaves the account's keys (queued events, dead letters, pass states, counters): a
        # later --purge must still delete them, else nothing ever could.
        for a in ("acme", "bolt"):
            cli.ok("accounts", "add", a)
            enqueue(cli, a, [event(1), event(2)])
        cli.redis.hset(account_keys("acme").state, "S1", b"{}")
        cli.ok("accounts", "remove", "acme", "--yes")
        assert cli.redis.smembers(REMOVED_ACCOUNTS) == {b"acme"}

        doc = cli.json("accounts", "remove", "acme", "--yes", "--purge")
        assert (doc["removed"], doc["waiting"]) == (False, 2)
        assert doc["purged_keys"] > 0
        assert list(cli.redis.scan_iter(match=account_keys("acme").base + ":*")) == []
        assert cli.redis.zscore(ACTIVE_ACCOUNTS, "acme") is None
        assert cli.redis.smembers(REMOVED_ACCOUNTS) == set()
        assert cli.redis.get(account_keys("bolt").depth) == b"2"  # the other account is untouched
        # An id that never was an account is refused, and not remembered as a removed account.
        assert "no account 'nope'" in cli.fails("accounts", "remove", "nope", "--yes")
        assert "no account 'nope'" in cli.fails("accounts", "remove", "nope", "--yes", "--purge")
        assert cli.redis.smembers(REMOVED_ACCOUNTS) == set()
