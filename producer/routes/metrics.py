"""``GET /metrics``: Prometheus exposition of the producer's counters and the queue gauges read from Redis."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from passbridge import metrics
from producer.context import ProducerContext
from producer.problems import Problem
from worker import exporter


async def get_metrics(request: Request) -> Response:
    """Counters of this process (of every producer process with ``PROMETHEUS_MULTIPROC_DIR``) plus gauges.

    With ``PASSBRIDGE_METRICS_TOKEN`` set, only for ``Authorization: Bearer <token>`` (401 otherwise): this
    listener is public, and a scrape reads every account's queue. The gauges are cached per process for
    :data:`worker.exporter.GAUGES_FRESH_S` seconds.
    """
    ctx: ProducerContext = request.app.state.ctx
    token = ctx.settings.metrics_token
    if token is not None and not exporter.bearer_ok(
        request.headers.get("authorization", ""), token.get_secret_value()
    ):
        raise Problem(
            401,
            "unauthorized",
            exporter.UNAUTHORIZED_TITLE,
            exporter.UNAUTHORIZED_DETAIL,
            headers={"WWW-Authenticate": exporter.UNAUTHORIZED_CHALLENGE},
        )
    body = await exporter.render(ctx.redis, request.app.state.gauge_cache)
    return Response(body, media_type=metrics.CONTENT_TYPE)
