"""Routes outside /api: OAuth (``/oauth/authorize``, ``/oauth/token``, ``/oauth/revoke``) and the sandbox's
own inspection and control API under ``/_sandbox`` (read back data, request log, faults, reset).

The ``/_sandbox`` routes are not Klaviyo's: they need no key and must never be exposed beyond loopback.
"""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from klaviyo_sandbox import events as event_rules
from klaviyo_sandbox import objects as object_rules
from klaviyo_sandbox import profiles as profile_rules
from klaviyo_sandbox.auth import OAuthError
from klaviyo_sandbox.config import AccountConfig, ApiKeyConfig, FaultConfig, OAuthClientConfig, Outage

if TYPE_CHECKING:
    from klaviyo_sandbox.runtime import Runtime

_FAULT_FIELDS = {
    "error_rates",
    "latency_ms",
    "jitter_ms",
    "hang_rate",
    "hang_s",
    "drop_rate",
    "drop_after_processing",
    "operations",
    "seed",
    "reject_external_ids",
    "reject_operations",
    "import_error_shape",
    "retired_revisions",
}


def _problem(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"error": detail}, status_code=status)


def _oauth_error(exc: OAuthError) -> JSONResponse:
    return JSONResponse({"error": exc.error, "error_description": exc.description}, status_code=exc.status)


def build_aux_app(rt: Runtime) -> Starlette:
    """The Starlette app for everything that is not /api."""

    # -- OAuth ------------------------------------------------------------------------------------------------

    async def authorize(request: Request) -> Response:
        q = request.query_params
        if q.get("response_type") != "code":
            return _oauth_error(OAuthError(400, "unsupported_response_type", "response_type must be 'code'."))
        try:
            url = rt.credentials.authorize(
                q.get("client_id", ""),
                q.get("redirect_uri", ""),
                q.get("scope", ""),
                q.get("state"),
                q.get("code_challenge", ""),
                q.get("code_challenge_method", ""),
                time.time(),
            )
        except OAuthError as exc:
            return _oauth_error(exc)
        return RedirectResponse(url, status_code=302)

    async def _client(request: Request, form: Any) -> str:
        header = request.headers.get("authorization", "")
        client_id = form.get("client_id", "")
        secret = form.get("client_secret", "")
        if header.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(header[6:].strip()).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise OAuthError(401, "invalid_client", "Malformed Basic credentials.") from None
            client_id, _, secret = decoded.partition(":")
        rt.credentials.check_client(client_id, secret)
        return str(client_id)

    async def token(request: Request) -> Response:
        form = await request.form()
        try:
            client_id = await _client(request, form)
            grant = form.get("grant_type")
            if grant == "authorization_code":
                doc = rt.credentials.exchange_code(
                    client_id,
                    str(form.get("code", "")),
                    str(form.get("redirect_uri", "")),
                    str(form.get("code_verifier", "")),
                    time.time(),
                )
            elif grant == "refresh_token":
                doc = rt.credentials.refresh(client_id, str(form.get("refresh_token", "")), time.time())
            else:
                raise OAuthError(400, "unsupported_grant_type", f"Unsupported grant_type {grant!r}.")
        except OAuthError as exc:
            return _oauth_error(exc)
        return JSONResponse(doc, headers={"cache-control": "no-store"})

    async def revoke(request: Request) -> Response:
        form = await request.form()
        try:
            client_id = await _client(request, form)
        except OAuthError as exc:
            return _oauth_error(exc)
        rt.credentials.revoke(client_id, str(form.get("token", "")))
        return Response(status_code=200)

    # -- inspection -------------------------------------------------------------------------------------------

    def _state(request: Request) -> Any:
        account = request.path_params["account"]
        state = rt.states.get(account)
        if state is None:
            raise KeyError(account)
        return state

    def _base(request: Request) -> str:
        return rt.config.base_url or str(request.base_url).rstrip("/")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "pending": rt.pending})

    async def accounts(request: Request) -> Response:
        return JSONResponse(
            {
                "accounts": [
                    {
                        "account_id": a.account_id,
                        "custom_objects": a.custom_objects,
                        "api_keys": len(a.api_keys),
                        "oauth_clients": [c.client_id for c in a.oauth_clients],
                    }
                    for a in rt.accounts.values()
                ]
            }
        )

    async def add_account(request: Request) -> Response:
        doc = await request.json()
        try:
            account = AccountConfig(
                account_id=str(doc["account_id"]),
                api_keys=tuple(
                    ApiKeyConfig(k["key"], frozenset(k["scopes"]) if k.get("scopes") is not None else None)
                    if isinstance(k, dict)
                    else ApiKeyConfig(str(k))
                    for k in doc.get("api_keys", [])
                ),
                oauth_clients=tuple(
                    OAuthClientConfig(
                        client_id=c["client_id"],
                        client_secret=c["client_secret"],
                        redirect_uris=tuple(c.get("redirect_uris", ())),
                        approve=bool(c.get("approve", True)),
                        **({"scopes": frozenset(c["scopes"])} if "scopes" in c else {}),
                    )
                    for c in doc.get("oauth_clients", [])
                ),
                custom_objects=bool(doc.get("custom_objects", True)),
            )
            rt.add_account(account)
        except (KeyError, TypeError, ValueError) as exc:
            return _problem(400, f"bad account: {exc}")
        return JSONResponse({"account_id": account.account_id}, status_code=201)

    async def profiles(request: Request) -> Response:
        try:
            state = _state(request)
        except KeyError:
            return _problem(404, "unknown account")
        found = list(state.profiles.values())
        for key in ("external_id", "email", "phone_number"):
            if key in request.query_params:
                found = [p for p in found if p.attrs.get(key) == request.query_params[key]]
        found.sort(key=lambda p: p.id)
        base = _base(request)
        return JSONResponse({"data": [profile_rules.resource(p, base) for p in found]})

    async def profile_events(request: Request) -> Response:
        try:
            state = _state(request)
        except KeyError:
            return _problem(404, "unknown account")
        pid = request.path_params["profile_id"]
        events = event_rules.time_order(state.events_by_profile.get(pid, []))
        return JSONResponse({"data": [_event_doc(state, e, _base(request)) for e in events]})

    async def all_events(request: Request) -> Response:
        try:
            state = _state(request)
        except KeyError:
            return _problem(404, "unknown account")
        events = event_rules.time_order(list(state.events.values()))
        metric = request.query_params.get("metric")
        if metric:
            events = [e for e in events if state.metrics[e.metric_id].name == metric]
        return JSONResponse({"data": [_event_doc(state, e, _base(request)) for e in events]})

    async def object_records(request: Request) -> Response:
        try:
            state = _state(request)
        except KeyError:
            return _problem(404, "unknown account")
        wanted = request.query_params.get("type")
        out = []
        for t in state.object_types.values():
            if wanted and wanted not in (t.id, t.title):
                continue
            for r in sorted(state.records.get(t.id, {}).values(), key=lambda r: r.seq):
                doc = object_rules.record_resource(r, _base(request))
                doc["object_type"] = t.title
                doc["relationships"] = r.relationships
                out.append(doc)
        return JSONResponse({"data": out})

    async def ingestion_logs(request: Request) -> Response:
        try:
            state = _state(request)
        except KeyError:
            return _problem(404, "unknown account")
        out = []
        for t in state.object_types.values():
            for entry in state.ingestion_logs.get(t.id, []):
                doc = object_rules.log_resource(entry, _base(request))
                doc["object_type"] = t.title
                doc["record"] = entry.record
                out.append(doc)
        return JSONResponse({"data": out})

    async def requests(request: Request) -> Response:
        limit = int(request.query_params.get("limit", "100"))
        return JSONResponse(rt.requests.summary(limit))

    async def reset(request: Request) -> Response:
        rt.reset()
        return JSONResponse({"status": "reset"})

    async def get_faults(request: Request) -> Response:
        return JSONResponse(_fault_doc(rt.faults.config))

    async def put_faults(request: Request) -> Response:
        doc = await request.json()
        unknown = set(doc) - _FAULT_FIELDS
        if unknown:
            return _problem(400, f"unknown fault fields: {', '.join(sorted(unknown))}")
        try:
            config = FaultConfig(
                error_rates=tuple((int(k), float(v)) for k, v in (doc.get("error_rates") or {}).items()),
                latency_ms=float(doc.get("latency_ms", 0)),
                jitter_ms=float(doc.get("jitter_ms", 0)),
                hang_rate=float(doc.get("hang_rate", 0)),
                hang_s=float(doc.get("hang_s", 300)),
                drop_rate=float(doc.get("drop_rate", 0)),
                drop_after_processing=bool(doc.get("drop_after_processing", False)),
                operations=frozenset(doc.get("operations") or ()),
                seed=doc.get("seed"),
                reject_external_ids=_strings(doc, "reject_external_ids"),
                reject_operations=_strings(doc, "reject_operations"),
                import_error_shape=str(doc.get("import_error_shape", "absolute")),
                retired_revisions=tuple(
                    (str(k), int(v)) for k, v in (doc.get("retired_revisions") or {}).items()
                ),
            )
        except (TypeError, ValueError, AttributeError) as exc:
            return _problem(400, f"bad fault config: {exc}")
        rt.faults.configure(replace(config, outages=()), time.monotonic())
        return JSONResponse(_fault_doc(rt.faults.config))

    async def clear_faults(request: Request) -> Response:
        rt.faults.configure(FaultConfig(), time.monotonic())
        return JSONResponse(_fault_doc(rt.faults.config))

    async def add_outage(request: Request) -> Response:
        doc = await request.json()
        try:
            outage = Outage(
                start_s=float(doc.get("start_in_s", 0)),
                duration_s=float(doc["duration_s"]),
                status=int(doc.get("status", 503)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            return _problem(400, f"bad outage: {exc}")
        rt.faults.add_outage(outage, time.monotonic())
        return JSONResponse(_fault_doc(rt.faults.config), status_code=201)

    async def expire_tokens(request: Request) -> Response:
        return JSONResponse({"expired": rt.credentials.expire_access_tokens()})

    routes = [
        Route("/oauth/authorize", authorize, methods=["GET"]),
        Route("/oauth/token", token, methods=["POST"]),
        Route("/oauth/revoke", revoke, methods=["POST"]),
        Route("/_sandbox/health", health, methods=["GET"]),
        Route("/_sandbox/accounts", accounts, methods=["GET"]),
        Route("/_sandbox/accounts", add_account, methods=["POST"]),
        Route("/_sandbox/accounts/{account}/profiles", profiles, methods=["GET"]),
        Route("/_sandbox/accounts/{account}/profiles/{profile_id}/events", profile_events, methods=["GET"]),
        Route("/_sandbox/accounts/{account}/events", all_events, methods=["GET"]),
        Route("/_sandbox/accounts/{account}/object-records", object_records, methods=["GET"]),
        Route("/_sandbox/accounts/{account}/ingestion-logs", ingestion_logs, methods=["GET"]),
        Route("/_sandbox/requests", requests, methods=["GET"]),
        Route("/_sandbox/reset", reset, methods=["POST"]),
        Route("/_sandbox/faults", get_faults, methods=["GET"]),
        Route("/_sandbox/faults", put_faults, methods=["PUT"]),
        Route("/_sandbox/faults", clear_faults, methods=["DELETE"]),
        Route("/_sandbox/outages", add_outage, methods=["POST"]),
        Route("/_sandbox/oauth/expire-access-tokens", expire_tokens, methods=["POST"]),
    ]
    return Starlette(routes=routes)


def _event_doc(state: Any, event: Any, base_url: str) -> dict[str, Any]:
    doc = event_rules.resource(event, base_url)
    doc["metric_name"] = state.metrics[event.metric_id].name
    # Klaviyo's read-back has no such field; tests read whether the event came as a backfill (no flows).
    doc["backfill"] = event.backfill
    return doc


def _strings(doc: dict[str, Any], name: str) -> frozenset[str]:
    """A field holding a list of non-empty strings (absent or ``null``: none)."""
    value = doc.get(name)
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{name} must be a list of non-empty strings")
    return frozenset(value)


def _fault_doc(config: FaultConfig) -> dict[str, Any]:
    doc = asdict(config)
    doc["error_rates"] = {str(k): v for k, v in config.error_rates}
    doc["operations"] = sorted(config.operations)
    doc["reject_external_ids"] = sorted(config.reject_external_ids)
    doc["reject_operations"] = sorted(config.reject_operations)
    doc["outages"] = [asdict(o) for o in config.outages]
    doc["retired_revisions"] = dict(config.retired_revisions)
    return doc
