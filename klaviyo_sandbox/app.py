"""The sandbox ASGI app: a lean hand-written pipeline for ``/api/*`` and Starlette for the rest.

Order for an /api request (each step can answer on its own):
faults (outage, injected status, latency, hang, drop) → route (404/405) → auth (401) → revision (400/404) →
scopes (403) → rate limit (429, counted per account, OAuth app and operation) → body size, media type, JSON,
schema (413/415/400) → query (400) → handler → response with ``RateLimit-*`` headers. Every answer is counted
in the request log.

The /api path avoids a framework on purpose: the sandbox must never be the bottleneck of a benchmark, and a
plain ASGI callable with dictionary routing does a fraction of the work of a general router and request
object.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import structlog

from klaviyo_sandbox.auth import Principal
from klaviyo_sandbox.config import SandboxConfig
from klaviyo_sandbox.control import build_aux_app
from klaviyo_sandbox.errors import ApiError, error_document
from klaviyo_sandbox.faults import Fault
from klaviyo_sandbox.handlers import CHECKS, HANDLERS, Call, Reply
from klaviyo_sandbox.ratelimit import format_seconds
from klaviyo_sandbox.requestlog import LoggedRequest
from klaviyo_sandbox.revisions import check_revision, retired_revision
from klaviyo_sandbox.runtime import OperationInfo, Runtime, log_failure
from klaviyo_sandbox.schema.loader import SpecDocument
from klaviyo_sandbox.validation import parse_query, validate_body

log = structlog.get_logger("klaviyo_sandbox")

JSONAPI = b"application/vnd.api+json"
_MEDIA_TYPES = (b"application/vnd.api+json", b"application/json")
#: Payload caps from the spec's operation descriptions (../shared/notes/klaviyo-api.md §3.2).
_MAX_BODY = {
    "create_or_update_profile": 100 * 1024,
    "create_profile": 100 * 1024,
    "update_profile": 100 * 1024,
    "create_event": 5 * 1024 * 1024,
    "bulk_create_events": 5 * 1024 * 1024,
    "bulk_import_profiles": 5 * 1024 * 1024,
    "create_data_source_record": 512 * 1024 + 4096,
    "bulk_create_data_source_records": 4 * 1024 * 1024,
    "bulk_delete_object_records": 5 * 1024 * 1024,
}
_DEFAULT_MAX_BODY = 1024 * 1024
Scope = dict[str, Any]


class _Drop(Exception):
    """Close the connection without an answer."""


class SandboxApp:
    """The ASGI callable. ``runtime`` is public so tests and the control API share one state."""

    def __init__(self, config: SandboxConfig) -> None:
        self.runtime = Runtime(config)
        self.aux = build_aux_app(self.runtime)
        self._bulk_bodies = ThreadPoolExecutor(1, thread_name_prefix="sandbox-bulk-body")

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http" and scope["path"].startswith("/api/"):
            await self._api(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        else:
            await self.aux(scope, receive, send)

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # Compile every request validator before the first request arrives.
                self.runtime.spec.warm()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- the /api pipeline ----------------------------------------------------------------------------------

    async def _api(self, scope: Scope, receive: Any, send: Any) -> None:
        rt = self.runtime
        started = time.perf_counter()
        # When the request arrived (wall clock), what the request log reports; read again right before the
        # limiter for a request that reaches it, so the log holds its admission time even when the routing
        # and auth steps in between were held up (a garbage collection of tens of ms, seen in a CI run).
        arrived = time.time()
        method: str = scope["method"]
        path: str = scope["path"]
        op_id = "unknown"
        account_id = ""
        rate_headers: list[tuple[bytes, bytes]] = []
        drop_after = False
        try:
            op_id, params = rt.router.match(method, path)
            info = rt.ops[op_id]
            if rt.faults.active:
                fault = await self._fault(op_id)
                if fault is not None:
                    if fault.kind == "drop" and fault.after_processing:
                        drop_after = True
                    else:
                        await self._apply_fault(fault, scope, receive, send, op_id, started)
                        return
            headers = _headers(scope)
            principal = self._authenticate(headers.get(b"authorization"))
            account_id = principal.account_id
            revision = check_revision(_text(headers.get(b"revision")), info.since)
            if rt.faults.config.retired_revisions:
                retired_revision(rt.faults.config.retired_revisions, revision)
            if not info.scopes <= principal.scopes:
                raise ApiError(
                    403,
                    "permission_denied",
                    "You do not have permission to perform this action.",
                    pointer="/data/",
                )
            if not rt.unlimited:
                arrived = time.time()
                rate_headers = self._admit(principal, info)
            body = await self._body(info, headers, receive) if info.has_body else None
            query = parse_query(rt.spec, op_id, scope.get("query_string", b"")) if info.has_query else {}
            call = Call(
                runtime=rt,
                account=rt.accounts[account_id],
                state=rt.states[account_id],
                operation=op_id,
                params=params,
                query=query,
                body=body,
                base_url=rt.config.base_url or _base_url(scope, headers),
                now=time.time(),
                revision=revision,
                path=path,
            )
            check = CHECKS.get(op_id)
            if check is not None:
                loop = asyncio.get_running_loop()
                call.checked = await loop.run_in_executor(self._bulk_bodies, check, call)
            reply = HANDLERS[op_id](call)
        except ApiError as exc:
            reply = Reply(exc.status, exc.document(), exc.headers)
        except _Drop:
            await _drop(send, receive)
            self._log(method, path, op_id, account_id, 0, started, arrived)
            return
        except Exception as exc:
            log_failure("sandbox.handler_failed", exc, operation=op_id)
            reply = Reply(500, error_document(500, "error", "A server error occurred.", pointer=None))
        if drop_after:
            await _drop(send, receive)
            self._log(method, path, op_id, account_id, 0, started, arrived)
            return
        await _respond(send, reply, rate_headers)
        self._log(method, path, op_id, account_id, reply.status, started, arrived)

    def _authenticate(self, header: bytes | None) -> Principal:
        if not header:
            raise ApiError(
                401, "not_authenticated", "Authentication credentials were not provided.", pointer="/data/"
            )
        scheme, _, secret = header.decode("latin-1").partition(" ")
        principal = None
        secret = secret.strip()
        if scheme == "Klaviyo-API-Key":
            principal = self.runtime.credentials.by_api_key(secret)
        elif scheme.lower() == "bearer":
            principal = self.runtime.credentials.by_access_token(secret, time.time())
        if principal is None:
            raise ApiError(
                401, "authentication_failed", "Incorrect authentication credentials.", pointer="/data/"
            )
        return principal

    def _admit(self, principal: Principal, info: OperationInfo) -> list[tuple[bytes, bytes]]:
        rt = self.runtime
        tier = info.tier
        key = (principal.account_id, principal.client_id or "", info.operation_id)
        decision = rt.limiter.check(key, tier, time.monotonic())
        if not decision.admitted:
            retry = rt.limiter.retry_after_header(decision.retry_after_s)
            seconds = max(1, math.ceil(decision.retry_after_s * rt.limiter.scale - 1e-9))
            unit = "second" if seconds == 1 else "seconds"
            raise ApiError(
                429,
                "throttled",
                f"Request was throttled. Expected available in {seconds} {unit}.",
                pointer="/data",
                headers={"retry-after": retry},
            )
        limit = f"{tier.steady}, {tier.burst};w=1, {tier.steady};w=60".encode()
        reset = format_seconds(math.floor(decision.reset_s * rt.limiter.scale) / rt.limiter.scale)
        return [
            (b"ratelimit-limit", limit),
            (b"ratelimit-remaining", str(decision.remaining).encode()),
            (b"ratelimit-reset", reset.encode()),
        ]

    async def _body(self, info: OperationInfo, headers: dict[bytes, bytes], receive: Any) -> Any:
        op_id = info.operation_id
        limit = _MAX_BODY.get(op_id, _DEFAULT_MAX_BODY)
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Drop
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise ApiError(413, "request_too_large", f"The request body exceeds {limit // 1024} KB.")
            chunks.append(chunk)
            more = message.get("more_body", False)
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        media = headers.get(b"content-type", b"").split(b";", 1)[0].strip().lower()
        if media not in _MEDIA_TYPES:
            raise ApiError(
                415,
                "unsupported_media_type",
                f'Unsupported media type "{media.decode("latin-1")}" in request.',
                pointer=None,
            )
        if len(raw) > _OFF_LOOP_BYTES:
            # Parsing and checking a bulk body takes 10-50 ms of pure Python: on the loop, every other
            # account's request would wait that long (Klaviyo's latency does not depend on what other accounts
            # send). In a thread, the interpreter hands the loop a turn every millisecond (the sandbox's switch
            # interval); one thread for all, so concurrent bulk bodies do not take turns away from the loop.
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._bulk_bodies, _parse_and_check, self.runtime.spec, op_id, raw
            )
        return _parse_and_check(self.runtime.spec, op_id, raw)

    # -- faults -----------------------------------------------------------------------------------------------

    async def _fault(self, op_id: str) -> Fault | None:
        faults = self.runtime.faults
        delay = faults.latency_s()
        if delay > 0:
            await asyncio.sleep(delay)
        return faults.decide(op_id, time.monotonic())

    async def _apply_fault(
        self, fault: Fault, scope: Scope, receive: Any, send: Any, op_id: str, started: float
    ) -> None:
        if fault.kind == "status" and fault.status == 429:
            # An injected throttle looks exactly like a real one: code, detail and a one-second Retry-After
            # on Klaviyo's (scaled) clock.
            retry = self.runtime.limiter.retry_after_header(1.0 / self.runtime.limiter.scale)
            body = error_document(
                429, "throttled", "Request was throttled. Expected available in 1 second.", pointer="/data"
            )
            await _respond(send, Reply(429, body, {"retry-after": retry}), [])
            self._log(scope["method"], scope["path"], op_id, "", 429, started)
        elif fault.kind == "status":
            body = error_document(fault.status, "error", "A server error occurred.", pointer=None)
            await _respond(send, Reply(fault.status, body), [])
            self._log(scope["method"], scope["path"], op_id, "", fault.status, started)
        elif fault.kind == "hang":
            try:
                await asyncio.wait_for(_wait_disconnect(receive), self.runtime.faults.config.hang_s)
            except TimeoutError:
                await _respond(
                    send, Reply(504, error_document(504, "error", "Gateway timeout.", pointer=None)), []
                )
                self._log(scope["method"], scope["path"], op_id, "", 504, started)
                return
            self._log(scope["method"], scope["path"], op_id, "", 0, started)
        else:
            await _drop(send, receive)
            self._log(scope["method"], scope["path"], op_id, "", 0, started)

    def _log(
        self,
        method: str,
        path: str,
        op_id: str,
        account: str,
        status: int,
        started: float,
        arrived: float | None = None,
    ) -> None:
        self.runtime.requests.add(
            LoggedRequest(
                at=arrived if arrived is not None else time.time(),
                method=method,
                path=path,
                operation=op_id,
                account=account,
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
            )
        )


def _headers(scope: Scope) -> dict[bytes, bytes]:
    # ASGI servers give lower-cased names.
    return dict(scope["headers"])


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


def _base_url(scope: Scope, headers: dict[bytes, bytes]) -> str:
    host = headers.get(b"host")
    if host:
        return f"{scope.get('scheme', 'http')}://{host.decode('latin-1')}"
    server = scope.get("server") or ("127.0.0.1", 80)
    return f"{scope.get('scheme', 'http')}://{server[0]}:{server[1]}"


#: Bodies larger than this are parsed and validated in a thread (see ``SandboxApp._body``).
_OFF_LOOP_BYTES = 64 * 1024


def _parse_and_check(spec: SpecDocument, op_id: str, raw: bytes) -> Any:
    """The request body as JSON, checked against the operation's schema (400 ``parse_error`` / ``invalid``)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "parse_error", f"JSON parse error - {exc}", pointer=None) from None
    validate_body(spec, op_id, body)
    return body


async def _respond(send: Any, reply: Reply, extra: list[tuple[bytes, bytes]]) -> None:
    headers = list(extra)
    for name, value in reply.headers.items():
        headers.append((name.encode("latin-1"), value.encode("latin-1")))
    if reply.body is None:
        payload = b""
    else:
        payload = orjson.dumps(reply.body)
        headers.append((b"content-type", JSONAPI))
    headers.append((b"content-length", str(len(payload)).encode()))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def _wait_disconnect(receive: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _drop(send: Any, receive: Any) -> None:
    """Close the connection with no answer at all.

    ASGI has no message for "drop"; under uvicorn the ``send`` callable is a method of the connection's
    request cycle, which holds the transport. Aborting it makes the client see a connection closed without a
    response (what a crashed gateway does). Elsewhere (e.g. an in-memory transport) raise instead.
    """
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None:
        raise ConnectionAbortedError("sandbox fault: connection dropped")
    transport.abort()
    await _wait_disconnect(receive)


def create_app(config: SandboxConfig | None = None) -> SandboxApp:
    """The sandbox as an ASGI app (serve it with uvicorn, or see ``klaviyo_sandbox.testing.run_sandbox``)."""
    return SandboxApp(config or SandboxConfig())
