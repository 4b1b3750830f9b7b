"""The producer's ASGI app: routes, problem handlers and the lifespan that owns Redis and the publisher."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus

import structlog
from fastapi import FastAPI
from fastapi.exception_handlers import http_exception_handler
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from passbridge import metrics
from passbridge.accounts import AccountStore
from passbridge.accounts_file import apply_accounts_file
from passbridge.crypto import cipher_from_settings
from passbridge.gc_tuning import tune_gc
from passbridge.redis_client import fast_redis
from passbridge.settings import Settings
from producer import dashboard
from producer.context import ProducerContext
from producer.draining import on_stop_signal
from producer.problems import Problem, unavailable
from producer.publisher import Publisher
from producer.routes import apple, events, google, health, oauth, webhooks
from producer.routes.metrics import get_metrics
from worker import exporter

log = structlog.get_logger(__name__)


def redis_client(url: str) -> Redis:
    """An asyncio Redis client with explicit timeouts, so a dead Redis turns into a prompt 503."""
    return fast_redis(url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=30)


def create_app(settings: Settings, redis_url: str) -> FastAPI:
    """Build the producer app for ``settings`` against the Redis at ``redis_url``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = redis_client(redis_url)
        try:
            # A deployment's accounts.yaml (PASSBRIDGE_ACCOUNTS_FILE); a bad file stops the start.
            await apply_accounts_file(redis, settings)
        except BaseException:
            await redis.aclose()
            raise
        publisher = Publisher(
            redis,
            high_water=settings.backlog_high_water,
            dedup_window_s=settings.dedup_ttl_s,
        )
        await publisher.start()
        cipher = cipher_from_settings(settings)
        app.state.ctx = ctx = ProducerContext(settings, redis, AccountStore(redis, cipher), publisher)
        # Redis down at start: the marker is armed at the first unknown account instead.
        with contextlib.suppress(RedisError, OSError):
            await ctx.data_marker.check(redis)
        # Everything loaded so far (pydantic schemas, phone metadata, ...) lives as long as the process: keep
        # it out of the collector's scans, and keep concurrent requests from setting off collections.
        tune_gc()
        flusher = metrics.start_flusher(redis)
        restore_signals = on_stop_signal(ctx.stopping)
        # One line per process (with --workers N, per worker): the operator, and a deploy's health check, can
        # tell when every worker serves, not only the first to answer.
        log.info("producer_ready", pid=os.getpid())
        try:
            yield
        finally:
            restore_signals()
            await publisher.close()
            await metrics.stop_flusher(flusher, redis)
            await redis.aclose()

    app = FastAPI(
        title="passbridge producer", version="0.1.0", lifespan=lifespan, docs_url="/docs", redoc_url=None
    )

    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> Response:
        metrics.rejected(exc.kind)
        return exc.response(request.url.path)

    # The framework's own answers (no such path, wrong method, ...) and unhandled exceptions are problems
    # too, like every other error of the API. The dashboard's HTML pages keep the framework's answers.
    @app.exception_handler(HTTPException)
    async def _framework(request: Request, exc: HTTPException) -> Response:
        if _is_dashboard(request):
            return await http_exception_handler(request, exc)
        return await _problem(request, _framework_problem(request, exc))

    @app.exception_handler(RedisError)
    async def _redis_failed(request: Request, exc: RedisError) -> Response:
        # Redis unreachable, restarting, full or read-only under a route that does not answer for itself (the
        # dashboard's pages): a 503 to retry, not a 500 with a traceback (which also reset the connection).
        log.warning("redis_failed", method=request.method, path=request.url.path, error=type(exc).__name__)
        retry_after = {"Retry-After": str(settings.retry_after_s)}
        if _is_dashboard(request):
            return PlainTextResponse(
                "Service unavailable: Redis did not answer (unreachable, restarting, full or read-only). "
                "Retry in a few seconds.",
                status_code=503,
                headers=retry_after,
            )
        metrics.rejected("unavailable")
        return unavailable(
            "Redis did not answer (unreachable, restarting, full or read-only); retry later",
            settings.retry_after_s,
        ).response(request.url.path)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> Response:
        # The exception's text goes to the log only: it may name accounts, keys or internals. (Starlette then
        # re-raises it, so the server logs it as well.)
        log.exception(
            "unhandled exception", method=request.method, path=request.url.path, error=type(exc).__name__
        )
        if _is_dashboard(request):
            return PlainTextResponse("Internal Server Error", status_code=500)
        return Problem(
            500,
            "internal",
            "Internal server error",
            "the server failed to handle this request; the error is logged",
        ).response(request.url.path)

    app.add_api_route("/healthz", health.healthz, methods=["GET"])
    app.add_api_route("/readyz", health.readyz, methods=["GET"])
    app.add_api_route("/oauth/klaviyo/callback", oauth.klaviyo_callback, methods=["GET"])
    app.add_api_route(
        "/v1/accounts/{account_id}/events", events.post_events, methods=["POST"], status_code=202
    )
    app.add_api_route("/v1/accounts/{account_id}/events/ndjson", events.post_ndjson, methods=["POST"])
    app.add_api_route("/webhooks/{account_id}", webhooks.post_webhook, methods=["POST"], status_code=202)
    _apple_routes(app)
    app.add_api_route("/google/{account_id}/callback", google.post_callback, methods=["POST"])
    app.add_api_route("/metrics", get_metrics, methods=["GET"], include_in_schema=False)
    app.state.gauge_cache = exporter.GaugeCache()
    dashboard.mount(app)
    return app


def _is_dashboard(request: Request) -> bool:
    path = request.url.path
    return path == "/dashboard" or path.startswith("/dashboard/")


def _framework_problem(request: Request, exc: HTTPException) -> Problem:
    """The problem for an error the framework raised itself (routing, method matching, body parsing)."""
    status = exc.status_code
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:  # a status http.HTTPStatus does not name
        phrase = "Error"
    if status == 404:
        detail = f"no endpoint at {request.url.path}"
    elif status == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        detail = f"{request.method} is not allowed here" + (f"; allowed: {allowed}" if allowed else "")
    else:
        detail = exc.detail if isinstance(exc.detail, str) else phrase
    return Problem(status, phrase.lower().replace(" ", "-"), phrase, detail, headers=dict(exc.headers or {}))


def _apple_routes(app: FastAPI) -> None:
    """The PassKit web service; the pass's ``webServiceURL`` is ``<base>/apple/<account_id>``."""
    base = "/apple/{account_id}/v1"
    registration = base + "/devices/{device_id}/registrations/{pass_type_id}/{serial:path}"
    app.add_api_route(registration, apple.post_registration, methods=["POST"])
    app.add_api_route(registration, apple.delete_registration, methods=["DELETE"])
    app.add_api_route(
        base + "/devices/{device_id}/registrations/{pass_type_id}", apple.get_registrations, methods=["GET"]
    )
    app.add_api_route(base + "/log", apple.post_log, methods=["POST"])
