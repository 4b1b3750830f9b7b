"""A live producer over real HTTP on loopback, with one account registered."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from cryptography.fernet import MultiFernet
from redis.asyncio import Redis

from passbridge.accounts import Account, AccountStore
from passbridge.crypto import load_cipher
from passbridge.settings import Settings
from producer.app import create_app
from tests.conftest import LiveServer, serve
from tests.factories import make_account


@pytest.fixture
def producer(settings: Settings, redis_url: str) -> Iterator[LiveServer]:
    server = serve(create_app(settings, redis_url))
    yield server
    server.stop()


@dataclass
class Env:
    http: httpx.AsyncClient
    account: Account
    token: str
    secret: str
    redis: Redis
    settings: Settings
    producer: LiveServer

    def forget_account(self, account_id: str) -> None:
        """Drop the producer's cached copy of an account, so a registry change applies at once."""
        self.producer.server.config.app.state.ctx.forget(account_id)

    async def update_account(self, account_id: str = "acme", **fields: Any) -> Account:
        """Change registry fields of an account; the producer sees the change at once."""
        store = AccountStore(self.redis, cipher(self.settings))
        account = (await store.get(account_id)).model_copy(update=fields)
        await store.put(account)
        self.forget_account(account_id)
        return account


def cipher(settings: Settings) -> MultiFernet:
    """The test's secrets-at-rest cipher."""
    return load_cipher(
        settings.secret_key.get_secret_value() if settings.secret_key else None, settings.state_dir
    )


@pytest.fixture
async def env(producer: LiveServer, redis: Redis, settings: Settings) -> AsyncIterator[Env]:
    account = await make_account(redis, cipher(settings))
    async with httpx.AsyncClient(base_url=producer.url, timeout=10) as http:
        yield Env(
            http,
            account,
            "tok-acme",
            account.secrets.webhook_secrets[0].get_secret_value(),
            redis,
            settings,
            producer,
        )
