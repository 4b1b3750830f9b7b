"""Apple PassKit web service under ``/apple/{account_id}/v1/...`` (the pass's ``webServiceURL`` is
``https://<host>/apple/<account_id>``).

- ``POST   .../devices/{deviceLibraryIdentifier}/registrations/{passTypeIdentifier}/{serialNumber}``:
  201 new registration, 200 already registered, 401 wrong or missing ``ApplePass`` token. ``installed``
  fires when the pass's device count goes 0 → 1.
- ``DELETE`` the same path: 200 (also when the device was not registered: a retried unregister must not
  fail), 401. ``uninstalled`` fires when the count goes 1 → 0.
- ``GET    .../devices/{deviceLibraryIdentifier}/registrations/{passTypeIdentifier}?passesUpdatedSince=tag``:
  200 ``{"serialNumbers": [...], "lastUpdated": "<tag>"}`` or 204 when nothing matches. No auth: Apple sends
  none (the device library identifier is the credential).
- ``POST   .../log``: ``{"logs": [...]}`` written to the log, 200.

A passTypeIdentifier the account does not map (``apple_pass_types``) gets 401 on register/unregister — the
token cannot belong to a pass this web service serves, which is Apple's "request not authorized" — and 404 on
the registrations list. A mapped pass type the account does not sync keeps its registrations and fires no
event; the event it would have fired is counted as skipped, as the other sources count theirs.
"""

from __future__ import annotations

from typing import Any

import orjson
import structlog
from starlette.requests import Request
from starlette.responses import Response

from passbridge import metrics
from passbridge.accounts import Account
from passbridge.event import EventKind, PassEvent, Platform, render_pass_url, utcnow
from producer.context import ProducerContext
from producer.problems import Problem, bad_json, unprocessable
from producer.registrations import (
    MAX_DEVICES_PER_PASS,
    Limits,
    Outcome,
    Registration,
    register,
    unregister,
    updated_serials,
)
from producer.routes.common import count_skipped_events, json_response, read_body, store_errors_as_503
from producer.sources.apple import (
    MAX_PUSH_TOKEN_CHARS,
    check_authorization,
    device_problem,
    parse_updated_since,
    serial_problem,
)

log = structlog.get_logger(__name__)

MAX_REGISTER_BODY = 4096
MAX_LOG_BODY = 64 * 1024
MAX_LOG_LINES = 100
MAX_LOG_LINE_CHARS = 2000


def _unauthorized() -> Problem:
    return Problem(
        401,
        "unauthorized",
        "Pass not authorized",
        "send `Authorization: ApplePass <authenticationToken>` of this pass",
        headers={"WWW-Authenticate": "ApplePass"},
    )


def _path_errors(device_id: str, serial: str) -> None:
    errors = []
    if (why := device_problem(device_id)) is not None:
        errors.append({"pointer": "", "field": "deviceLibraryIdentifier", "detail": why})
    if (why := serial_problem(serial)) is not None:
        errors.append({"pointer": "", "field": "serialNumber", "detail": why})
    if errors:
        raise unprocessable(errors)


async def _authorized_pass(request: Request, ctx: ProducerContext) -> tuple[Account, str, str, str, str]:
    """Account, passTypeIdentifier, its pass type, serial and device, once the pass's token checks out."""
    p = request.path_params
    account = await ctx.account(p["account_id"])
    pass_type_id, serial, device_id = p["pass_type_id"], p["serial"], p["device_id"]
    pass_type = account.apple_pass_types.get(pass_type_id)
    secret = account.secrets.apple_token_secret
    if pass_type is None or not check_authorization(
        request.headers.get("authorization"),
        secret.get_secret_value() if secret else None,
        pass_type_id,
        serial,
    ):
        raise _unauthorized()
    _path_errors(device_id, serial)
    return account, pass_type_id, pass_type, serial, device_id


def _event(
    account: Account, kind: EventKind, pass_type: str, serial: str, device_id: str
) -> PassEvent | None:
    """The lifecycle event the call may fire (``None`` when the account does not sync this pass type).

    Its ``event_id`` is a placeholder: the registration script gives it the pass's install generation.
    """
    if not account.syncs(pass_type):
        return None
    now = utcnow()
    return PassEvent.model_construct(
        schema_version=1,
        event_id="",
        account_id=account.account_id,
        kind=kind,
        serial_number=serial,
        pass_type=pass_type,
        platform=Platform.apple,
        occurred_at=now,
        received_at=now,
        source="apple",
        email=None,
        phone_number=None,
        pass_url=render_pass_url(account.pass_url_template, serial, pass_type),
        device_id=device_id,
        properties={},
    )


async def _count(
    ctx: ProducerContext, account: Account, pass_type: str, event: PassEvent | None, result: Registration
) -> None:
    """Count the call's lifecycle event as the other sources' events are counted: a fired one in ``/metrics``'
    ingested total, the activity series behind ``status`` and the report (so Apple installs show in the save
    rate); one of a pass type the account does not sync in its skipped counters (``accounts list``/``check``),
    as a webhook or an NDJSON line of that pass type is."""
    if event is not None and result.event_id is not None:
        metrics.events_ingested(account.account_id, [event], [True])
    elif event is None and result.crossed:
        await count_skipped_events(ctx, account.account_id, [pass_type])


def _limits(ctx: ProducerContext) -> Limits:
    return Limits(
        high_water=ctx.settings.backlog_high_water,
        dedup_window_s=ctx.settings.dedup_ttl_s,
    )


async def post_registration(request: Request) -> Response:
    """Register a device for a pass (``installed`` on the pass's first device)."""
    ctx: ProducerContext = request.app.state.ctx
    account, pass_type_id, pass_type, serial, device_id = await _authorized_pass(request, ctx)
    body = await read_body(request, MAX_REGISTER_BODY)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_json(str(exc)) from None
    token = doc.get("pushToken") if isinstance(doc, dict) else None
    if not isinstance(token, str) or not 0 < len(token) <= MAX_PUSH_TOKEN_CHARS:
        raise unprocessable(
            [
                {
                    "pointer": "/pushToken",
                    "field": "pushToken",
                    "detail": f"required: the device's APNs push token, 1..{MAX_PUSH_TOKEN_CHARS} characters",
                }
            ]
        )
    event = _event(account, EventKind.installed, pass_type, serial, device_id)
    with store_errors_as_503(ctx, account.account_id):
        result = await register(
            ctx.redis,
            account.account_id,
            pass_type_id,
            serial,
            device_id,
            token,
            now_ms=int(utcnow().timestamp() * 1000) if event is None else event.occurred_ms,
            installed=event,
            limits=_limits(ctx),
        )
    await _count(ctx, account, pass_type, event, result)
    if result.outcome is Outcome.too_many_devices:
        detail = f"the pass has {MAX_DEVICES_PER_PASS} devices registered, the most it may have"
        raise Problem(
            409,
            "too-many-devices",
            "Too many devices registered for this pass",
            detail,
            errors=[{"pointer": "", "field": "deviceLibraryIdentifier", "detail": detail}],
        )
    log.info(
        "apple registration",
        account_id=account.account_id,
        serial=serial,
        created=result.outcome is Outcome.created,
        event_id=result.event_id,
    )
    status = "registered" if result.outcome is Outcome.created else "already_registered"
    return json_response({"status": status, "event_id": result.event_id}, int(result.outcome))


async def delete_registration(request: Request) -> Response:
    """Unregister a device from a pass (``uninstalled`` when it was the pass's last device)."""
    ctx: ProducerContext = request.app.state.ctx
    account, pass_type_id, pass_type, serial, device_id = await _authorized_pass(request, ctx)
    event = _event(account, EventKind.uninstalled, pass_type, serial, device_id)
    with store_errors_as_503(ctx, account.account_id):
        result = await unregister(
            ctx.redis,
            account.account_id,
            pass_type_id,
            serial,
            device_id,
            now_ms=int(utcnow().timestamp() * 1000) if event is None else event.occurred_ms,
            uninstalled=event,
            limits=_limits(ctx),
        )
    await _count(ctx, account, pass_type, event, result)
    log.info(
        "apple unregistration",
        account_id=account.account_id,
        serial=serial,
        was_registered=result.outcome is not Outcome.not_registered,
        event_id=result.event_id,
    )
    status = "unregistered" if result.outcome is Outcome.changed else "not_registered"
    return json_response({"status": status, "event_id": result.event_id}, 200)


async def get_registrations(request: Request) -> Response:
    """The serials of a pass type the device holds that changed since ``passesUpdatedSince``."""
    ctx: ProducerContext = request.app.state.ctx
    p = request.path_params
    account = await ctx.account(p["account_id"])
    pass_type_id, device_id = p["pass_type_id"], p["device_id"]
    if pass_type_id not in account.apple_pass_types:
        raise Problem(404, "unknown-pass-type", "Unknown pass type", f"{pass_type_id!r} is not served here")
    if device_problem(device_id) is not None:
        return Response(status_code=204)
    since = parse_updated_since(request.query_params.get("passesUpdatedSince"))
    with store_errors_as_503(ctx, account.account_id):
        serials, last = await updated_serials(ctx.redis, account.account_id, device_id, pass_type_id, since)
    if not serials:
        return Response(status_code=204)
    return json_response({"serialNumbers": serials, "lastUpdated": str(last)})


async def post_log(request: Request) -> Response:
    """Messages devices report about errors with this web service, written to the log."""
    ctx: ProducerContext = request.app.state.ctx
    account = await ctx.account(request.path_params["account_id"])
    body = await read_body(request, MAX_LOG_BODY)
    try:
        doc: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_json(str(exc)) from None
    logs = doc.get("logs") if isinstance(doc, dict) else None
    if not isinstance(logs, list) or not all(isinstance(x, str) for x in logs):
        raise unprocessable([{"pointer": "/logs", "field": "logs", "detail": "must be an array of strings"}])
    for line in logs[:MAX_LOG_LINES]:
        log.warning("apple device log", account_id=account.account_id, message=line[:MAX_LOG_LINE_CHARS])
    return json_response({"logged": min(len(logs), MAX_LOG_LINES)})
