"""Secrets at rest and in output: the raw Redis value holds none, key rotation, masks, log redaction."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import structlog
from cryptography.fernet import Fernet
from pydantic import SecretStr
from redis.asyncio import Redis

from passbridge.accounts import (
    Account,
    AccountNotFound,
    AccountSecrets,
    AccountState,
    AccountStore,
    OAuthTokens,
    hash_token,
)
from passbridge.crypto import SecretKeyError, load_cipher
from passbridge.keys import account_keys
from passbridge.logging import redact_text
from passbridge.oauth import start_connect
from passbridge.settings import Settings
from tests.accounts.conftest import Cli, configure_uncached
from tests.factories import webhook_secret

SECRETS = {
    "webhook": webhook_secret(),
    "apple": "apple-token-secret-4f1c9",
    "key": "pk_0123456789abcdef0123",
    "client_secret": "oauth-client-secret-77a1",
    "access": "oauth-access-token-e0b2",
    "refresh": "oauth-refresh-token-91cd",
}


def full_account(account_id: str = "acme") -> Account:
    return Account(
        account_id=account_id,
        ingest_token_sha256=hash_token("ingest-token-3b7f"),
        secrets=AccountSecrets(
            webhook_secrets=[SecretStr(SECRETS["webhook"])],
            apple_token_secret=SecretStr(SECRETS["apple"]),
            klaviyo_api_key=SecretStr(SECRETS["key"]),
            klaviyo_oauth=OAuthTokens(
                client_id="client-1",
                client_secret=SecretStr(SECRETS["client_secret"]),
                access_token=SecretStr(SECRETS["access"]),
                refresh_token=SecretStr(SECRETS["refresh"]),
            ),
        ),
    )


async def raw_dump(redis: Redis) -> bytes:
    """Every key and value in the database, as bytes."""
    out = b""
    async for key in redis.scan_iter():
        kind = (await redis.type(key)).decode()
        out += key
        if kind == "hash":
            out += b"".join(k + v for k, v in (await redis.hgetall(key)).items())
        elif kind == "string":
            out += await redis.get(key) or b""
        elif kind == "set":
            out += b"".join(await redis.smembers(key))
    return out


class TestAtRest:
    async def test_raw_redis_holds_no_secret(self, redis: Redis, secret_key: str, settings: Settings) -> None:
        store = AccountStore(redis, load_cipher(secret_key, settings.state_dir))
        await store.put(full_account())
        await start_connect(
            redis,
            store.cipher,
            settings,
            "acme",
            client_id="client-2",
            client_secret=SecretStr("pending-secret-5e"),
        )
        raw = await raw_dump(redis)
        assert b"acme" in raw  # the dump does see the account
        for value in [*SECRETS.values(), "ingest-token-3b7f", "pending-secret-5e"]:
            assert value.encode() not in raw, value
        assert (await store.get("acme")) == full_account()

    def test_rotate_key_then_old_key_removed_still_decrypts(self, cli: Cli) -> None:
        old = cli.env["PASSBRIDGE_SECRET_KEY"]
        new = Fernet.generate_key().decode()
        cli.ok("accounts", "add", "acme", "--klaviyo-api-key", SECRETS["key"])
        cli.ok("accounts", "add", "bolt")
        cli.ok("accounts", "connect", "acme", "--client-id", "c", "--client-secret", "s")
        before = {a: cli.account(a) for a in ("acme", "bolt")}

        doc = cli.json("accounts", "rotate-key", env={"PASSBRIDGE_SECRET_KEY": f"{new},{old}"})
        assert (doc["accounts"], doc["pending_connects"]) == (2, 1)

        # Only the new key now: everything still decrypts, to the same values.
        assert {a: cli.account(a, key=new) for a in ("acme", "bolt")} == before
        shown = cli.json("accounts", "show", "acme", env={"PASSBRIDGE_SECRET_KEY": new})
        assert shown["secrets"]["klaviyo_api_key"] == "pk_…0123"
        pending = next(cli.redis.scan_iter(match=account_keys("acme").oauth_pending_pattern))
        assert load_cipher(new, cli.account_state_dir()).decrypt(cli.redis.get(pending))
        # And the old key alone no longer opens them: the error says so plainly.
        error = cli.fails("accounts", "show", "acme", env={"PASSBRIDGE_SECRET_KEY": old})
        assert "do not decrypt with any configured PASSBRIDGE_SECRET_KEY" in error

    def test_rotate_key_reports_an_undecryptable_account(self, cli: Cli) -> None:
        cli.ok("accounts", "add", "acme")
        error = cli.fails(
            "accounts", "rotate-key", env={"PASSBRIDGE_SECRET_KEY": Fernet.generate_key().decode()}
        )
        assert "account 'acme' do not decrypt with any configured key" in error

    def test_bad_secret_key_is_a_clear_error(self, cli: Cli) -> None:
        assert "Fernet keys" in cli.fails("accounts", "list", env={"PASSBRIDGE_SECRET_KEY": "not-a-key"})

    def test_generated_key_when_none_is_configured(self, cli: Cli) -> None:
        env = {"PASSBRIDGE_SECRET_KEY": ""}
        cli.ok("accounts", "add", "acme", "--klaviyo-api-key", SECRETS["key"], env=env)
        key_file = cli.account_state_dir() / "secret.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert SECRETS["key"].encode() not in b"".join(
            cli.redis.hgetall(account_keys("acme").config).values()
        )
        assert cli.json("accounts", "show", "acme", env=env)["secrets"]["klaviyo_api_key"] == "pk_…0123"


class TestNeverPrinted:
    def test_repr_and_str_mask_every_secret(self) -> None:
        account = full_account()
        for text in (repr(account), str(account), repr(account.secrets), str(account.model_dump())):
            for value in SECRETS.values():
                assert value not in text

    def test_redact_text_finds_secret_shaped_values(self) -> None:
        text = (
            "headers Authorization: Bearer abc.def-123 / Klaviyo-API-Key pk_live9876543210 "
            f"secret {SECRETS['webhook']} token pbi_tL47aUcZ8mI3BsPxMMmVBl"
        )
        redacted = redact_text(text)
        for value in ("abc.def-123", "pk_live9876543210", SECRETS["webhook"], "pbi_tL47aUcZ8mI3BsPxMMmVBl"):
            assert value not in redacted
        assert "Bearer ***" in redacted
        assert redact_text("plain words stay") == "plain words stay"

    def test_logs_redact_secret_keys_and_values(self, monkeypatch: pytest.MonkeyPatch) -> None:
        stream = io.StringIO()
        monkeypatch.setattr(sys, "stderr", stream)
        configure_uncached("info", "json")
        try:
            log = structlog.get_logger("test")
            log.info(
                "calling Klaviyo",
                api_key=SECRETS["key"],
                creds={"client_secret": SECRETS["client_secret"], "client_id": "client-1"},
                detail=f"failed with header Klaviyo-API-Key {SECRETS['key']}",
                secrets=[SECRETS["webhook"]],
            )
        finally:
            structlog.reset_defaults()
        line = json.loads(stream.getvalue().splitlines()[-1])
        assert line["api_key"] == "***"
        assert line["creds"] == {"client_secret": "***", "client_id": "client-1"}
        assert line["detail"] == "failed with header Klaviyo-API-Key ***"
        for value in SECRETS.values():
            assert value not in stream.getvalue()


class TestConcurrentWriters:
    async def test_set_state_never_puts_back_secrets_replaced_meanwhile(
        self, redis: Redis, secret_key: str, settings: Settings
    ) -> None:
        """A pause (set_state) racing a write of new secrets: whichever lands last, the new key survives.

        (The other writer replaces the whole entry, so the pause itself may be overwritten: that order is
        legitimate. Putting back the old key never is.)"""
        store = AccountStore(redis, load_cipher(secret_key, settings.state_dir))
        for round_ in range(20):
            await store.put(full_account())
            edited = full_account().model_copy(
                update={
                    "secrets": full_account().secrets.model_copy(
                        update={"klaviyo_api_key": SecretStr(f"pk_edited{round_:04d}abcdef")}
                    )
                }
            )
            # Started together: the pause's read goes out first, the edit lands before the pause would write.
            await asyncio.gather(
                store.set_state("acme", AccountState.paused, "probe failed"), store.put(edited)
            )
            after = await store.get("acme")
            assert after.secrets.klaviyo_api_key is not None
            assert after.secrets.klaviyo_api_key.get_secret_value() == f"pk_edited{round_:04d}abcdef", round_

    async def test_set_state_of_a_missing_account(
        self, redis: Redis, secret_key: str, settings: Settings
    ) -> None:
        store = AccountStore(redis, load_cipher(secret_key, settings.state_dir))
        with pytest.raises(AccountNotFound):
            await store.set_state("ghost", AccountState.paused)
        assert not await redis.exists(account_keys("ghost").config)


class TestGeneratedKeyFile:
    def test_processes_starting_together_share_one_private_key(self, tmp_path: Path) -> None:
        """Producer and workers started at once on a fresh state dir: one key file, 0600, used by all."""
        state = tmp_path / "state"
        start_at = time.time() + 1.0  # every process gets past its imports, then all create at once
        code = (
            "import sys, time\n"
            "from passbridge.crypto import load_cipher\n"
            f"time.sleep(max(0.0, {start_at} - time.time()))\n"
            f"sys.stdout.write(load_cipher(None, __import__('pathlib').Path({str(state)!r}))"
            ".encrypt(b'hello').decode())\n"
        )
        procs = [
            subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
            for _ in range(8)
        ]
        tokens = [p.communicate(timeout=30)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs)
        key_file = state / "secret.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        only = load_cipher(key_file.read_text().strip(), state)
        assert [only.decrypt(t.encode()) for t in tokens] == [b"hello"] * 8

    def test_a_key_still_being_written_is_waited_for(self, tmp_path: Path) -> None:
        key = Fernet.generate_key()
        (tmp_path / "secret.key").touch(mode=0o600)  # created by another process, not written yet
        writer = threading.Timer(0.2, (tmp_path / "secret.key").write_bytes, [key])
        writer.start()
        try:
            cipher = load_cipher(None, tmp_path)
        finally:
            writer.join()
        assert Fernet(key).decrypt(cipher.encrypt(b"x").decode().encode()) == b"x"

    def test_a_key_file_that_stays_empty_is_a_clear_error(self, tmp_path: Path) -> None:
        (tmp_path / "secret.key").touch(mode=0o600)
        with pytest.raises(SecretKeyError, match=r"secret\.key is empty"):
            load_cipher(None, tmp_path)
