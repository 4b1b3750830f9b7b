"""WalletPass records Klaviyo could not ingest.

A record job answers 204 whether or not the record fits the schema: a bad record only shows up, later, in the
object type's ingestion log (failures only, newest first, kept 14 days). This reads that log so operators see
the failures (the dashboard / a cron poll it; the endpoint's tier is 1/s, 15/m per account, so poll rarely).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from passbridge.accounts import Account
from worker.klaviyo.client import KlaviyoClient
from worker.klaviyo.endpoints import GET_INGESTION_LOGS_FOR_OBJECT_TYPE
from worker.klaviyo.errors import NotProvisionedError
from worker.setup import load_provisioned


@dataclass(frozen=True, slots=True)
class IngestionFailure:
    """One record Klaviyo refused: when, why (per property), and the offending values."""

    id: str
    timestamp: str
    summary: str
    errors: list[dict[str, Any]]


async def ingestion_failures(client: KlaviyoClient, redis: Redis, account: Account) -> list[IngestionFailure]:
    """The newest page (≤ 50) of the account's WalletPass ingestion failures, newest first."""
    provisioned = await load_provisioned(redis, account.account_id)
    if provisioned is None:
        raise NotProvisionedError(account.account_id, GET_INGESTION_LOGS_FOR_OBJECT_TYPE.name)
    reply = await client.call(
        account, GET_INGESTION_LOGS_FOR_OBJECT_TYPE, path_params={"id": provisioned.object_type_id}
    )
    out = []
    for item in (reply.body or {}).get("data") or []:
        attrs = item.get("attributes") or {}
        out.append(
            IngestionFailure(
                id=str(item.get("id")),
                timestamp=str(attrs.get("timestamp", "")),
                summary=str(attrs.get("summary", "")),
                errors=[e for e in attrs.get("errors") or [] if isinstance(e, dict)],
            )
        )
    return out
