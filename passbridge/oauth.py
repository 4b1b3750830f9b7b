"""Connecting an account to Klaviyo with OAuth (authorization code + PKCE S256).

Refreshing the tokens later is the workers' job (``worker.klaviyo.oauth.OAuthManager``).

The flow: :func:`start_connect` makes a PKCE pair and a ``state`` of the form ``<account_id>.<nonce>``,
keeps the verifier, redirect URI and client (secret encrypted) under the account's pending key for
:data:`PENDING_TTL_S`, and returns Klaviyo's authorize URL. Klaviyo sends the merchant back to the producer's
``/oauth/klaviyo/callback`` with ``code`` and ``state``; :func:`complete_connect` takes the pending entry
(once: ``GETDEL``), exchanges the code at ``<klaviyo_base_url>/oauth/token`` (the account's own base URL when it
has one, as it was when the connect started: the code is only good at the server that issued it) and stores
the tokens in the account's encrypted secrets. A state is bound to its account twice over: by its prefix, and
because the nonce exists only under that account's key.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx
import orjson
import structlog
from cryptography.fernet import InvalidToken, MultiFernet
from pydantic import SecretStr
from redis.asyncio import Redis

from passbridge.accounts import ACCOUNT_ID, Account, AccountState, AccountStore, OAuthTokens
from passbridge.crypto import SecretKeyError, decrypt, encrypt
from passbridge.keys import account_keys
from passbridge.settings import Settings

log = structlog.get_logger(__name__)

#: How long a started connect waits for the merchant to approve.
PENDING_TTL_S = 600
#: The scopes the Klaviyo endpoints passbridge calls require (each endpoint's ``x-klaviyo-scopes``):
#: accounts (check), profile import + bulk import (which also needs lists), events, Custom Objects.
DEFAULT_SCOPES = (
    "accounts:read",
    "events:write",
    "profiles:read",
    "profiles:write",
    "lists:read",
    "lists:write",
    "custom-objects:read",
    "custom-objects:write",
)


class OAuthError(Exception):
    """The OAuth flow failed; ``str()`` says why in words an operator can act on (never a secret)."""

    def __init__(self, message: str, *, status: int = 400, code: str = "oauth-error") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(frozen=True)
class ConnectStart:
    """What ``accounts connect`` prints."""

    account_id: str
    authorize_url: str
    redirect_uri: str
    state: str
    scopes: tuple[str, ...]
    expires_in_s: int


@dataclass(frozen=True)
class Pending:
    """A started connect, as kept in Redis (encrypted)."""

    account_id: str
    client_id: str
    client_secret: SecretStr
    verifier: SecretStr
    redirect_uri: str
    scopes: tuple[str, ...]
    #: The account's own Klaviyo base URL when the connect started (``None``: the global one).
    klaviyo_base_url: str | None = None


def pkce_pair() -> tuple[str, str]:
    """A PKCE code verifier (64 URL-safe characters) and its S256 challenge (RFC 7636)."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def authorize_url(
    endpoint: str, *, client_id: str, redirect_uri: str, scopes: tuple[str, ...], state: str, challenge: str
) -> str:
    """Klaviyo's authorize URL for one connect."""
    query = urlencode(
        {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "scope": " ".join(scopes),
            "state": state,
            "code_challenge_method": "S256",
            "code_challenge": challenge,
        }
    )
    return f"{endpoint}?{query}"


#: What :func:`start_connect` puts in a state: an account id (:data:`passbridge.accounts.ACCOUNT_ID`) and a
#: URL-safe nonce. Both are checked before the state names a Redis key, so a forged one can only ever reach a
#: pending connect's key.
_STATE_NONCE = re.compile(r"[A-Za-z0-9_\-]{1,64}")


def parse_state(state: str) -> tuple[str, str]:
    """``(account_id, nonce)`` of a state made by :func:`start_connect`; raises :class:`OAuthError`."""
    account_id, dot, nonce = state.rpartition(".")
    if not dot or not ACCOUNT_ID.fullmatch(account_id) or not _STATE_NONCE.fullmatch(nonce):
        raise OAuthError("the state parameter was not issued by passbridge", code="bad-state")
    return account_id, nonce


def token_url(settings: Settings, klaviyo_base_url: str | None = None) -> str:
    """Klaviyo's token endpoint (always on the API host: Klaviyo refuses token traffic on www): on
    ``klaviyo_base_url`` (an account's own) when given, else on ``PASSBRIDGE_KLAVIYO_BASE_URL``."""
    return (klaviyo_base_url or settings.klaviyo_base_url).rstrip("/") + "/oauth/token"


async def start_connect(
    redis: Redis,
    cipher: MultiFernet,
    settings: Settings,
    account_id: str,
    *,
    client_id: str,
    client_secret: SecretStr,
    scopes: tuple[str, ...] = DEFAULT_SCOPES,
    redirect_uri: str | None = None,
    klaviyo_base_url: str | None = None,
) -> ConnectStart:
    """Begin connecting ``account_id``: remember the PKCE verifier and client, return the authorize URL.

    ``klaviyo_base_url``: the account's own Klaviyo (``Account.klaviyo_base_url``); the authorize URL is
    derived from it and the callback exchanges the code there.
    """
    verifier, challenge = pkce_pair()
    nonce = secrets.token_urlsafe(24)
    state = f"{account_id}.{nonce}"
    redirect = redirect_uri or settings.oauth_redirect_uri()
    doc = {
        "account_id": account_id,
        "client_id": client_id,
        "client_secret": client_secret.get_secret_value(),
        "verifier": verifier,
        "redirect_uri": redirect,
        "scopes": list(scopes),
        "klaviyo_base_url": klaviyo_base_url,
    }
    await redis.set(
        account_keys(account_id).oauth_pending(nonce), encrypt(cipher, orjson.dumps(doc)), ex=PENDING_TTL_S
    )
    url = authorize_url(
        settings.oauth_authorize_url(klaviyo_base_url),
        client_id=client_id,
        redirect_uri=redirect,
        scopes=scopes,
        state=state,
        challenge=challenge,
    )
    log.info(
        "oauth connect started",
        account_id=account_id,
        client_id=client_id,
        scopes=list(scopes),
        klaviyo_base_url=klaviyo_base_url,
    )
    return ConnectStart(account_id, url, redirect, state, scopes, PENDING_TTL_S)


async def take_pending(redis: Redis, cipher: MultiFernet, state: str) -> Pending:
    """The pending connect of ``state``, removed so that a state (and its code) works once."""
    account_id, nonce = parse_state(state)
    sealed = await redis.getdel(account_keys(account_id).oauth_pending(nonce))
    if sealed is None:
        raise OAuthError(
            f"this connect link is unknown or expired (links live {PENDING_TTL_S // 60} minutes and work "
            f"once); run `passbridge accounts connect {account_id}` again",
            code="bad-state",
        )
    try:
        doc = orjson.loads(decrypt(cipher, sealed.decode()))
        return Pending(
            account_id=doc["account_id"],
            client_id=doc["client_id"],
            client_secret=SecretStr(doc["client_secret"]),
            verifier=SecretStr(doc["verifier"]),
            redirect_uri=doc["redirect_uri"],
            scopes=tuple(doc["scopes"]),
            # Absent from connects started before accounts had a base URL of their own: the global one.
            klaviyo_base_url=doc.get("klaviyo_base_url"),
        )
    except (SecretKeyError, ValueError, KeyError, TypeError):
        # Sealed with another key (the CLI that ran `connect` and this producer disagree on
        # PASSBRIDGE_SECRET_KEY), or not a pending connect at all: the caller's link is no good either way.
        raise OAuthError(
            f"this connect link cannot be read with this server's secret key; check that `passbridge accounts "
            f"connect` and the producer share PASSBRIDGE_SECRET_KEY, then run `passbridge accounts connect "
            f"{account_id}` again",
            code="bad-state",
        ) from None


def _token_error(response: httpx.Response) -> OAuthError:
    """Klaviyo's token-endpoint refusal in words (OAuth ``error`` or Klaviyo ``errors[]`` shape)."""
    try:
        body: Any = response.json()
    except ValueError:
        body = {}
    code, detail = "", ""
    if isinstance(body, dict):
        code = str(body.get("error") or "")
        detail = str(body.get("error_description") or "")
        errors = body.get("errors")
        if not code and isinstance(errors, list) and errors and isinstance(errors[0], dict):
            code = str(errors[0].get("code") or "")
            detail = str(errors[0].get("detail") or "")
    what = f"{code}: {detail}" if detail else code or f"HTTP {response.status_code}"
    status = 502 if response.status_code >= 500 else 400
    return OAuthError(
        f"Klaviyo's token endpoint refused the request ({what})", status=status, code=code or "token"
    )


async def exchange_code(http: httpx.AsyncClient, url: str, pending: Pending, code: str) -> OAuthTokens:
    """Trade an authorization code (and the PKCE verifier) for the grant's tokens."""
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": pending.redirect_uri,
        "code_verifier": pending.verifier.get_secret_value(),
    }
    started = time.time()
    try:
        response = await http.post(
            url, data=form, auth=httpx.BasicAuth(pending.client_id, pending.client_secret.get_secret_value())
        )
    except httpx.HTTPError as exc:
        raise OAuthError(
            f"cannot reach Klaviyo's token endpoint {url}: {type(exc).__name__}",
            status=502,
            code="unreachable",
        ) from None
    if response.status_code != 200:
        raise _token_error(response)
    try:
        body = response.json()
        access = str(body["access_token"])
    except (ValueError, KeyError, TypeError):
        raise OAuthError("Klaviyo's token endpoint answered without an access_token", status=502) from None
    expires_in = body.get("expires_in")
    refresh = body.get("refresh_token")
    scope = body.get("scope")
    return OAuthTokens(
        client_id=pending.client_id,
        client_secret=pending.client_secret,
        access_token=SecretStr(access),
        refresh_token=SecretStr(str(refresh)) if refresh else None,
        expires_at=started + float(expires_in) if isinstance(expires_in, int | float) else None,
        # Klaviyo may leave out `scope`; then the grant holds what was asked for.
        scopes=str(scope).split() if scope else list(pending.scopes),
    )


async def complete_connect(
    redis: Redis, store: AccountStore, settings: Settings, http: httpx.AsyncClient, *, state: str, code: str
) -> Account:
    """Finish a connect: exchange ``code`` and store the tokens in the account ``state`` names."""
    pending = await take_pending(redis, store.cipher, state)
    oauth = await exchange_code(http, token_url(settings, pending.klaviyo_base_url), pending, code)

    def connect(current: Account | None) -> Account | None:
        if current is None:
            return None
        secrets = current.secrets.model_copy(update={"klaviyo_oauth": oauth})
        return current.model_copy(
            update={"secrets": secrets, "state": AccountState.connected, "state_reason": ""}
        )

    _, account = await store.update(pending.account_id, connect)
    if account is None:
        raise OAuthError(
            f"account {pending.account_id!r} was removed while connecting", status=404, code="unknown-account"
        )
    log.info(
        "oauth connected",
        account_id=account.account_id,
        client_id=pending.client_id,
        scopes=list(oauth.scopes),
    )
    return account


async def rotate_pending(redis: Redis, cipher: MultiFernet, account_ids: list[str]) -> int:
    """Re-encrypt the pending connects with the newest key (part of ``accounts rotate-key``)."""
    rotated = 0
    for account_id in account_ids:
        async for key in redis.scan_iter(match=account_keys(account_id).oauth_pending_pattern, count=100):
            sealed = await redis.get(key)
            ttl = await redis.pttl(key)
            if sealed is None or ttl <= 0:
                continue
            try:
                fresh = cipher.rotate(sealed)
            except InvalidToken:
                raise SecretKeyError(
                    "a pending OAuth connect does not decrypt with any configured key"
                ) from None
            # XX: never resurrect an entry that was taken (or expired) meanwhile.
            if await redis.set(key, fresh, px=ttl, xx=True):
                rotated += 1
    return rotated
