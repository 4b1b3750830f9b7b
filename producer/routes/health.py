"""``GET /healthz`` (the process is up) and ``GET /readyz`` (Redis answers)."""

from __future__ import annotations

import asyncio

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from producer.routes.common import json_response


async def healthz(request: Request) -> Response:
    """Liveness."""
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Readiness: Redis answers PING within a second."""
    try:
        async with asyncio.timeout(1.0):
            await request.app.state.ctx.redis.ping()
    except (RedisError, OSError, TimeoutError):
        return json_response({"status": "unavailable", "redis": "unreachable"}, 503, {"Retry-After": "5"})
    return json_response({"status": "ok", "redis": "ok"})
