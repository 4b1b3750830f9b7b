"""Helpers every route uses: auth, bounded body reads, JSON answers, enqueue with backpressure."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import orjson
import structlog
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from passbridge.accounts import Account
from passbridge.event import PassEvent
from passbridge.queue import BacklogFull, backlog_full_text, count_skipped
from passbridge.redis_lean import ReplyLost
from producer.coding import PIECE, BadGzip, Gunzip, bad_gzip, is_gzip
from producer.context import ProducerContext
from producer.problems import Problem, unavailable
from producer.publisher import Prepare

log = structlog.get_logger(__name__)

#: What a full backlog or an unreachable or slow Redis raises: each becomes a 503 (:func:`as_503`).
STORE_ERRORS = (BacklogFull, RedisError, OSError, TimeoutError)


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON answer serialized with orjson."""
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json", headers=headers)


async def read_body(request: Request, limit: int, *, gzip_ok: bool = False) -> bytes:
    """The request body, or a 413 problem as soon as it exceeds ``limit`` bytes (its declared length first).

    With ``gzip_ok`` a ``Content-Encoding: gzip`` body is decompressed as it arrives and the limit holds for
    the decompressed bytes too (400 problem for corrupt gzip data); any other coding is a 415 problem.
    """
    # Straight from the ASGI scope and receive channel: Starlette's Request.body() adds a stream generator, a
    # context manager and a weak set per request, on every ingest route's hot path.
    coding: bytes | None = None
    for name, value in request.scope["headers"]:  # the one scan of the headers, for both
        if name == b"content-length":
            if value.isdigit() and int(value) > limit:
                raise _too_large(limit)
        elif name == b"content-encoding":
            coding = value if coding is None else coding + b"," + value
    if coding is not None and is_gzip(coding, gzip_ok=gzip_ok):
        return await _read_gzip(request, limit)
    receive = request.receive
    chunks: list[bytes] = []
    size = 0
    try:
        while True:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect: the client went away mid-body
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    except asyncio.CancelledError:
        raise _cut_off(request, size) from None


def content_is_gzip(request: Request) -> bool:
    """Whether the body comes gzip-compressed (``Content-Encoding: gzip``); 415 problem for other codings."""
    coding: bytes | None = None
    for name, value in request.scope["headers"]:
        if name == b"content-encoding":
            coding = value if coding is None else coding + b"," + value
    return coding is not None and is_gzip(coding, gzip_ok=True)


async def _read_gzip(request: Request, limit: int) -> bytes:
    """:func:`read_body` for a gzip body: decompressed chunk by chunk, so a bomb stops at ``limit``."""
    receive = request.receive
    gz = Gunzip(piece=min(PIECE, limit + 1))
    out: list[bytes] = []
    received = size = 0
    try:
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:  # the compressed bytes too, as the declared length is
                raise _too_large(limit)
            for piece in gz.feed(chunk):
                size += len(piece)
                if size > limit:
                    raise _too_large(limit, " once decompressed")
                out.append(piece)
            if not message.get("more_body", False):
                gz.close()
                return out[0] if len(out) == 1 else b"".join(out)
    except BadGzip as exc:
        raise bad_gzip(exc) from None
    except asyncio.CancelledError:
        raise _cut_off(request, received) from None


def _cut_off(request: Request, received: int) -> BaseException:
    """What a body still arriving when the shutdown's grace period runs out (uvicorn then cancels the request)
    becomes: a 503 to retry (nothing of the request was taken), rather than uvicorn's plain-text 500 and a
    traceback in the log. Any other cancellation stays one."""
    task = asyncio.current_task()
    ctx: ProducerContext = request.app.state.ctx
    if task is None or not ctx.stopping.is_set():
        return asyncio.CancelledError()
    task.uncancel()
    log.info("request cut off by shutdown", path=request.url.path, received_bytes=received)
    return unavailable(
        "the server is shutting down and the request body had not fully arrived; nothing was taken",
        ctx.settings.retry_after_s,
        kind="shutting-down",
    )


def _too_large(limit: int, how: str = "") -> Problem:
    return Problem(413, "body-too-large", "Body too large", f"the body is over the {limit}-byte limit{how}")


async def authenticate_ingest(request: Request, ctx: ProducerContext) -> Account:
    """The path's account, if the request carries its bearer ingest token (404 / 401 problems otherwise)."""
    account = await ctx.account(request.path_params["account_id"])
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token or not account.check_ingest_token(token.strip()):
        raise Problem(
            401,
            "unauthorized",
            "Missing or wrong ingest token",
            "send `Authorization: Bearer <ingest token>` for this account",
            headers={"WWW-Authenticate": 'Bearer realm="passbridge"'},
        )
    return account


async def enqueue_or_503(ctx: ProducerContext, account_id: str, events: Sequence[PassEvent]) -> list[bool]:
    """Enqueue through the shared publisher; Redis down or backlog full become a 503 with Retry-After."""
    # A plain try (not the context manager below): this runs once per ingest request.
    try:
        return await ctx.publisher.publish(account_id, events)
    except STORE_ERRORS as exc:
        raise as_503(ctx, account_id, exc) from None


async def enqueue_prepared_or_503(ctx: ProducerContext, account_id: str, prepare: Prepare) -> list[bool]:
    """:func:`enqueue_or_503` for the events ``prepare`` builds in the publisher
    (:meth:`producer.publisher.Publisher.publish_prepared`); what ``prepare`` raises is raised as it is."""
    try:
        return await ctx.publisher.publish_prepared(account_id, prepare)
    except STORE_ERRORS as exc:
        raise as_503(ctx, account_id, exc) from None


@contextmanager
def store_errors_as_503(ctx: ProducerContext, account_id: str) -> Iterator[None]:
    """Turn a full backlog or an unreachable Redis inside the block into a 503 problem with Retry-After."""
    try:
        yield
    except STORE_ERRORS as exc:
        raise as_503(ctx, account_id, exc) from None


def as_503(ctx: ProducerContext, account_id: str, exc: Exception) -> Problem:
    """The 503 problem (with Retry-After) for a full backlog, a Redis timeout or an unreachable Redis."""
    if isinstance(exc, BacklogFull):
        why = backlog_full_text(account_id, exc.depth, exc.high_water)
        return unavailable(f"{why}; nothing was written", ctx.settings.retry_after_s)
    if isinstance(exc, RedisTimeoutError | TimeoutError | ReplyLost):
        log.warning("redis reply lost", error=type(exc).__name__)
        # The command may have run before the reply was lost: say so, and that a retry is safe.
        return unavailable(
            "the queue store did not answer (a timeout or a lost connection); the outcome is unknown and "
            "retrying is safe (the event id deduplicates it)",
            ctx.settings.retry_after_s,
        )
    log.warning("redis unavailable", error=type(exc).__name__)
    return unavailable("the queue store is unreachable; nothing was written", ctx.settings.retry_after_s)


async def count_skipped_events(ctx: ProducerContext, account_id: str, pass_types: list[str]) -> None:
    """Count skipped events; the count is for operators, so a Redis hiccup here never fails the request
    (the events were rightly acknowledged and not enqueued either way)."""
    try:
        await count_skipped(ctx.redis, account_id, pass_types)
    except (RedisError, OSError) as exc:
        log.warning("skipped events not counted", account_id=account_id, error=type(exc).__name__)
