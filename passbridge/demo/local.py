"""The account ``passbridge up`` creates so the stack can be used right away."""

from __future__ import annotations

from redis.asyncio import Redis

from passbridge.accounts import (
    Account,
    AccountNotFound,
    AccountSecrets,
    AccountStore,
    hash_token,
    new_token,
    new_webhook_secret,
)
from passbridge.crypto import cipher_from_settings
from passbridge.demo.stack import Stack
from passbridge.settings import Settings


async def ensure_local_account(
    stack: Stack, account_id: str, klaviyo_key: str | None
) -> tuple[str, str] | None:
    """Create ``account_id`` (with the sandbox's key) and run its Klaviyo set-up; returns its new ingest token
    and webhook secret, or ``None`` when it already existed (its credentials were shown when it was made; an
    account with the sandbox's key is set up again in this start's sandbox)."""
    from worker.klaviyo.client import KlaviyoClient
    from worker.setup import provision

    settings = Settings(
        _env_file=None,
        klaviyo_base_url=stack.klaviyo_url,
        state_dir=stack.env["PASSBRIDGE_STATE_DIR"],
        secret_key=stack.env.get("PASSBRIDGE_SECRET_KEY"),
    )
    redis = Redis.from_url(stack.redis_url)
    try:
        store = AccountStore(redis, cipher_from_settings(settings))
        try:
            existing = await store.get(account_id)
        except AccountNotFound:
            existing = None
        if existing is not None:
            key = existing.secrets.klaviyo_api_key
            if klaviyo_key and key is not None and key.get_secret_value() == klaviyo_key:
                # The sandbox keeps everything in memory: this start's has none of the set-up whose ids an
                # earlier start stored, and the account's first event would pause it ("data source no longer
                # exists"). Set it up again (idempotent; it stores the new ids).
                async with KlaviyoClient.from_settings(settings, redis, store) as client:
                    await provision(client, redis, existing)
            return None
        token, secret = new_token("pbi_"), new_webhook_secret()
        account = Account(
            account_id=account_id,
            name=account_id.title(),
            ingest_token_sha256=hash_token(token),
            secrets=AccountSecrets.model_validate(
                {
                    "webhook_secrets": [secret],
                    "apple_token_secret": new_token(""),
                    "klaviyo_api_key": klaviyo_key,
                }
            ),
        )
        await store.put(account)
        if klaviyo_key:
            async with KlaviyoClient.from_settings(settings, redis, store) as client:
                await provision(client, redis, account)
        return token, secret
    finally:
        await redis.aclose()
