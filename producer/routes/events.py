"""``POST /v1/accounts/{account_id}/events`` (JSON, all-or-nothing) and ``.../events/ndjson`` (streaming)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import structlog
from starlette.requests import Request
from starlette.responses import Response

from passbridge import metrics
from passbridge.accounts import Account
from passbridge.event import PassEvent, utcnow
from producer.coding import RATIO_FLOOR, BadGzip, Gunzip, TooDense, bad_gzip
from producer.context import ProducerContext
from producer.ingest import ItemError, Rejections, to_event
from producer.problems import Problem, bad_json, unavailable, unprocessable
from producer.routes.common import (
    authenticate_ingest,
    content_is_gzip,
    count_skipped_events,
    enqueue_or_503,
    enqueue_prepared_or_503,
    json_response,
    read_body,
)

log = structlog.get_logger(__name__)

NDJSON_CHUNK = 500
MAX_NDJSON_LINE = 256 * 1024


async def post_events(request: Request) -> Response:
    """One canonical event or an array of up to ``max_batch_events``; all-or-nothing."""
    ctx: ProducerContext = request.app.state.ctx
    account = await authenticate_ingest(request, ctx)
    body = await read_body(request, ctx.settings.max_body_bytes, gzip_ok=True)
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

    results = await publish_events(ctx, account, events)
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


async def publish_one(
    ctx: ProducerContext, account: Account, build: Callable[[], PassEvent]
) -> dict[str, Any]:
    """Enqueue the one event ``build()`` returns; its result as :func:`publish_events` reports it.

    ``build`` (for a webhook, its verification and normalization; a Google callback's event is built before)
    runs in the publisher, back to back with the other requests' (``Publisher.publish_prepared``); a problem it
    raises is this request's answer, and nothing is enqueued then.
    """
    built: list[PassEvent] = []

    def prepare() -> tuple[PassEvent, ...]:
        event = build()
        built.append(event)
        return (event,) if account.syncs(event.pass_type) else ()

    flags = await enqueue_prepared_or_503(ctx, account.account_id, prepare)
    if not flags:  # a pass type this account does not sync: skipped, and counted as such
        return (await publish_events(ctx, account, built))[0]
    return _outcome(built[0], flags[0])


def _outcome(event: PassEvent, fresh: bool) -> dict[str, Any]:
    return {
        "event_id": event.event_id,
        "status": "accepted" if fresh else "duplicate",
        "duplicate": not fresh,
    }


async def publish_events(
    ctx: ProducerContext, account: Account, events: list[PassEvent]
) -> list[dict[str, Any]]:
    """Enqueue the events of synced pass types; report each as accepted, duplicate or skipped."""
    synced = [e for e in events if account.syncs(e.pass_type)]
    flags = iter(await enqueue_or_503(ctx, account.account_id, synced))
    if len(synced) < len(events):
        await count_skipped_events(
            ctx, account.account_id, [e.pass_type for e in events if not account.syncs(e.pass_type)]
        )
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
            out.append(_outcome(ev, next(flags)))
    return out


@dataclass
class _Batch:
    """NDJSON events on their way to Redis, and the line the first of them came from."""

    first_line: int
    events: list[PassEvent] = field(default_factory=list)


@dataclass
class _Tally:
    lines: int = 0
    accepted: int = 0
    duplicates: int = 0
    skipped: int = 0
    rejected: Rejections = field(default_factory=Rejections)

    def part_way(self, resume_after_line: int) -> dict[str, Any]:
        """What an upload that ended part-way reports: the counts so far, the rejected lines up to the resume
        point (the client will not send those again, so they must not go unreported; later ones come back with
        the retry, and are not counted in ``rejected_count`` either), and where to resume."""
        return {
            "lines_read": self.lines,
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "skipped": self.skipped,
            **self.rejected.report(resume_after_line),
            "resume_after_line": resume_after_line,
        }


async def _publish_batch(ctx: ProducerContext, account: Account, batch: _Batch, tally: _Tally) -> None:
    """Enqueue one NDJSON batch and count the outcome; a 503 says from which line to resume."""
    synced = batch.events
    if account.sync_pass_types:
        synced = [e for e in batch.events if account.syncs(e.pass_type)]
    try:
        flags = await enqueue_or_503(ctx, account.account_id, synced)
    except Problem as exc:
        # Lines before this batch stay accepted; the client resumes after them.
        exc.extra.update(tally.part_way(batch.first_line - 1))
        raise
    fresh = sum(flags)
    tally.accepted += fresh
    tally.duplicates += len(flags) - fresh
    if len(synced) < len(batch.events):
        await count_skipped_events(
            ctx, account.account_id, [e.pass_type for e in batch.events if not account.syncs(e.pass_type)]
        )
    tally.skipped += len(batch.events) - len(synced)


def _gzip_broken(exc: BadGzip, tally: _Tally, line: int, account_id: str) -> Problem:
    """The 400 for NDJSON whose gzip data went bad part-way, in the shape of a 503 part-way: every line
    before ``resume_after_line`` was taken (accepted, a duplicate, skipped, or listed in ``rejected``)."""
    log.info("ndjson gzip data invalid", account_id=account_id, offset=exc.offset, line=line)
    problem = bad_gzip(exc)
    problem.detail = (
        f"the gzip data is invalid at or after byte {exc.offset} of the body, in line {line}: {exc.reason}; "
        f"the {tally.lines} line(s) before were read"
    )
    problem.errors = [{"pointer": "", "field": "(body)", "detail": problem.detail}]
    problem.extra.update({"gzip_offset": exc.offset, "line": line, **tally.part_way(tally.lines)})
    return problem


def _too_dense(exc: TooDense, tally: _Tally, line: int, account_id: str) -> Problem:
    """The 413 for gzip NDJSON that inflates more than ``PASSBRIDGE_GZIP_MAX_RATIO`` allows, in the shape of a
    503 part-way: every line before ``resume_after_line`` was taken; the piece that went over was not read."""
    log.info(
        "ndjson gzip data over the ratio limit",
        account_id=account_id,
        offset=exc.offset,
        inflated=exc.inflated,
        line=line,
    )
    detail = (
        f"the gzip data inflated to {exc.inflated} bytes from the first {exc.offset} bytes of the body, more "
        f"than {exc.max_ratio} times as many (the limit past {RATIO_FLOOR} decompressed bytes, "
        f"PASSBRIDGE_GZIP_MAX_RATIO), in line {line}; the {tally.lines} line(s) before were read; send the "
        "lines after resume_after_line again, less compressed or not compressed"
    )
    return Problem(
        413,
        "gzip-ratio-exceeded",
        "gzip data inflates too much",
        detail,
        errors=[{"pointer": "", "field": "(body)", "detail": detail}],
        extra={
            "gzip_offset": exc.offset,
            "decompressed_bytes": exc.inflated,
            "max_ratio": exc.max_ratio,
            "line": line,
            **tally.part_way(tally.lines),
        },
    )


class _Stopping(Exception):
    """The server was told to stop while an NDJSON upload was being read."""


async def _until_stopping(chunks: AsyncIterator[bytes], stopping: asyncio.Event) -> AsyncIterator[bytes]:
    """``chunks``, but a stop of the server raises :class:`_Stopping` at once, even while the next chunk is
    still on its way (a slow sender's upload could otherwise hold the shutdown until its grace runs out)."""
    stop = asyncio.ensure_future(stopping.wait())
    try:
        while True:
            # One task per network chunk (tens of KB, hundreds of lines): nothing next to parsing them.
            chunk = asyncio.ensure_future(anext(chunks))
            await asyncio.wait((chunk, stop), return_when=asyncio.FIRST_COMPLETED)
            if stop.done():
                chunk.cancel()
                raise _Stopping
            try:
                yield chunk.result()
            except StopAsyncIteration:
                return
    finally:
        stop.cancel()


def _stopped(tally: _Tally, account_id: str, retry_after_s: int) -> Problem:
    """The 503 for an NDJSON upload the server stopped reading because it is shutting down, in the shape of a
    503 part-way: every line before ``resume_after_line`` was taken (the unfinished line after them was not)."""
    log.info("ndjson upload ended by shutdown", account_id=account_id, lines=tally.lines)
    problem = unavailable(
        f"the server is shutting down: the {tally.lines} line(s) read were taken; "
        "send the lines after resume_after_line again",
        retry_after_s,
        kind="shutting-down",
    )
    problem.extra.update(tally.part_way(tally.lines))
    return problem


def _line_errors(detail: str) -> list[dict[str, Any]]:
    return [{"pointer": "", "field": "(line)", "detail": detail}]


async def post_ndjson(request: Request) -> Response:
    """Streaming NDJSON backfill: valid lines are accepted, rejected ones reported with line numbers.

    Lines are validated as they arrive and enqueued in batches of ``NDJSON_CHUNK``. While one batch is in
    Redis the next is being validated (one batch in flight at a time, so batches reach Redis in file order).
    """
    ctx: ProducerContext = request.app.state.ctx
    account = await authenticate_ingest(request, ctx)
    # The ratio guard bounds what one compressed byte can cost here, since no total limit does (backfills run
    # to millions of lines); the events route's body limit already bounds its whole body.
    gunzip = Gunzip(max_ratio=ctx.settings.gzip_max_ratio) if content_is_gzip(request) else None
    region = ctx.settings.default_phone_region
    tally = _Tally(rejected=Rejections(ctx.settings.ndjson_rejected_details))
    rejected = tally.rejected
    batch = _Batch(1)
    in_flight: asyncio.Task[None] | None = None
    buffer = b""
    # Inside a line already reported as too long: its bytes up to and including its "\n" are dropped, so its
    # tail is neither taken as a line of its own nor shifts the line numbers (and resume_after_line) after it.
    discarding = False
    received = utcnow()

    def take(line: bytes) -> None:
        tally.lines += 1
        # A rejected line's errors are built only while they are still reported (Rejections).
        if len(line) > MAX_NDJSON_LINE:  # before the blank check: a long line's head may be all whitespace
            too_long = f"line longer than {MAX_NDJSON_LINE} bytes"
            rejected.add(tally.lines, _line_errors(too_long) if rejected.wants_details else [])
            return
        if not line.strip():
            return
        try:
            raw = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            rejected.add(tally.lines, _line_errors(str(exc)) if rejected.wants_details else [])
            return
        try:
            event = to_event(
                raw,
                account=account,
                source="ndjson",
                received_at=received,
                default_region=region,
                details=rejected.wants_details,
            )
        except ItemError as exc:
            rejected.add(tally.lines, exc.errors)
            return
        if not batch.events:
            batch.first_line = tally.lines
        batch.events.append(event)

    async def send() -> None:
        nonlocal batch, in_flight
        if in_flight is not None:
            await in_flight
        in_flight = asyncio.create_task(_publish_batch(ctx, account, batch, tally))
        batch = _Batch(tally.lines + 1)

    broken: BadGzip | None = None
    dense: TooDense | None = None
    stopped = False
    try:
        try:
            async for chunk in _until_stopping(request.stream(), ctx.stopping):
                received = utcnow()  # the receive time of the lines in this chunk
                for piece in (chunk,) if gunzip is None else gunzip.feed(chunk):
                    if gunzip is not None:  # a chunk may inflate 1000-fold: let other requests run meanwhile
                        await asyncio.sleep(0)
                    if discarding:
                        end = piece.find(b"\n")
                        if end < 0:
                            continue
                        piece = piece[end + 1 :]
                        discarding = False
                    buffer += piece
                    if b"\n" not in buffer:
                        # Too long whatever follows: report it now, drop the rest.
                        if len(buffer) > MAX_NDJSON_LINE:
                            take(buffer)
                            buffer = b""
                            discarding = True
                        continue
                    *complete, buffer = buffer.split(b"\n")
                    for line in complete:
                        take(line)
                        # A network chunk may hold thousands of lines.
                        if len(batch.events) >= NDJSON_CHUNK:
                            await send()
            if gunzip is not None:
                gunzip.close()
        except BadGzip as exc:
            # The lines complete before the bad data are kept, as a 503 keeps the batches before it; the
            # unfinished line after them is dropped (its end never arrived).
            broken = exc
            buffer = b""
        except TooDense as exc:
            # As for bad data: the lines complete before the piece that went over are kept, the rest dropped.
            dense = exc
            buffer = b""
        except _Stopping:
            # The lines read so far are taken (enqueued just below) and the client is told where to resume; the
            # unfinished line after them is dropped, as for gzip data gone bad.
            stopped = True
            buffer = b""
        if buffer:
            take(buffer)
        if batch.events:
            await send()
        if in_flight is not None:
            await in_flight
    finally:
        if in_flight is not None and not in_flight.done():
            in_flight.cancel()
    if stopped:
        raise _stopped(tally, account.account_id, ctx.settings.retry_after_s)
    if broken is not None:
        raise _gzip_broken(broken, tally, tally.lines if discarding else tally.lines + 1, account.account_id)
    if dense is not None:
        raise _too_dense(dense, tally, tally.lines if discarding else tally.lines + 1, account.account_id)
    metrics.rejected("invalid-line", len(rejected))
    log.info(
        "ndjson ingested",
        account_id=account.account_id,
        lines=tally.lines,
        accepted=tally.accepted,
        duplicates=tally.duplicates,
        rejected=len(rejected),
    )
    return json_response(
        {
            "lines": tally.lines,
            "accepted": tally.accepted,
            "duplicates": tally.duplicates,
            "skipped": tally.skipped,
            **rejected.report(),
        },
        200,
    )
