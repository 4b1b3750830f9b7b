"""The Klaviyo HTTP client: one pooled ``httpx.AsyncClient`` per worker process, many accounts.

Every call: credentials for the account (private key, or an OAuth token refreshed when needed), a slot from
the shared rate limiter, the ``revision`` header, JSON:API content types, explicit timeouts; the answer is
either the parsed body or a typed :mod:`worker.klaviyo.errors` exception. A 401 on an OAuth account is
refreshed and retried exactly once. A 429 pauses the endpoint for the account (every process's limiter honours
it); a short one (Retry-After within ``max_slot_wait_s``) is waited out and the request sent again, at most
``max_throttle_retries`` times, since Klaviyo did not process it; a longer one is raised as ThrottledError.

Open it with the worker (``async with KlaviyoClient(...)`` or ``aclose()`` on shutdown).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
import orjson
import structlog
from redis.asyncio import Redis

from passbridge import metrics
from passbridge.accounts import Account, AccountStore
from passbridge.settings import Settings
from worker.klaviyo.endpoints import OAUTH_TOKEN_PATH, Operation
from worker.klaviyo.errors import (
    Abandoned,
    AuthError,
    KlaviyoError,
    ThrottledError,
    TransientError,
    error_from_response,
)
from worker.klaviyo.oauth import OAuthManager
from worker.klaviyo.ratelimit import RateLimiter, new_slot

log = structlog.get_logger(__name__)

# httpcore imports anyio's asyncio backend (about 30 modules) on a process's first request, not with httpx:
# 30-70 ms that a worker's or an express lane's first Klaviyo call, usually a fresh event's, would wait for.
# A private module that a later anyio may move: then the first request pays for it again, nothing breaks.
with contextlib.suppress(ImportError):
    import anyio._backends._asyncio  # noqa: F401

#: Custom Objects went GA in this revision; older ones do not serve the endpoints the sync needs.
MIN_REVISION = "2026-07-15"
_REVISION = re.compile(r"^(\d{4}-\d{2}-\d{2})(\.[a-z0-9]+)?$")
JSONAPI = "application/vnd.api+json"


def check_revision(revision: str) -> str:
    """Return ``revision`` if it is a well-formed Klaviyo revision no older than :data:`MIN_REVISION`."""
    match = _REVISION.match(revision)
    if not match:
        raise ValueError(f"Klaviyo revision must look like YYYY-MM-DD[.pre], got {revision!r}")
    if match.group(1) < MIN_REVISION:
        raise ValueError(f"Klaviyo revision {revision} is older than {MIN_REVISION} (Custom Objects GA)")
    return revision


@dataclass(frozen=True, slots=True)
class ClientOptions:
    """Tunables of the client; the defaults suit a worker process talking to a.klaviyo.com."""

    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    write_timeout_s: float = 30.0
    pool_timeout_s: float = 10.0
    max_connections: int = 100
    max_keepalive_connections: int = 100
    #: Below the shortest idle timeout servers commonly use (uvicorn: 5 s): a pooled connection the server
    #: has just closed fails the next request with a ReadError instead of being replaced quietly.
    keepalive_expiry_s: float = 4.0
    #: Longest a call waits for a rate-limit slot before raising ThrottledError instead.
    max_slot_wait_s: float = 5.0
    #: Refresh an OAuth token this long before it expires.
    oauth_refresh_skew_s: float = 60.0
    oauth_lock_ttl_s: float = 30.0
    #: Overall deadline of one OAuth token request; below ``oauth_lock_ttl_s``, so the refresh lock cannot
    #: expire while its holder still waits for Klaviyo (a second refresh would use the rotated-away token).
    oauth_token_timeout_s: float = 15.0
    rate_safety: float = 0.02
    rate_burst_safety: float = 0.5
    rate_pad_s: float = 0.02
    #: The share of an endpoint's steady budget a backlog may spend at once before it is paced
    #: (:meth:`RateLimiter.pace`); ``None``: backlogs are held to the rate-limit windows only.
    rate_pace_burst: float | None = 0.0
    #: A 429 whose Retry-After is at most ``max_slot_wait_s`` is waited out and sent again (the request was
    #: not processed) this many times before ThrottledError reaches the caller's retry policy.
    max_throttle_retries: int = 2
    user_agent: str = "passbridge/0.1 (+https://github.com/passbridge)"


@dataclass(frozen=True, slots=True)
class Reply:
    """A 2xx answer: its status and parsed JSON body (``None`` for 202/204 with no body)."""

    status: int
    body: Any


class KlaviyoClient:
    """Calls Klaviyo for any account; safe to share between all coroutines of a process."""

    def __init__(
        self,
        redis: Redis,
        accounts: AccountStore,
        *,
        base_url: str,
        revision: str,
        rate_scale: float = 1.0,
        options: ClientOptions | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        event_hooks: Mapping[str, list[Callable[..., Any]]] | None = None,
    ) -> None:
        """``transport`` and ``event_hooks`` go to httpx as they are (tests record requests with a hook)."""
        self.options = opts = options or ClientOptions()
        self.base_url = base_url.rstrip("/")
        self.revision = check_revision(revision)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(
                connect=opts.connect_timeout_s,
                read=opts.read_timeout_s,
                write=opts.write_timeout_s,
                pool=opts.pool_timeout_s,
            ),
            limits=httpx.Limits(
                max_connections=opts.max_connections,
                max_keepalive_connections=opts.max_keepalive_connections,
                keepalive_expiry=opts.keepalive_expiry_s,
            ),
            headers={"user-agent": opts.user_agent, "accept-encoding": "gzip, deflate"},
            transport=transport,
            event_hooks=event_hooks,
            follow_redirects=False,
        )
        self.limiter = RateLimiter(
            redis,
            scale=rate_scale,
            safety=opts.rate_safety,
            pad_s=opts.rate_pad_s,
            burst_safety=opts.rate_burst_safety,
            pace_burst=opts.rate_pace_burst,
        )
        self.oauth = OAuthManager(
            redis,
            accounts,
            self._http,
            self.base_url + OAUTH_TOKEN_PATH,
            refresh_skew_s=opts.oauth_refresh_skew_s,
            lock_ttl_s=opts.oauth_lock_ttl_s,
            token_timeout_s=opts.oauth_token_timeout_s,
        )
        #: Calls by (operation, status or error kind), for metrics.
        self.calls: Counter[tuple[str, str]] = Counter()

    @classmethod
    def from_settings(
        cls, settings: Settings, redis: Redis, accounts: AccountStore, **kwargs: Any
    ) -> KlaviyoClient:
        """A client configured from ``PASSBRIDGE_KLAVIYO_*`` settings (base URL, revision, rate scale, backlog
        pacing)."""
        pace = settings.klaviyo_backlog_pace_burst if settings.klaviyo_backlog_pacing else None
        kwargs.setdefault("options", ClientOptions(rate_pace_burst=pace))
        return cls(
            redis,
            accounts,
            base_url=settings.klaviyo_base_url,
            revision=settings.klaviyo_revision,
            rate_scale=settings.klaviyo_rate_scale,
            **kwargs,
        )

    def __repr__(self) -> str:
        return f"KlaviyoClient(base_url={self.base_url!r}, revision={self.revision!r})"

    async def __aenter__(self) -> KlaviyoClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self._http.aclose()

    async def call(
        self,
        account: Account,
        op: Operation,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        path_params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        acquired: str | None = None,
        alive: Callable[[], bool] | None = None,
    ) -> Reply:
        """Send one request for ``account`` and return the 2xx :class:`Reply`, or raise a KlaviyoError.

        ``content`` is an already serialized JSON body (instead of ``body``: bulk requests are assembled from
        items serialized once). ``acquired``: the name of the rate-limit slot the caller already took for the
        first attempt (``RateLimiter.try_acquire(slot=...)``); retries take their own. A 429 gives the
        attempt's slot back (Klaviyo did not count the request). ``alive``: checked right before each attempt
        leaves (after any wait for a slot); once it says False the request is not sent and :class:`Abandoned`
        is raised, so a write whose lease was lost meanwhile never lands after the new holder's.
        """
        url = op.url_path(**(path_params or {}))
        if account.klaviyo_base_url is not None:
            # httpx sends an absolute URL as it is (base_url only prefixes relative ones) and pools
            # connections per origin, so the accounts on the global Klaviyo pay nothing but this check.
            url = account.klaviyo_base_url + url
        if content is None and body is not None:
            content = orjson.dumps(body)
        retried_auth = False
        throttled = 0
        while True:
            authorization, oauth_token = await self._authorization(account, op)
            if acquired:
                slot, acquired = acquired, None
            else:
                slot = new_slot()
                await self.limiter.acquire(
                    account.account_id, op.name, op.tier, max_wait_s=self.options.max_slot_wait_s, slot=slot
                )
            if alive is not None and not alive():
                # The slot waited for goes unused: give it back, as for a 429.
                await self.limiter.refund(account.account_id, op.name, slot)
                raise Abandoned(op.name)
            response = await self._send(account.account_id, op, url, authorization, content, params)
            status = response.status_code
            metrics.klaviyo_response(account.account_id, op.name, status)
            if 200 <= status < 300:
                self.calls[(op.name, str(status))] += 1
                return Reply(status, _json_or_none(response.content))
            self.calls[(op.name, str(status))] += 1
            if status == 401 and oauth_token is not None and not retried_auth:
                # Klaviyo says "authentication_failed" for expired and revoked tokens alike: refresh once
                # (or pick up another process's refresh), then try again; a second 401 is an AuthError.
                retried_auth = True
                log.info("klaviyo_401_refreshing", account=account.account_id, endpoint=op.name)
                await self.oauth.refresh(account, stale=oauth_token)
                continue
            error = error_from_response(op.name, status, response.content, response.headers)
            if isinstance(error, ThrottledError):
                await self.limiter.refund(account.account_id, op.name, slot)
                await self.limiter.pause(account.account_id, op.name, error.retry_after_s)
                if (
                    throttled < self.options.max_throttle_retries
                    and error.retry_after_s <= self.options.max_slot_wait_s
                ):
                    # Klaviyo did not process the request; the limiter now holds us until Retry-After.
                    throttled += 1
                    continue
            log.info(
                "klaviyo_call_failed",
                account=account.account_id,
                endpoint=op.name,
                status=status,
                error=error.kind,
                code=getattr(error, "code", None),
                klaviyo=account.klaviyo_base_url or self.base_url,
            )
            raise error

    async def _send(
        self,
        account_id: str,
        op: Operation,
        url: str,
        authorization: str,
        content: bytes | None,
        params: Mapping[str, str] | None,
    ) -> httpx.Response:
        headers = {"authorization": authorization, "revision": self.revision, "accept": JSONAPI}
        if content is not None:
            headers["content-type"] = JSONAPI
        started = time.perf_counter()
        try:
            response = await self._http.request(
                op.method, url, content=content, params=params, headers=headers
            )
        except httpx.TimeoutException as exc:
            self.calls[(op.name, "timeout")] += 1
            # Counted like an answer: during an outage of timeouts or resets the requests counter must not
            # fall flat (it would read as idle, and the error alert would compute 0/0).
            metrics.klaviyo_response(account_id, op.name, "timeout")
            raise TransientError(op.name, f"timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            self.calls[(op.name, "network")] += 1
            metrics.klaviyo_response(account_id, op.name, "network")
            raise TransientError(op.name, f"network error ({type(exc).__name__})") from None
        log.debug(
            "klaviyo_call",
            endpoint=op.name,
            status=response.status_code,
            ms=round((time.perf_counter() - started) * 1000, 1),
        )
        return response

    async def _authorization(self, account: Account, op: Operation) -> tuple[str, str | None]:
        """The Authorization header for ``account`` and, for OAuth, the access token it carries.

        An OAuth grant wins over a private key when an account has both (the app connection is newer).
        """
        secrets = account.secrets
        if secrets.klaviyo_oauth is not None:
            token = await self.oauth.access_token(account)
            return f"Bearer {token}", token
        if secrets.klaviyo_api_key is not None:
            return f"Klaviyo-API-Key {secrets.klaviyo_api_key.get_secret_value()}", None
        raise AuthError(
            401,
            op.name,
            code="no_credentials",
            detail=f"account {account.account_id} has no Klaviyo API key or OAuth grant",
        )


def _json_or_none(content: bytes) -> Any:
    if not content:
        return None
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return None


__all__ = ["ClientOptions", "KlaviyoClient", "KlaviyoError", "Reply", "check_revision"]
