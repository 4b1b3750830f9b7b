"""``GET /oauth/klaviyo/callback``: where Klaviyo sends a merchant back after approving (or denying) access.

The ``state`` names the account and its pending connect (see :mod:`passbridge.oauth`); the code is exchanged
for tokens at Klaviyo's token endpoint and the tokens are stored encrypted in the account. Browsers get a
short HTML page, API clients JSON; failures are problem documents.
"""

from __future__ import annotations

import contextlib
import html

import httpx
import structlog
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from passbridge.oauth import OAuthError, complete_connect, parse_state, take_pending
from producer.context import ProducerContext
from producer.problems import Problem
from producer.routes.common import json_response

log = structlog.get_logger(__name__)

#: The token exchange is one request to Klaviyo; do not hold the merchant's browser longer than this.
TOKEN_TIMEOUT_S = 15.0


def _problem(exc: OAuthError) -> Problem:
    return Problem(exc.status, "oauth-" + exc.code.replace("_", "-"), "Klaviyo connection failed", str(exc))


async def klaviyo_callback(request: Request) -> Response:
    """Finish ``passbridge accounts connect``: exchange the code, store the tokens."""
    ctx: ProducerContext = request.app.state.ctx
    params = request.query_params
    state = params.get("state", "")
    if "error" in params:
        # The merchant declined (or Klaviyo refused): the pending connect is spent either way.
        if state:
            with contextlib.suppress(OAuthError):
                await take_pending(ctx.redis, ctx.accounts.cipher, state)
        reason = params["error"] + (
            f": {params['error_description']}" if params.get("error_description") else ""
        )
        log.info("oauth connect declined", error=params["error"])
        raise Problem(400, "oauth-denied", "Klaviyo did not grant access", reason)
    missing = [name for name in ("code", "state") if not params.get(name)]
    if missing:
        raise Problem(
            400,
            "validation",
            "Missing query parameter",
            f"the callback needs {' and '.join(missing)}",
            errors=[{"pointer": "", "field": name, "detail": "required query parameter"} for name in missing],
        )
    try:
        parse_state(state)
        async with httpx.AsyncClient(timeout=TOKEN_TIMEOUT_S) as http:
            account = await complete_connect(
                ctx.redis, ctx.accounts, ctx.settings, http, state=state, code=params["code"]
            )
    except OAuthError as exc:
        log.warning("oauth connect failed", code=exc.code, detail=str(exc))
        raise _problem(exc) from None
    ctx.forget(account.account_id)
    oauth = account.secrets.klaviyo_oauth
    scopes = oauth.scopes if oauth else []
    doc = {"account_id": account.account_id, "connected": True, "scopes": scopes}
    if "text/html" in request.headers.get("accept", ""):
        name = html.escape(account.name or account.account_id)
        return HTMLResponse(
            f"<!doctype html><title>Klaviyo connected</title><h1>Klaviyo connected</h1>"
            f"<p>{name} is now connected to Klaviyo. You can close this window.</p>"
        )
    return json_response(doc)
