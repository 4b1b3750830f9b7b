"""The account registry: one Redis hash per merchant account, secrets encrypted at rest.

Layout: ``pb:a:<id>:cfg`` with field ``config`` (JSON, no secrets) and field ``secrets`` (Fernet token of
the JSON of :class:`AccountSecrets`); ``pb:accounts`` is the set of account ids. The raw Redis value never
holds a secret in clear text, and ``repr``/``str`` of every secret is masked (:func:`masked` is the view an
operator may see).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets as pysecrets
import time
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson
from cryptography.fernet import InvalidToken, MultiFernet
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from redis.asyncio import Redis
from redis.exceptions import WatchError

# Defined in a light module of its own so that the CLI can offer it as an option; re-exported here.
from passbridge.account_state import AccountState as AccountState
from passbridge.crypto import SecretKeyError, decrypt, encrypt
from passbridge.keys import ACCOUNTS_INDEX, REMOVED_ACCOUNTS, account_keys

DEFAULT_PASS_URL_TEMPLATE = "https://passninja.com/p/{serial_number}"


class OAuthTokens(BaseModel):
    """An OAuth client and the tokens of its grant."""

    client_id: str
    client_secret: SecretStr
    access_token: SecretStr | None = None
    refresh_token: SecretStr | None = None
    expires_at: float | None = None
    scopes: list[str] = Field(default_factory=list)


class AccountSecrets(BaseModel):
    """Everything secret about an account; stored only encrypted."""

    webhook_secrets: list[SecretStr] = Field(default_factory=list)
    apple_token_secret: SecretStr | None = None
    klaviyo_api_key: SecretStr | None = None
    klaviyo_oauth: OAuthTokens | None = None


#: What an account id may be (use with ``fullmatch``): it appears in Redis keys and URLs.
ACCOUNT_ID = re.compile(r"[A-Za-z0-9_.\-]{1,64}")

#: Visible ASCII only: a blank or control character in a URL is a paste gone wrong, never a Klaviyo host.
_URL_CHARS = re.compile(r"[\x21-\x7e]+")


def check_klaviyo_base_url(value: str) -> str:
    """An account's Klaviyo base URL as stored: absolute http(s) with a host, no query, fragment or userinfo,
    no trailing slash. Raises ``ValueError`` saying what is wrong; the message never repeats the value (it
    could hold a password someone put in it)."""
    if not _URL_CHARS.fullmatch(value):
        raise ValueError("must be a URL with no blank or control character, e.g. https://a.klaviyo.com")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            "must be an absolute http:// or https:// URL with a host, e.g. https://a.klaviyo.com"
        )
    if "@" in parts.netloc:
        # The account's config is stored and shown in clear: a credential belongs in its encrypted secrets.
        raise ValueError("must not contain a user name or password (the URL is stored and shown unencrypted)")
    if "?" in value or "#" in value:
        raise ValueError("must not have a query (?...) or fragment (#...): request paths are appended to it")
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when it is read
    except ValueError:
        raise ValueError("has an invalid port") from None
    return value.rstrip("/")


class Account(BaseModel):
    """A merchant account: its ingest credentials, sources' settings and Klaviyo connection."""

    model_config = ConfigDict(extra="forbid")

    account_id: str = Field(pattern=f"^{ACCOUNT_ID.pattern}$")
    name: str = ""
    ingest_token_sha256: str = ""
    pass_url_template: str = DEFAULT_PASS_URL_TEMPLATE
    #: Apple passTypeIdentifier → platform-neutral pass type (template id).
    apple_pass_types: dict[str, str] = Field(default_factory=dict)
    google_issuer_id: str | None = None
    google_keys_file: str | None = None
    #: Google classId → pass type.
    google_classes: dict[str, str] = Field(default_factory=dict)
    #: How a Google objectId becomes a serial: "suffix" (after "<issuerId>.") or "object_id" (as is).
    google_serial_from: str = "suffix"
    #: Pass types to sync; empty means all.
    sync_pass_types: list[str] = Field(default_factory=list)
    state: AccountState = AccountState.connected
    state_reason: str = ""
    rate_limit_overrides: dict[str, Any] = Field(default_factory=dict)
    retry_policy: dict[str, Any] = Field(default_factory=dict)
    #: Where this account's Klaviyo calls go (API, OAuth token endpoint) instead of
    #: ``PASSBRIDGE_KLAVIYO_BASE_URL``: the sandbox for a trial merchant, an egress proxy. ``None``: the global
    #: setting. Not a secret (see :func:`check_klaviyo_base_url`).
    klaviyo_base_url: str | None = None
    secrets: AccountSecrets = Field(default_factory=AccountSecrets)

    @field_validator("klaviyo_base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        return None if value is None else check_klaviyo_base_url(value)

    def check_ingest_token(self, token: str) -> bool:
        """Constant-time check of a bearer ingest token against the stored hash."""
        if not self.ingest_token_sha256:
            return False
        return hmac.compare_digest(hash_token(token), self.ingest_token_sha256)

    def syncs(self, pass_type: str) -> bool:
        """Whether events of ``pass_type`` go to Klaviyo (others are acknowledged and counted as skipped)."""
        return not self.sync_pass_types or pass_type in self.sync_pass_types

    def klaviyo_auth(self) -> Literal["oauth", "api_key"] | None:
        """Which Klaviyo credential the account uses: an OAuth grant (preferred once it holds tokens), a
        private API key, or none yet."""
        oauth = self.secrets.klaviyo_oauth
        if oauth is not None and oauth.refresh_token is not None:
            return "oauth"
        if self.secrets.klaviyo_api_key is not None:
            return "api_key"
        return None


def hash_token(token: str) -> str:
    """SHA-256 of an ingest token: only the hash is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(prefix: str) -> str:
    """A fresh random credential such as an ingest token (``pbi_...``) or webhook secret (``whsec_...``)."""
    return f"{prefix}{pysecrets.token_urlsafe(32)}"


def new_webhook_secret() -> str:
    """A fresh Standard Webhooks signing secret: ``whsec_`` + base64 of 32 random bytes."""
    return "whsec_" + base64.b64encode(pysecrets.token_bytes(32)).decode()


def _tail(value: SecretStr, prefix: str = "") -> str:
    """A secret reduced to a recognizable prefix and its last four characters."""
    raw = value.get_secret_value()
    head = prefix if raw.startswith(prefix) else ""
    return f"{head}…{raw[-4:]}" if len(raw) >= 12 else f"{head}…"


def masked(account: Account, now: float | None = None) -> dict[str, Any]:
    """The account as an operator may see it: every secret replaced by a mask (a hint of its tail at most)."""
    now = time.time() if now is None else now
    doc = account.model_dump(mode="json", exclude={"secrets"})
    sec = account.secrets
    oauth = sec.klaviyo_oauth
    doc["secrets"] = {
        "webhook_secrets": [_tail(s, "whsec_") for s in sec.webhook_secrets],
        "apple_token_secret": "set" if sec.apple_token_secret else None,
        "klaviyo_api_key": _tail(sec.klaviyo_api_key, "pk_") if sec.klaviyo_api_key else None,
        "klaviyo_oauth": {
            "client_id": oauth.client_id,
            "client_secret": "set",
            "access_token": "set" if oauth.access_token else None,
            "refresh_token": "set" if oauth.refresh_token else None,
            "expires_at": oauth.expires_at,
            "expires_in_s": round(oauth.expires_at - now) if oauth.expires_at else None,
            "scopes": oauth.scopes,
        }
        if oauth
        else None,
    }
    doc["klaviyo_auth"] = account.klaviyo_auth()
    doc["ingest_token_sha256"] = doc["ingest_token_sha256"][:8] + "…" if doc["ingest_token_sha256"] else ""
    return doc


def _unwrap(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, BaseModel):
        return {k: _unwrap(v) for k, v in value}
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    return value


class AccountNotFound(KeyError):
    """No account with that id."""


class AccountStore:
    """Read and write accounts in Redis."""

    def __init__(self, redis: Redis, cipher: MultiFernet) -> None:
        self.redis = redis
        self.cipher = cipher

    def _fields(self, account: Account) -> dict[str, bytes | str]:
        config = account.model_dump(mode="json", exclude={"secrets"})
        sealed = encrypt(self.cipher, orjson.dumps(_unwrap(account.secrets)))
        return {"config": orjson.dumps(config), "secrets": sealed}

    def _load(self, account_id: str, raw: list[bytes | None]) -> Account:
        if raw[0] is None:
            raise AccountNotFound(account_id)
        data = orjson.loads(raw[0])
        try:
            data["secrets"] = orjson.loads(decrypt(self.cipher, raw[1].decode())) if raw[1] else {}
        except SecretKeyError:
            raise SecretKeyError(
                f"the secrets of account {account_id!r} do not decrypt with any configured "
                "PASSBRIDGE_SECRET_KEY (was a key removed before `passbridge accounts rotate-key`?)"
            ) from None
        return Account.model_validate(data)

    async def put(self, account: Account) -> None:
        """Create or replace an account."""
        key = account_keys(account.account_id).config
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=self._fields(account))
            pipe.sadd(ACCOUNTS_INDEX, account.account_id)
            await pipe.execute()

    async def get(self, account_id: str) -> Account:
        """The account, secrets decrypted; raises :class:`AccountNotFound`."""
        raw = await self.redis.hmget(account_keys(account_id).config, ["config", "secrets"])
        return self._load(account_id, raw)

    async def find(self, account_id: str) -> Account | None:
        """The account, or ``None`` when it does not exist."""
        try:
            return await self.get(account_id)
        except AccountNotFound:
            return None

    async def update(
        self, account_id: str, change: Callable[[Account | None], Account | None]
    ) -> tuple[Account | None, Account | None]:
        """Read-modify-write one account atomically (optimistic: WATCH, retried when another writer won).

        ``change`` gets the current account (``None`` when absent) and returns the new one, or ``None`` to
        leave it as it is. Returns ``(before, after)``. Used wherever two writers may race on one account —
        the OAuth callback storing tokens while ``accounts.yaml`` is applied or an operator edits it — so
        neither silently undoes the other.
        """
        key = account_keys(account_id).config
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    raw = await pipe.hmget(key, ["config", "secrets"])
                    before = None if raw[0] is None else self._load(account_id, raw)
                    after = change(before)
                    if after is None or after == before:
                        await pipe.unwatch()
                        return before, before
                    if after.account_id != account_id:
                        raise ValueError("an update cannot change the account id")
                    pipe.multi()
                    pipe.hset(key, mapping=self._fields(after))
                    pipe.sadd(ACCOUNTS_INDEX, account_id)
                    await pipe.execute()
                    return before, after
                except WatchError:
                    continue

    async def rotate_key(self) -> int:
        """Re-encrypt every account's secrets with the newest key (the first of ``PASSBRIDGE_SECRET_KEY``).

        After it, older keys can be dropped from the configuration. Returns how many accounts were
        re-encrypted; raises :class:`SecretKeyError` naming an account no configured key can decrypt.
        """
        rotated = 0
        for account_id in await self.list_ids():
            key = account_keys(account_id).config
            async with self.redis.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        await pipe.watch(key)
                        sealed = await pipe.hget(key, "secrets")
                        if sealed is None:
                            await pipe.unwatch()
                            break
                        try:
                            fresh = self.cipher.rotate(sealed).decode()
                        except InvalidToken:
                            raise SecretKeyError(
                                f"the secrets of account {account_id!r} do not decrypt with any configured key"
                            ) from None
                        pipe.multi()
                        pipe.hset(key, "secrets", fresh)
                        await pipe.execute()
                        rotated += 1
                        break
                    except WatchError:
                        continue
        return rotated

    async def list_ids(self) -> list[str]:
        """Every account id, sorted."""
        return sorted(m.decode() for m in await self.redis.smembers(ACCOUNTS_INDEX))

    async def remove(self, account_id: str) -> bool:
        """Delete the registry entry (queued events and dead letters stay until drained or purged; the
        operator tools keep showing the account meanwhile, see ``REMOVED_ACCOUNTS``)."""
        key = account_keys(account_id).config
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    # Only an account that exists is marked removed: the set would otherwise keep every id
                    # ever mistyped into `accounts remove`, for good.
                    await pipe.watch(key)
                    existed = bool(await pipe.exists(key))
                    pipe.multi()
                    pipe.delete(key)
                    pipe.srem(ACCOUNTS_INDEX, account_id)
                    if existed:
                        pipe.sadd(REMOVED_ACCOUNTS, account_id)
                    await pipe.execute()
                    return existed
                except WatchError:
                    continue

    async def set_state(self, account_id: str, state: AccountState, reason: str = "") -> None:
        """Pause, resume or mark an account disconnected; raises :class:`AccountNotFound`.

        Through :meth:`update`: a plain read-then-write could put back secrets another writer replaced in
        between (a fresh OAuth grant, an edited API key, a key rotation's re-encryption).
        """

        def change(current: Account | None) -> Account:
            if current is None:
                raise AccountNotFound(account_id)
            return current.model_copy(update={"state": state, "state_reason": reason})

        await self.update(account_id, change)
