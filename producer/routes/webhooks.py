"""``POST /webhooks/{account_id}``: platform webhooks signed per Standard Webhooks.

Payload (documented in the README)::

    {"type": "pass.created|pass.installed|pass.updated|pass.uninstalled|pass.deleted",
     "timestamp": "2026-11-25T10:00:00Z",
     "data": {"serialNumber": "...", "passType": "ptk_0x216", "platform": "apple|google",
              "passUrl": "https://...", "deviceId": "...",
              "customer": {"email": "...", "phone": "..."},
              "fields": {"points": 120, "tier": "gold"}}}

``webhook-id`` is the event id, ``timestamp`` the time the change happened (``occurred_at``).
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from passbridge.event import PassEvent, utcnow
from producer.context import ProducerContext
from producer.ingest import ItemError, to_event
from producer.problems import Problem, bad_json, unprocessable
from producer.routes.common import json_response, read_body
from producer.routes.events import publish_one
from producer.signatures import Rejection, SignatureRejected, verify_signature

WEBHOOK_TYPES = {f"pass.{k}": k for k in ("created", "installed", "updated", "uninstalled", "deleted")}

#: Where each canonical field lives in the webhook payload, so errors point into what the sender sent.
_FIELD_POINTERS = {
    "event_id": "/webhook-id",
    "kind": "/type",
    "occurred_at": "/timestamp",
    "serial_number": "/data/serialNumber",
    "pass_type": "/data/passType",
    "platform": "/data/platform",
    "pass_url": "/data/passUrl",
    "device_id": "/data/deviceId",
    "email": "/data/customer/email",
    "phone_number": "/data/customer/phone",
    "properties": "/data/fields",
}

_REASONS = {
    Rejection.too_old: "webhook-timestamp is older than the 5-minute tolerance",
    Rejection.too_new: "webhook-timestamp is more than 5 minutes in the future",
    Rejection.missing: "webhook-id, webhook-timestamp and webhook-signature are required",
    Rejection.bad_timestamp: "malformed webhook-timestamp or webhook-signature header",
    Rejection.malformed: "malformed webhook-signature header",
    Rejection.no_match: "no signature matches an active secret",
}


def _unauthorized(detail: str) -> Problem:
    return Problem(401, "bad-signature", "Webhook signature not accepted", detail)


def verify(secrets: list[str], body: bytes, headers: dict[str, str]) -> None:
    """Accept the body if any active secret signed it within the tolerance; raise a 401 problem otherwise.

    :func:`producer.signatures.verify_signature` decides exactly what ``standardwebhooks`` decides (the tests
    hold it to the package), without the package's per-call overhead.
    """
    if not secrets:
        raise _unauthorized("this account has no webhook signing secret configured")
    try:
        verify_signature(secrets, body, headers)
    except SignatureRejected as exc:
        raise _unauthorized(_REASONS[exc.reason]) from None


def webhook_item(msg_id: str, doc: Any) -> dict[str, Any]:
    """Map a webhook payload onto the events API's item shape (pure; validation happens after)."""
    if not isinstance(doc, dict):
        raise ItemError([{"pointer": "", "field": "(body)", "detail": "expected a JSON object"}])
    kind_raw = doc.get("type")
    # Only a str may be looked up: a list or object is unhashable (TypeError, a 500).
    kind = WEBHOOK_TYPES.get(kind_raw) if type(kind_raw) is str else None
    if kind is None:
        raise ItemError(
            [
                {
                    "pointer": "/type",
                    "field": "type",
                    "detail": f"must be one of {', '.join(sorted(WEBHOOK_TYPES))}",
                }
            ]
        )
    data = doc.get("data")
    if not isinstance(data, dict):
        raise ItemError([{"pointer": "/data", "field": "data", "detail": "must be an object"}])
    # Absent or null means none; anything else must be an object ([], "", 0 and false are not empty objects).
    customer = data.get("customer")
    if customer is None:
        customer = _NO_CUSTOMER
    elif not isinstance(customer, dict):
        raise ItemError(
            [{"pointer": "/data/customer", "field": "data.customer", "detail": "must be an object"}]
        )
    fields = data.get("fields")
    if fields is not None and not isinstance(fields, dict):
        raise ItemError([{"pointer": "/data/fields", "field": "data.fields", "detail": "must be an object"}])
    item = {
        "event_id": msg_id,
        "kind": kind,
        "serial_number": data.get("serialNumber"),
        "pass_type": data.get("passType"),
        "platform": data.get("platform"),
        "occurred_at": doc.get("timestamp"),
        "pass_url": data.get("passUrl"),
        "device_id": data.get("deviceId"),
        "email": customer.get("email"),
        "phone_number": customer.get("phone"),
        "properties": fields,
    }
    return {k: v for k, v in item.items() if v is not None}


_NO_CUSTOMER: dict[str, Any] = {}  # only read


def _repoint(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for e in errors:
        if not e["pointer"]:  # the whole body: "/" would name a member called ""
            out.append(e)
            continue
        head, _, rest = e["pointer"].lstrip("/").partition("/")
        base = _FIELD_POINTERS.get(head, "/" + head)
        out.append({**e, "pointer": base + ("/" + rest if rest else "")})
    return out


async def post_webhook(request: Request) -> Response:
    """Verify, normalize and enqueue one signed platform webhook."""
    ctx: ProducerContext = request.app.state.ctx
    account = await ctx.account(request.path_params["account_id"])
    body = await read_body(request, ctx.settings.max_body_bytes)
    received_at = utcnow()
    scope_headers = request.scope["headers"]

    def build() -> PassEvent:
        # Runs in the publisher, back to back with the other webhooks that arrived meanwhile (publish_one).
        # Straight from the ASGI scope (names are lower-case bytes there): only the three webhook-* headers.
        headers = {
            k.decode("latin-1"): v.decode("latin-1") for k, v in scope_headers if k.startswith(b"webhook-")
        }
        verify([s.get_secret_value() for s in account.secrets.webhook_secrets], body, headers)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise bad_json(str(exc)) from None
        try:
            return to_event(
                webhook_item(headers["webhook-id"], doc),
                account=account,
                source="webhook",
                received_at=received_at,
                default_region=ctx.settings.default_phone_region,
            )
        except ItemError as exc:
            raise unprocessable(_repoint(exc.errors)) from None

    return json_response(await publish_one(ctx, account, build), 202)


__all__ = ["post_webhook", "verify", "webhook_item"]
