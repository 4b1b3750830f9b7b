"""``GET /metrics``: Prometheus exposition of the producer's counters and the queue gauges read from Redis."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from passbridge import metrics
from worker import exporter


async def get_metrics(request: Request) -> Response:
    """Counters of this process (of every producer process with ``PROMETHEUS_MULTIPROC_DIR``) plus gauges."""
    body = await exporter.render(request.app.state.ctx.redis)
    return Response(body, media_type=metrics.CONTENT_TYPE)
