"""``GET /api/accounts`` (connection checks) and ``GET /api/accounts/{id}``."""

from __future__ import annotations

from typing import Any

from klaviyo_sandbox.config import AccountConfig
from klaviyo_sandbox.errors import not_found
from klaviyo_sandbox.handlers.common import Call, Reply, document


def _resource(account: AccountConfig, base_url: str) -> dict[str, Any]:
    return {
        "type": "account",
        "id": account.account_id,
        "attributes": {
            "test_account": True,
            "contact_information": {
                "default_sender_name": account.name,
                "default_sender_email": "sandbox@example.com",
                "website_url": "https://example.com",
                "organization_name": account.name,
                "street_address": {
                    "address1": "1 Sandbox Way",
                    "address2": "",
                    "city": "Boston",
                    "region": "MA",
                    "country": "US",
                    "zip": "02110",
                },
            },
            "industry": None,
            "timezone": account.timezone,
            "preferred_currency": account.currency,
            "public_api_key": account.account_id,
            "locale": "en-US",
        },
        "links": {"self": f"{base_url}/api/accounts/{account.account_id}/"},
    }


def get_accounts(call: Call) -> Reply:
    """The caller's own account, as a one-item collection."""
    return Reply(
        200,
        {
            "data": [_resource(call.account, call.base_url)],
            "links": {"self": call.self_url, "next": None, "prev": None},
        },
    )


def get_account(call: Call) -> Reply:
    """The caller's account by id (another account's id is a 404)."""
    if call.params["id"] != call.account.account_id:
        raise not_found("account", call.params["id"])
    return Reply(200, document(_resource(call.account, call.base_url), call.self_url))
