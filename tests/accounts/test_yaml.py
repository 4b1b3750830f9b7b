"""The declarative accounts.yaml: ``passbridge accounts apply`` and the producer applying it at start."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from redis.asyncio import Redis

from passbridge.accounts import Account, AccountStore, OAuthTokens
from passbridge.accounts_file import AccountsFileError, parse_accounts
from passbridge.crypto import load_cipher
from passbridge.keys import ACCOUNTS_INDEX, account_keys
from passbridge.settings import Settings
from producer.app import create_app
from tests.accounts.conftest import Cli
from tests.conftest import serve
from tests.factories import event, webhook_secret

YAML = """
accounts:
  acme:
    name: Acme Coffee
    ingest_token: ${ACME_INGEST_TOKEN}
    webhook_secrets: ["${ACME_WEBHOOK_SECRET}"]
    klaviyo_api_key: ${ACME_KLAVIYO_KEY}
    apple_pass_types: {pass.com.acme.loyalty: ptk_0x216}
    sync_pass_types: [ptk_0x216]
    pass_url_template: https://wallet.acme.com/p/{serial_number}
    rate_limits:
      create_event: {burst: 50}
    retry: {max_attempts: 4}
  bolt:
    name: Bolt Bikes
    ingest_token_sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
"""


@pytest.fixture
def env() -> dict[str, str]:
    return {
        "ACME_INGEST_TOKEN": "acme-ingest-token",
        "ACME_WEBHOOK_SECRET": webhook_secret(),
        "ACME_KLAVIYO_KEY": "pk_acme0123456789abcdef",
    }


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "accounts.yaml"
    path.write_text(text)
    return path


class TestApplyCommand:
    def test_creates_accounts_with_env_secrets_then_is_idempotent(
        self, cli: Cli, tmp_path: Path, env: dict[str, str]
    ) -> None:
        path = write(tmp_path, YAML)
        report = cli.json("accounts", "apply", str(path), env=env)
        assert (report["created"], report["updated"], report["unchanged"]) == (["acme", "bolt"], [], [])
        assert "account bolt has no Klaviyo credentials" in " ".join(report["warnings"])
        acme = cli.account("acme")
        assert acme.check_ingest_token("acme-ingest-token")
        assert [s.get_secret_value() for s in acme.secrets.webhook_secrets] == [env["ACME_WEBHOOK_SECRET"]]
        assert acme.secrets.klaviyo_api_key == SecretStr(env["ACME_KLAVIYO_KEY"])
        assert acme.sync_pass_types == ["ptk_0x216"]
        assert acme.rate_limit_overrides == {"create_event": {"burst": 50}}
        assert acme.retry_policy == {"max_attempts": 4}
        assert cli.account("bolt").check_ingest_token("test")  # sha256("test") in the file
        raw = cli.redis.hgetall(account_keys("acme").config)
        assert env["ACME_KLAVIYO_KEY"].encode() not in b"".join(raw.values())

        again = cli.json("accounts", "apply", str(path), env=env)
        assert (again["created"], again["updated"], again["unchanged"]) == ([], [], ["acme", "bolt"])

    def test_update_keeps_what_the_file_does_not_name(
        self, cli: Cli, tmp_path: Path, env: dict[str, str]
    ) -> None:
        path = write(tmp_path, YAML)
        cli.ok("accounts", "apply", str(path), env=env)
        # Tokens won through `accounts connect` live only in the registry; a restart must not lose them.
        cli.ok(
            "accounts",
            "update",
            "bolt",
            "--klaviyo-oauth-client-id",
            "cid",
            "--klaviyo-oauth-client-secret",
            "cs",
        )

        async def grant() -> None:
            redis = Redis.from_url(cli.env["REDIS_URL"])
            store = AccountStore(redis, load_cipher(cli.env["PASSBRIDGE_SECRET_KEY"], tmp_path))

            def add_tokens(a: Account | None) -> Account:
                assert a is not None
                oauth = OAuthTokens(
                    client_id="cid",
                    client_secret=SecretStr("cs"),
                    access_token=SecretStr("at"),
                    refresh_token=SecretStr("rt"),
                )
                return a.model_copy(update={"secrets": a.secrets.model_copy(update={"klaviyo_oauth": oauth})})

            await store.update("bolt", add_tokens)
            await redis.aclose()

        asyncio.run(grant())
        path.write_text(YAML.replace("Bolt Bikes", "Bolt"))
        report = cli.json("accounts", "apply", str(path), env=env)
        assert report["updated"] == ["bolt"]
        assert report["unchanged"] == ["acme"]
        bolt = cli.account("bolt")
        assert bolt.name == "Bolt"
        assert bolt.secrets.klaviyo_oauth is not None
        assert bolt.secrets.klaviyo_oauth.refresh_token == SecretStr("rt")

    def test_null_clears_a_field(self, cli: Cli, tmp_path: Path, env: dict[str, str]) -> None:
        cli.ok("accounts", "apply", str(write(tmp_path, YAML)), env=env)
        cli.ok(
            "accounts",
            "apply",
            str(write(tmp_path, "accounts:\n  acme: {klaviyo_api_key: null, sync_pass_types: null}\n")),
        )
        acme = cli.account("acme")
        assert acme.secrets.klaviyo_api_key is None
        assert acme.sync_pass_types == []
        assert acme.name == "Acme Coffee"

    def test_klaviyo_base_url_is_set_kept_and_cleared(
        self, cli: Cli, tmp_path: Path, env: dict[str, str]
    ) -> None:
        text = YAML.replace(
            "    name: Acme Coffee\n", "    name: Acme Coffee\n    klaviyo_base_url: ${ACME_KLAVIYO}/\n"
        )
        cli.ok(
            "accounts",
            "apply",
            str(write(tmp_path, text)),
            env={**env, "ACME_KLAVIYO": "http://127.0.0.1:8089"},
        )
        assert cli.account("acme").klaviyo_base_url == "http://127.0.0.1:8089"
        assert cli.account("bolt").klaviyo_base_url is None
        cli.ok("accounts", "apply", str(write(tmp_path, "accounts:\n  acme: {name: Acme}\n")))
        assert cli.account("acme").klaviyo_base_url == "http://127.0.0.1:8089"  # not named: kept
        cli.ok("accounts", "apply", str(write(tmp_path, "accounts:\n  acme: {klaviyo_base_url: null}\n")))
        assert cli.account("acme").klaviyo_base_url is None

    def test_missing_env_var_names_account_and_field_and_writes_nothing(
        self, cli: Cli, tmp_path: Path, env: dict[str, str]
    ) -> None:
        del env["ACME_KLAVIYO_KEY"]
        error = cli.fails("accounts", "apply", str(write(tmp_path, YAML)), env=env)
        assert "accounts.acme.klaviyo_api_key: environment variable ACME_KLAVIYO_KEY is not set" in error
        assert cli.redis.smembers(ACCOUNTS_INDEX) == set()

    def test_every_problem_of_the_file_is_named_in_one_run(
        self, cli: Cli, tmp_path: Path, env: dict[str, str]
    ) -> None:
        """Unset variables in two fields, and another account's bad fields: all in the one error, so the file
        is fixed in one round (the first problem alone was reported, one more per run)."""
        del env["ACME_KLAVIYO_KEY"], env["ACME_WEBHOOK_SECRET"]
        text = YAML + "  cyan: {klaviyo_key: x, retry: {max_attempts: 0}}\n  'bad id': {}\n"
        error = " ".join(cli.fails("accounts", "apply", str(write(tmp_path, text)), env=env).split())
        for says in (
            "accounts.acme.webhook_secrets[0]: environment variable ACME_WEBHOOK_SECRET is not set",
            "accounts.acme.klaviyo_api_key: environment variable ACME_KLAVIYO_KEY is not set",
            "accounts.cyan.retry.max_attempts: Input should be greater than or equal to 1",
            "accounts.cyan.klaviyo_key: Extra inputs are not permitted",
            "accounts.bad id: an account id is",
        ):
            assert says in error, (says, error)
        assert "bolt" not in error  # a valid account is not mentioned
        assert cli.redis.smembers(ACCOUNTS_INDEX) == set()

    @pytest.mark.parametrize(
        ("text", "says"),
        [
            (
                "accounts:\n  acme: {klaviyo_key: x}\n",
                "accounts.acme.klaviyo_key: Extra inputs are not permitted",
            ),
            (
                "accounts:\n  acme: {webhook_secrets: [nope]}\n",
                "accounts.acme.webhook_secrets: a webhook secret starts with whsec_",
            ),
            ("accounts:\n  acme: {retry: {max_attempts: 0}}\n", "accounts.acme.retry.max_attempts"),
            (
                "accounts:\n  acme: {klaviyo_base_url: 'a.klaviyo.com'}\n",
                "accounts.acme.klaviyo_base_url: must be an absolute http:// or https:// URL with a host",
            ),
            (
                "accounts:\n  acme: {klaviyo_base_url: 'https://u:pw@proxy.example.com'}\n",
                "accounts.acme.klaviyo_base_url: must not contain a user name or password",
            ),
            ("accounts:\n  'bad id': {}\n", "accounts.bad id: an account id is"),
            ("accounts:\n  acme: [1]\n", "accounts.acme: must be a mapping"),
            ("acounts: {}\n", "one key, `accounts`"),
            ("accounts: {acme: {name: [}\n", "not valid YAML"),
        ],
    )
    def test_invalid_file_is_refused_whole(self, cli: Cli, tmp_path: Path, text: str, says: str) -> None:
        # A valid account first: nothing of the file may be applied when any part of it is wrong.
        text = text.replace("accounts:\n", "accounts:\n  good: {name: Good}\n", 1)
        assert says in cli.fails("accounts", "apply", str(write(tmp_path, text)))
        assert cli.redis.smembers(ACCOUNTS_INDEX) == set()

    def test_a_yaml_syntax_error_names_line_and_column_but_never_quotes_the_line(
        self, cli: Cli, tmp_path: Path
    ) -> None:
        # A literal key is allowed in the file; PyYAML's own message quotes the offending line.
        text = "accounts:\n  acme:\n    klaviyo_api_key: pk_live_0123456789abcdef: oops\n"
        error = cli.fails("accounts", "apply", str(write(tmp_path, text)))
        assert "is not valid YAML: mapping values are not allowed here at line 3, column 46" in error
        assert "0123456789abcdef" not in error
        assert "oops" not in error
        # The producer checks the file before it starts serving: the same line, no traceback.
        error = cli.fails("producer", env={"PASSBRIDGE_ACCOUNTS_FILE": str(tmp_path / "accounts.yaml")})
        assert "is not valid YAML: mapping values are not allowed here at line 3, column 46" in error
        assert "0123456789abcdef" not in error

    @pytest.mark.parametrize(
        ("value", "says"),
        [
            ("*{}", "found undefined alias '…' at line 3"),
            ("!{} x", "could not determine a constructor for the tag '…' at line 3"),
            ("!a!{} x", "found undefined tag handle '…' at line 3"),
        ],
    )
    def test_a_name_yaml_quotes_is_never_shown(self, cli: Cli, tmp_path: Path, value: str, says: str) -> None:
        # A secret with no recognizable shape (an OAuth client secret) after a YAML sigil: PyYAML names it.
        secret = "Zq3xV9kLm2Tn8RwY4pBc"
        text = f"accounts:\n  acme:\n    klaviyo_oauth_client_secret: {value.format(secret)}\n"
        error = cli.fails("accounts", "apply", str(write(tmp_path, text)))
        assert says in error
        assert secret not in error

    def test_build_errors_also_stop_the_whole_file(self, cli: Cli, tmp_path: Path) -> None:
        text = "accounts:\n  good: {name: Good}\n  acme: {klaviyo_oauth_client_id: only-an-id}\n"
        assert (
            "accounts.acme: a new klaviyo_oauth_client_id needs its klaviyo_oauth_client_secret"
            in cli.fails("accounts", "apply", str(write(tmp_path, text)))
        )
        assert cli.redis.smembers(ACCOUNTS_INDEX) == set()

    def test_missing_file(self, cli: Cli, tmp_path: Path) -> None:
        assert "cannot read" in cli.fails("accounts", "apply", str(tmp_path / "nope.yaml"))

    def test_prune_removes_unlisted_accounts(self, cli: Cli, tmp_path: Path, env: dict[str, str]) -> None:
        cli.ok("accounts", "add", "old")
        report = cli.json("accounts", "apply", str(write(tmp_path, YAML)), "--prune", env=env)
        assert report["removed"] == ["old"]
        assert cli.redis.smembers(ACCOUNTS_INDEX) == {b"acme", b"bolt"}


def test_interpolation_happens_after_parsing() -> None:
    """A secret containing YAML syntax stays one string: values are substituted into the parsed tree."""
    specs = parse_accounts(
        {"accounts": {"acme": {"name": "${NAME}", "klaviyo_api_key": "${KEY}"}}},
        {"NAME": "a: b\n- c", "KEY": "pk_x${NOT_EXPANDED_AGAIN}"},
    )
    assert specs["acme"].name == "a: b\n- c"
    assert specs["acme"].klaviyo_api_key == SecretStr("pk_x${NOT_EXPANDED_AGAIN}")
    with pytest.raises(
        AccountsFileError, match=re.escape("accounts.acme.name: environment variable NAME is not set")
    ):
        parse_accounts({"accounts": {"acme": {"name": "${NAME}"}}}, {})


class TestProducerStart:
    async def test_producer_applies_the_file_at_start(
        self, settings: Settings, redis_url: str, redis: Redis, tmp_path: Path, env: dict[str, str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:  # fmt: skip
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        settings.accounts_file = write(tmp_path, YAML)
        server = await asyncio.to_thread(serve, create_app(settings, redis_url))
        try:
            async with httpx.AsyncClient(base_url=server.url) as http:
                r = await http.post(
                    "/v1/accounts/acme/events",
                    json=event(1),
                    headers={"Authorization": "Bearer acme-ingest-token"},
                )
                assert r.status_code == 202, r.text
                r = await http.post(
                    "/v1/accounts/acme/events",
                    json=event(2, pass_type="ptk_other"),
                    headers={"Authorization": "Bearer acme-ingest-token"},
                )
                assert r.json()["status"] == "skipped"
        finally:
            await asyncio.to_thread(server.stop)
        assert await redis.smembers(ACCOUNTS_INDEX) == {b"acme", b"bolt"}
        assert await redis.hget(account_keys("acme").stats, "skipped") == b"1"

    async def test_a_bad_file_stops_the_producer(
        self, settings: Settings, redis_url: str, tmp_path: Path
    ) -> None:
        settings.accounts_file = write(tmp_path, "accounts:\n  acme: {nonsense: 1}\n")
        app = create_app(settings, redis_url)
        with pytest.raises(
            AccountsFileError, match=re.escape("accounts.acme.nonsense: Extra inputs are not permitted")
        ):
            async with app.router.lifespan_context(app):
                pytest.fail("the producer started with an invalid accounts file")
