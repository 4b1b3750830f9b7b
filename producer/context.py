"""Long-lived objects of one producer process, opened and closed by the app's lifespan."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from passbridge.accounts import Account, AccountNotFound, AccountStore
from passbridge.crypto import SecretKeyError
from passbridge.keys import ACCOUNTS_INDEX
from passbridge.outage import DataMarker
from passbridge.settings import Settings
from producer.problems import Problem, unavailable
from producer.publisher import Publisher

#: Accounts are read from Redis at most this often per process; registry changes apply within it.
ACCOUNT_CACHE_S = 2.0
#: An account whose secrets do not decrypt is logged at most this often (every request for it fails alike).
KEY_MISMATCH_LOG_S = 60.0

log = structlog.get_logger(__name__)


@dataclass
class ProducerContext:
    """Redis client, account registry, publisher and settings shared by every route."""

    settings: Settings
    redis: Redis
    accounts: AccountStore
    publisher: Publisher
    _cache: dict[str, tuple[float, Account]] = field(default_factory=dict)
    _loading: dict[str, asyncio.Future[Account]] = field(default_factory=dict)
    _mismatch_logged: dict[str, float] = field(default_factory=dict)
    #: Notices a Redis that came back empty (checked at start and when an account is unknown).
    data_marker: DataMarker = field(default_factory=lambda: DataMarker("producer"))
    #: Redis lost its data and no account was registered since: unknown accounts answer 503, not 404.
    data_lost: bool = False
    #: Set when the server was told to stop (producer/draining.py): long requests end early.
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def account(self, account_id: str) -> Account:
        """The account (cached briefly); a 404 problem when it does not exist, 503 when Redis is unreachable."""
        hit = self._cache.get(account_id)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        # One registry read per account at a time: when the entry expires under load, the requests that
        # arrive meanwhile share the read (and its decryption) instead of each repeating it.
        loading = self._loading.get(account_id)
        if loading is None:
            loading = self._loading[account_id] = asyncio.ensure_future(self._load(account_id))
            loading.add_done_callback(lambda _: self._loading.pop(account_id, None))
        # shield: a request that goes away does not cancel the read the others wait for.
        return await asyncio.shield(loading)

    async def _load(self, account_id: str) -> Account:
        now = time.monotonic()
        try:
            account = await self.accounts.get(account_id)
        except AccountNotFound:
            account = await self._unknown(account_id)
        except (RedisError, OSError):
            raise unavailable(
                "the account registry is unreachable; nothing was written", self.settings.retry_after_s
            ) from None
        except SecretKeyError:
            # A deployment fault, not the caller's: the account was encrypted with a key this process lacks
            # (per-container generated keys, a rotation before every process had the new key). 503, so
            # senders retry once the operator has fixed PASSBRIDGE_SECRET_KEY.
            if now - self._mismatch_logged.get(account_id, -KEY_MISMATCH_LOG_S) >= KEY_MISMATCH_LOG_S:
                self._mismatch_logged[account_id] = now
                log.error(
                    "account secrets do not decrypt with this process's PASSBRIDGE_SECRET_KEY; give every "
                    "process the same key list (newest first) and restart it",
                    account_id=account_id,
                )
            raise unavailable(
                "the account's stored secrets do not decrypt with the configured secret key; nothing was written",
                self.settings.retry_after_s,
                kind="secret-key-mismatch",
            ) from None
        self._cache[account_id] = (now + ACCOUNT_CACHE_S, account)
        return account

    async def _unknown(self, account_id: str) -> Account:
        """An account the registry lacks: 404, unless Redis lost its data (the cold path only).

        A sender takes a 404 as final and drops its event. After Redis came back empty, every account is
        unknown until registered again: the accounts file (``PASSBRIDGE_ACCOUNTS_FILE``) is applied again at
        once, and without one the answer is a 503 (retry later) until any account is registered.
        """
        from passbridge.accounts_file import apply_accounts_file

        try:
            if await self.data_marker.check(self.redis):
                self.data_lost = True
                if self.settings.accounts_file is not None:
                    try:
                        await apply_accounts_file(self.redis, self.settings)
                    except Exception:
                        log.exception(
                            "accounts file not applied again", path=str(self.settings.accounts_file)
                        )
            if self.data_lost:
                try:
                    return await self.accounts.get(account_id)
                except AccountNotFound:
                    if not await self.redis.scard(ACCOUNTS_INDEX):
                        raise unavailable(
                            "Redis lost its data and no account is registered again yet; nothing was written",
                            self.settings.retry_after_s,
                            kind="redis-data-lost",
                        ) from None
                self.data_lost = False
        except (RedisError, OSError):
            raise unavailable(
                "the account registry is unreachable; nothing was written", self.settings.retry_after_s
            ) from None
        raise Problem(404, "unknown-account", "Unknown account", f"no account {account_id!r}")

    def forget(self, account_id: str) -> None:
        """Drop a cached account (after a registry change in this process)."""
        self._cache.pop(account_id, None)
