"""The benchmark's server app: the product's producer app plus ``POST /bare``, a baseline endpoint on the same
framework and server that only reads the body and answers 202. The bare route exists only here, never in the
product. Served by ``bench/ingest.py`` as ``uvicorn ingest_app:app --app-dir bench --workers N``.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from producer.main import app


async def bare(request: Request) -> Response:
    """Read the body, answer 202: what any endpoint on this framework costs at least."""
    await request.body()
    return Response(status_code=202)


# Registered exactly like the product's routes (FastAPI add_api_route with a Request parameter), and placed
# just before the webhook route so that both cost the router the same to find.
app.add_api_route("/bare", bare, methods=["POST"], status_code=202)
_routes = app.router.routes
_routes.insert(
    next(i for i, r in enumerate(_routes) if getattr(r, "path", "") == "/webhooks/{account_id}"),
    _routes.pop(),
)

__all__ = ["app"]
