"""Test data: accounts and realistic events (email, phone, five custom properties)."""

from __future__ import annotations

import base64
import os
from typing import Any

from cryptography.fernet import MultiFernet
from redis.asyncio import Redis

from passbridge.accounts import Account, AccountSecrets, AccountStore, hash_token


def webhook_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(24)).decode()


async def make_account(
    redis: Redis,
    cipher: MultiFernet,
    account_id: str = "acme",
    *,
    token: str = "tok-acme",
    secrets: list[str] | None = None,
    **fields: Any,
) -> Account:
    """Create an account in the registry with a known ingest token and webhook secrets."""
    account = Account(
        account_id=account_id,
        name=account_id.title(),
        ingest_token_sha256=hash_token(token),
        apple_pass_types={"pass.com.acme.loyalty": "ptk_0x216"},
        secrets=AccountSecrets.model_validate(
            {
                "webhook_secrets": secrets if secrets is not None else [webhook_secret()],
                "apple_token_secret": "apple-secret-" + account_id,
            }
        ),
        **fields,
    )
    await AccountStore(redis, cipher).put(account)
    return account


def event(i: int = 0, *, serial: str | None = None, kind: str = "created", **over: Any) -> dict[str, Any]:
    """A realistic events-API item."""
    doc: dict[str, Any] = {
        "event_id": f"evt-{i}",
        "kind": kind,
        "serial_number": serial or f"SER{i:08d}",
        "pass_type": "ptk_0x216",
        "platform": "apple" if i % 2 == 0 else "google",
        "occurred_at": f"2026-11-25T10:{(i // 60) % 60:02d}:{i % 60:02d}Z",
        "email": f"holder{i}@example.com",
        "phone_number": f"+1415555{i % 10000:04d}",
        "properties": {
            "points": i * 10,
            "tier": "gold",
            "member_since": "2024-03-01",
            "store": "SF-01",
            "opt_in": True,
        },
    }
    doc.update(over)
    return doc
