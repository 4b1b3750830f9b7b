"""``POST /v1/accounts/{account_id}/events`` (JSON, all-or-nothing) and ``.../events/ndjson`` (streaming)."""

from __future__ import annotations

from typing import Any

import orjson
import structlog
from starlette.requests import Request
from starlette.responses import Response

from passbridge import metrics
from passbridge.accounts import Account
from passbridge.event import PassEvent, utcnow
from producer.context import ProducerContext
from producer.ingest import ItemError, to_event
from producer.problems import Problem, bad_json, unprocessable
from producer.routes.common import authenticate_ingest, enqueue_or_503, json_response, read_body

log = structlog.get_logger(__name__)

NDJSON_CHUNK = 500
MAX_NDJSON_LINE = 256 * 1024


async def post_events(request: Request) -> Response:
    """One canonical event or an array of up to ``max_batch_events``; all-or-nothing."""
    ctx: ProducerContext = request.app.state.ctx
    account = await authenticate_ingest(request, ctx)
    body = await read_body(request, ctx.settings.max_body_bytes)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise bad_json(str(exc)) from None
    single = isinstance(doc, dict)
    items: list[Any] = [doc] if single else doc
    if not isinstance(items, list):
        raise unprocessable(
            [{"pointer": "", "field": "(body)", "detail": "expected an event object or an array"}]
        )
    limit = ctx.settings.max_batch_events
    if len(items) > limit:
        raise Problem(
            413, "too-many-events", "Too many events", f"at most {limit} events per request, got {len(items)}"
        )
    if not items:
        raise unprocessable([{"pointer": "", "field": "(body)", "detail": "the array is empty"}])

    received = utcnow()
    errors: list[dict[str, Any]] = []
    events: list[PassEvent] = []
    first_index: dict[str, int] = {}
    for i, raw in enumerate(items):
        prefix: tuple[str | int, ...] = () if single else (i,)
        try:
            ev = to_event(
                raw,
                account=account,
                source="api",
                received_at=received,
                default_region=ctx.settings.default_phone_region,
                prefix=prefix,
            )
        except ItemError as exc:
            errors += exc.errors
            continue
        if ev.event_id in first_index:
            errors.append(
                {
                    "pointer": f"/{i}/event_id",
                    "field": f"{i}.event_id",
                    "detail": f"repeats the event_id of item {first_index[ev.event_id]}",
                }
            )
            continue
        first_index[ev.event_id] = i
        events.append(ev)
    if errors:
        raise unprocessable(errors)

    results = await _publish(ctx, account, events)
    if single:
        return json_response(results[0], 202)
    return json_response(
        {
            "accepted": sum(1 for r in results if r["status"] == "accepted"),
            "duplicates": sum(1 for r in results if r["status"] == "duplicate"),
            "skipped": sum(1 for r in results if r["status"] == "skipped"),
            "results": results,
        },
        202,
    )


async def _publish(ctx: ProducerContext, account: Account, events: list[PassEvent]) -> list[dict[str, Any]]:
    """Enqueue the events of synced pass types; report each as accepted, duplicate or skipped."""
    synced = [e for e in events if account.syncs(e.pass_type)]
    flags = iter(await enqueue_or_503(ctx, account.account_id, synced))
    out = []
    for ev in events:
        if not account.syncs(ev.pass_type):
            out.append(
                {
                    "event_id": ev.event_id,
                    "status": "skipped",
                    "duplicate": False,
                    "reason": f"pass type {ev.pass_type} is not synced for this account",
                }
            )
        else:
            fresh = next(flags)
            out.append(
                {
                    "event_id": ev.event_id,
                    "status": "accepted" if fresh else "duplicate",
                    "duplicate": not fresh,
                }
            )
    return out


async def post_ndjson(request: Request) -> Response:
    """Streaming NDJSON backfill: valid lines are accepted, rejected ones reported with line numbers."""
    ctx: ProducerContext = request.app.state.ctx
    account = await authenticate_ingest(request, ctx)
    region = ctx.settings.default_phone_region
    lines = accepted = duplicates = skipped = 0
    rejected: list[dict[str, Any]] = []
    pending: list[PassEvent] = []
    buffer = b""

    async def flush() -> None:
        nonlocal accepted, duplicates, skipped, pending
        batch, pending = pending, []
        try:
            results = await _publish(ctx, account, batch)
        except Problem as exc:
            # What was accepted before stays accepted; tell the client where to resume.
            exc.extra.update(
                {
                    "lines_read": lines,
                    "accepted": accepted,
                    "duplicates": duplicates,
                    "resume_after_line": lines - len(batch),
                }
            )
            raise
        for r in results:
            if r["status"] == "accepted":
                accepted += 1
            elif r["status"] == "duplicate":
                duplicates += 1
            else:
                skipped += 1

    def take(line: bytes) -> None:
        nonlocal lines
        lines += 1
        if not line.strip():
            return
        if len(line) > MAX_NDJSON_LINE:
            rejected.append(
                {
                    "line": lines,
                    "errors": [
                        {
                            "pointer": "",
                            "field": "(line)",
                            "detail": f"line longer than {MAX_NDJSON_LINE} bytes",
                        }
                    ],
                }
            )
            return
        try:
            raw = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            rejected.append(
                {"line": lines, "errors": [{"pointer": "", "field": "(line)", "detail": str(exc)}]}
            )
            return
        try:
            pending.append(
                to_event(raw, account=account, source="ndjson", received_at=utcnow(), default_region=region)
            )
        except ItemError as exc:
            rejected.append({"line": lines, "errors": exc.errors})

    async for chunk in request.stream():
        buffer += chunk
        if b"\n" not in buffer:
            if len(buffer) > MAX_NDJSON_LINE * 2:
                take(buffer)  # reported as too long
                buffer = b""
            continue
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            take(line)
        if len(pending) >= NDJSON_CHUNK:
            await flush()
    if buffer:
        take(buffer)
    if pending:
        await flush()
    metrics.rejected("invalid-line", len(rejected))
    log.info(
        "ndjson ingested",
        account_id=account.account_id,
        lines=lines,
        accepted=accepted,
        duplicates=duplicates,
        rejected=len(rejected),
    )
    return json_response(
        {
            "lines": lines,
            "accepted": accepted,
            "duplicates": duplicates,
            "skipped": skipped,
            "rejected": rejected,
        },
        200,
    )
