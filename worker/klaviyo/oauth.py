"""OAuth access tokens for accounts connected through the Klaviyo app: cached per process, refreshed once.

An access token lives about an hour. Each process caches the freshest token it has seen per account. A token
is refreshed shortly before it expires or when Klaviyo answers 401 ``authentication_failed``, and then:

1. inside the process, one coroutine per account refreshes while the others wait for its result;
2. across processes, a Redis lock (``AccountKeys.oauth_lock``) lets one process call the token endpoint; the
   others, once they get the lock, re-read the registry and find the new token already there;
3. the new tokens are written to the account registry (``AccountStore.put``), so every process — and every
   later start — uses them;
4. a refused refresh token (``invalid_grant``: revoked or expired) or refused client credentials mark the
   account ``disconnected`` with the reason, and every waiting process gives up with :class:`AuthError`
   instead of trying again: an operator has to reconnect the app — unless the registry by then holds a
   refresh token other than the refused one: another process refreshed (and Klaviyo rotated the token) in
   the meantime, and its tokens are used.

The token request has an overall deadline (``token_timeout_s``) below the lock's TTL, so the lock cannot
expire while its holder still waits for Klaviyo and let a second process refresh with the same token.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import NoReturn

import httpx
import orjson
import structlog
from pydantic import SecretStr
from redis.asyncio import Redis
from redis.exceptions import LockError

from passbridge.accounts import Account, AccountState, AccountStore, OAuthTokens
from passbridge.keys import account_keys
from worker.klaviyo.endpoints import OAUTH_TOKEN_PATH
from worker.klaviyo.errors import AuthError, ThrottledError, TransientError, parse_retry_after

log = structlog.get_logger(__name__)

TOKEN_ENDPOINT = "oauth_token"  # noqa: S105 - an endpoint name, not a secret
#: OAuth error codes (RFC 6749 §5.2) that mean no refresh will ever work without an operator.
FATAL_GRANT_ERRORS = frozenset({"invalid_grant", "invalid_client", "unauthorized_client"})


@dataclass(frozen=True, slots=True)
class _Token:
    value: str
    expires_at: float | None

    def expiring(self, skew_s: float, now: float) -> bool:
        return self.expires_at is not None and self.expires_at - now <= skew_s


class OAuthManager:
    """Hands out a valid access token per account and refreshes it at most once at a time."""

    def __init__(
        self,
        redis: Redis,
        accounts: AccountStore,
        http: httpx.AsyncClient,
        token_url: str,
        *,
        refresh_skew_s: float = 60.0,
        lock_ttl_s: float = 30.0,
        token_timeout_s: float = 15.0,
    ) -> None:
        if not 0 < token_timeout_s < lock_ttl_s:
            raise ValueError(
                "the OAuth token request timeout must be positive and below the refresh lock's TTL"
            )
        self.redis = redis
        self.accounts = accounts
        self.http = http
        self.token_url = token_url
        self.refresh_skew_s = refresh_skew_s
        self.lock_ttl_s = lock_ttl_s
        self.token_timeout_s = token_timeout_s
        self._cache: dict[str, _Token] = {}
        self._local: dict[str, asyncio.Lock] = {}
        #: Refreshes this process performed (calls to the token endpoint), for tests and metrics.
        self.refreshes = 0

    def __repr__(self) -> str:
        return f"OAuthManager(token_url={self.token_url!r}, accounts_cached={len(self._cache)})"

    def token_url_for(self, account: Account) -> str:
        """The token endpoint of ``account``'s Klaviyo: on its own base URL when it has one (a refresh token
        is only known to the server that issued it), else ``token_url``."""
        if account.klaviyo_base_url is None:
            return self.token_url
        return account.klaviyo_base_url + OAUTH_TOKEN_PATH

    def _remember(self, account_id: str, oauth: OAuthTokens) -> _Token | None:
        """Keep whichever token is fresher: the cached one or the one in ``oauth`` (a possibly stale copy)."""
        cached = self._cache.get(account_id)
        if oauth.access_token is None:
            return cached
        seen = _Token(oauth.access_token.get_secret_value(), oauth.expires_at)
        if cached is None or (seen.expires_at or 0) > (cached.expires_at or 0):
            self._cache[account_id] = seen
            return seen
        return cached

    async def access_token(self, account: Account) -> str:
        """A token for ``account`` that is not about to expire, refreshing first if needed."""
        oauth = _oauth(account)
        token = self._remember(account.account_id, oauth)
        if token is None or token.expiring(self.refresh_skew_s, time.time()):
            return await self.refresh(account, stale=token.value if token else None)
        return token.value

    async def refresh(self, account: Account, *, stale: str | None) -> str:
        """A token other than ``stale`` (the one Klaviyo refused or that is expiring), refreshing if nobody has.

        Raises :class:`AuthError` (the account is or becomes ``disconnected``), :class:`TransientError` or
        :class:`ThrottledError` (the token endpoint failed; try later).
        """
        account_id = account.account_id
        local = self._local.setdefault(account_id, asyncio.Lock())
        async with local:
            cached = self._cache.get(account_id)
            if (
                cached is not None
                and cached.value != stale
                and not cached.expiring(self.refresh_skew_s, time.time())
            ):
                return cached.value  # another coroutine of this process refreshed while we waited
            lock = self.redis.lock(
                account_keys(account_id).oauth_lock,
                timeout=self.lock_ttl_s,
                blocking_timeout=self.lock_ttl_s + 5,
                sleep=0.05,
            )
            try:
                await lock.acquire()
            except LockError:
                raise TransientError(
                    TOKEN_ENDPOINT, "timed out waiting for another process's OAuth refresh"
                ) from None
            try:
                return await self._refresh_locked(account_id, stale)
            finally:
                try:
                    await lock.release()
                except LockError:
                    log.warning("oauth_lock_expired_during_refresh", account=account_id)

    async def _refresh_locked(self, account_id: str, stale: str | None) -> str:
        fresh = await self.accounts.get(account_id)
        if fresh.state is AccountState.disconnected:
            raise AuthError(
                401, TOKEN_ENDPOINT, code="disconnected", detail=fresh.state_reason or "account disconnected"
            )
        oauth = _oauth(fresh)
        current = self._remember(account_id, oauth)
        if (
            current is not None
            and current.value != stale
            and not current.expiring(self.refresh_skew_s, time.time())
        ):
            log.debug("oauth_token_refreshed_elsewhere", account=account_id)
            return current.value  # another process refreshed while we waited for the lock
        if oauth.refresh_token is None:
            await self._disconnect(
                account_id, "the OAuth grant has no refresh token; reconnect the Klaviyo app"
            )
        try:
            new = await self._grant(account_id, oauth, self.token_url_for(fresh))
        except _Refused as refused:
            theirs = await self._refreshed_meanwhile(account_id, oauth)
            if theirs is not None:
                return theirs
            await self._disconnect(account_id, refused.reason)

        # A WATCHed write: a concurrent operator edit of other fields is not undone, and the tokens go in only
        # while the stored grant is still the one refreshed. A merchant who reconnected meanwhile (the callback
        # stores a new grant) keeps the new grant; its token is used instead.
        def store(latest: Account | None) -> Account | None:
            held = latest.secrets.klaviyo_oauth if latest is not None else None
            if (
                latest is None
                or held is None
                or held.client_id != oauth.client_id
                or _secret(held.refresh_token) != _secret(oauth.refresh_token)
            ):
                return None
            return latest.model_copy(
                update={
                    "secrets": latest.secrets.model_copy(
                        update={
                            "klaviyo_oauth": held.model_copy(
                                update={
                                    "access_token": new.access_token,
                                    "refresh_token": new.refresh_token or held.refresh_token,
                                    "expires_at": new.expires_at,
                                    "scopes": new.scopes or held.scopes,
                                }
                            )
                        }
                    )
                }
            )

        before, after = await self.accounts.update(account_id, store)
        if after is before:  # not ours to store: the grant changed while the token endpoint answered
            held = before.secrets.klaviyo_oauth if before is not None else None
            if before is None or held is None or held.access_token is None:
                raise AuthError(
                    401, TOKEN_ENDPOINT, code="disconnected", detail="the OAuth grant was removed"
                )
            log.info("oauth_grant_replaced_during_refresh", account=account_id)
            return self._use(account_id, held)
        log.info("oauth_token_refreshed", account=account_id, expires_at=new.expires_at)
        return self._use(account_id, new)

    async def _refreshed_meanwhile(self, account_id: str, used: OAuthTokens) -> str | None:
        """After Klaviyo refused the refresh token in ``used``: the access token another process stored since
        with a different refresh token (it refreshed first and Klaviyo rotated the token), else ``None``."""
        latest = await self.accounts.get(account_id)
        oauth = latest.secrets.klaviyo_oauth
        if latest.state is AccountState.disconnected or oauth is None or oauth.access_token is None:
            return None
        if _secret(oauth.refresh_token) == _secret(used.refresh_token):
            return None  # the refused token is still the stored one: the grant is really gone
        log.info("oauth_token_refreshed_elsewhere_after_refusal", account=account_id)
        return self._use(account_id, oauth)

    def _use(self, account_id: str, oauth: OAuthTokens) -> str:
        """Make ``oauth``'s access token this process's current one for the account (unlike
        :meth:`_remember`, whatever the cached token's expiry: the cached one belongs to a refreshed or
        replaced grant) and return it."""
        assert oauth.access_token is not None
        token = _Token(oauth.access_token.get_secret_value(), oauth.expires_at)
        self._cache[account_id] = token
        return token.value

    async def _grant(self, account_id: str, oauth: OAuthTokens, token_url: str) -> OAuthTokens:
        """``POST /oauth/token`` with ``grant_type=refresh_token`` and the client's Basic credentials.

        Raises :class:`_Refused` when Klaviyo refuses the grant or the client for good.
        """
        assert oauth.refresh_token is not None
        self.refreshes += 1
        started = time.time()
        try:
            # One deadline for the whole exchange (connect, send, every read), below the lock's TTL.
            async with asyncio.timeout(self.token_timeout_s):
                response = await self.http.post(
                    token_url,
                    data={
                        "grant_type": "refresh_token",
                        "refresh_token": oauth.refresh_token.get_secret_value(),
                    },
                    auth=httpx.BasicAuth(oauth.client_id, oauth.client_secret.get_secret_value()),
                    headers={"accept": "application/json"},
                )
        except TimeoutError:
            raise TransientError(
                TOKEN_ENDPOINT, f"token endpoint did not answer within {self.token_timeout_s:g} s"
            ) from None
        except httpx.TransportError as exc:
            raise TransientError(
                TOKEN_ENDPOINT, f"token endpoint unreachable: {type(exc).__name__}"
            ) from None
        if response.status_code == 429:
            raise ThrottledError(parse_retry_after(response.headers.get("retry-after")), TOKEN_ENDPOINT)
        if response.status_code >= 500:
            raise TransientError(
                TOKEN_ENDPOINT, f"token endpoint answered {response.status_code}", status=response.status_code
            )
        doc = _json(response.content)
        if response.status_code != 200 or not isinstance(doc.get("access_token"), str):
            error = str(doc.get("error") or "")
            detail = str(doc.get("error_description") or "")[:200]
            if error in FATAL_GRANT_ERRORS or response.status_code == 401:
                raise _Refused(
                    f"Klaviyo refused the OAuth refresh ({error or response.status_code}"
                    f"{': ' + detail if detail else ''}); reconnect the Klaviyo app"
                )
            raise AuthError(
                response.status_code, TOKEN_ENDPOINT, code=error, detail=detail or "token refresh failed"
            )
        expires_in = doc.get("expires_in")
        scope = doc.get("scope")
        refresh = doc.get("refresh_token")
        return OAuthTokens(
            client_id=oauth.client_id,
            client_secret=oauth.client_secret,
            access_token=SecretStr(str(doc["access_token"])),
            refresh_token=SecretStr(refresh) if isinstance(refresh, str) else None,
            expires_at=started + float(expires_in) if isinstance(expires_in, int | float) else None,
            scopes=scope.split() if isinstance(scope, str) else [],
        )

    async def _disconnect(self, account_id: str, reason: str) -> NoReturn:
        """Mark the account disconnected (operators see the reason) and stop with :class:`AuthError`."""
        await self.accounts.set_state(account_id, AccountState.disconnected, reason)
        self._cache.pop(account_id, None)
        log.warning("klaviyo_account_disconnected", account=account_id, reason=reason)
        raise AuthError(401, TOKEN_ENDPOINT, code="disconnected", detail=reason)


class _Refused(Exception):
    """The token endpoint refused the refresh token or the client credentials for good (``reason`` holds no
    secret)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def _oauth(account: Account) -> OAuthTokens:
    oauth = account.secrets.klaviyo_oauth
    if oauth is None:
        raise AuthError(
            401,
            TOKEN_ENDPOINT,
            code="no_credentials",
            detail=f"account {account.account_id} has no OAuth grant",
        )
    return oauth


def _json(body: bytes) -> dict[str, object]:
    try:
        doc = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}
