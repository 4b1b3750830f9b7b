"""``POST /google/{account_id}/callback``: Google Wallet save/delete callbacks.

The body's ``ECv2SigningOnly`` signature chain is verified (:mod:`producer.sources.google_ecv2`) against the
root keys in the account's ``google_keys_file`` (the JSON of Google's key URL, which this service does not
fetch), with the account's ``google_issuer_id`` as recipient. Then ``save`` → ``installed``, ``del`` →
``uninstalled``; ``nonce`` is the event id (a redelivery is a duplicate); the objectId maps to the serial per
``google_serial_from`` and the classId to the pass type per ``google_classes``.

Answers: 200 accepted/duplicate/skipped; 401 not verifiable (forged, expired, wrong issuer, or the account has
no Google settings); 422 a verified message the account cannot map; 503 the keys file is unreadable (Google
retries, an operator fixes the file) or Redis is down.
"""

from __future__ import annotations

import os
import time
from typing import Any

import structlog
from starlette.requests import Request
from starlette.responses import Response

from passbridge.event import utcnow
from producer.context import ProducerContext
from producer.ingest import ItemError, to_event
from producer.problems import Problem, unavailable, unprocessable
from producer.routes.common import json_response, read_body
from producer.routes.events import publish_one
from producer.sources.google_ecv2 import (
    KeysFileError,
    MessageError,
    RootKey,
    VerificationError,
    parse_root_keys,
    serial_from_object_id,
    verify_callback,
)

log = structlog.get_logger(__name__)

MAX_CALLBACK_BODY = 64 * 1024
KINDS = {"save": "installed", "del": "uninstalled"}
_POINTERS = {
    "event_id": "/signedMessage/nonce",
    "serial_number": "/signedMessage/objectId",
    "pass_type": "/signedMessage/classId",
}

#: Parsed keys files by path, reloaded when the file's mtime or size changes (rotating keys needs no restart).
_keys_cache: dict[str, tuple[tuple[int, int], list[RootKey]]] = {}


def root_keys(path: str) -> list[RootKey]:
    """The ``ECv2SigningOnly`` root keys in ``path``; raises :class:`KeysFileError`."""
    try:
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_size)
        hit = _keys_cache.get(path)
        if hit and hit[0] == stamp:
            return hit[1]
        with open(path, "rb") as fh:
            keys = parse_root_keys(fh.read())
    except OSError as exc:
        raise KeysFileError(f"cannot read {path}: {exc.strerror}") from None
    _keys_cache[path] = (stamp, keys)
    return keys


def _message_error(field: str, detail: str) -> Problem:
    return unprocessable([{"pointer": f"/signedMessage/{field}", "field": field, "detail": detail}])


async def post_callback(request: Request) -> Response:
    """Verify one Google Wallet callback and enqueue its lifecycle event."""
    ctx: ProducerContext = request.app.state.ctx
    account = await ctx.account(request.path_params["account_id"])
    body = await read_body(request, MAX_CALLBACK_BODY)
    issuer, keys_file = account.google_issuer_id, account.google_keys_file
    if not issuer or not keys_file:
        raise Problem(
            401,
            "google-not-configured",
            "Google callbacks not configured",
            "this account has no Google issuer",
        )
    try:
        keys = root_keys(keys_file)
    except KeysFileError as exc:
        log.error("google keys file unusable", account_id=account.account_id, reason=str(exc))
        raise unavailable(
            "the account's Google root keys cannot be read", ctx.settings.retry_after_s
        ) from None
    try:
        message = verify_callback(body, root_keys=keys, recipient_id=issuer, now_ms=int(time.time() * 1000))
    except VerificationError as exc:
        log.info("google callback rejected", account_id=account.account_id, reason=exc.reason)
        raise Problem(401, "bad-signature", "Google callback not verified", exc.reason) from None
    except MessageError as exc:
        raise _message_error(exc.field, exc.reason) from None
    pass_type = account.google_classes.get(message.class_id)
    if pass_type is None:
        raise _message_error(
            "classId", f"class {message.class_id!r} is not mapped to a pass type for this account"
        )
    try:
        serial = serial_from_object_id(message.object_id, issuer, account.google_serial_from)
    except MessageError as exc:
        raise _message_error(exc.field, exc.reason) from None
    item: dict[str, Any] = {
        "event_id": message.nonce,
        "kind": KINDS[message.event_type],
        "serial_number": serial,
        "pass_type": pass_type,
        "platform": "google",
    }
    try:
        event = to_event(
            item,
            account=account,
            source="google",
            received_at=utcnow(),
            default_region=ctx.settings.default_phone_region,
        )
    except ItemError as exc:
        raise unprocessable(
            [{**e, "pointer": _POINTERS.get(e["pointer"].strip("/"), e["pointer"])} for e in exc.errors]
        ) from None
    result = await publish_one(ctx, account, lambda: event)
    log.info(
        "google callback",
        account_id=account.account_id,
        serial=serial,
        kind=event.kind.value,
        status=result["status"],
    )
    return json_response(result, 200)
