"""``passbridge ingest FILE.ndjson --account A``: backfill straight into Redis with a progress bar."""

from __future__ import annotations

from collections.abc import Iterator
from io import BufferedIOBase
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from passbridge.cli.common import console, emit_json, fail, redis_problem, redis_url, run, safe, settings

# Redis, the account store and the producer are imported when the command runs: `--help` stays quick.
if TYPE_CHECKING:
    from producer.api import PublishSummary
    from producer.ingest import Rejections


#: The first bytes of every gzip member (RFC 1952).
GZIP_MAGIC = b"\x1f\x8b"


def _gzipped(path: Path) -> bool:
    """Whether ``path`` holds gzip data, told by its magic bytes whatever its name."""
    with path.open("rb") as fh:
        return fh.read(2) == GZIP_MAGIC


def _open(path: Path) -> BufferedIOBase:
    """The file's lines as bytes: a gzip file is decompressed as it is read, as the NDJSON route does with
    ``Content-Encoding: gzip`` (several members decode as ``gzip -d`` decodes them)."""
    import gzip

    return gzip.open(path, "rb") if _gzipped(path) else path.open("rb")


def _count_lines(path: Path) -> int | None:
    """Lines in the file, for the progress bar; ``None`` when gzip data cannot be read to its end."""
    import gzip
    import zlib

    try:
        with _open(path) as fh:
            return sum(1 for _ in fh)
    except (gzip.BadGzipFile, EOFError, zlib.error):
        return None  # _lines reports where it breaks


def _lines(path: Path, broken: list[str]) -> Iterator[Any]:
    """Each line of ``path`` read as JSON; a line that is not JSON as the ItemError that rejects it. gzip data
    that is cut short or corrupt ends the lines there, with why in ``broken``."""
    import gzip
    import zlib

    import orjson

    from producer.ingest import ItemError

    number = 0
    with _open(path) as fh:
        lines = iter(fh)
        while True:
            try:
                line = next(lines)
            except StopIteration:
                return
            except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
                # The lines whole before the damage are enqueued; the caller reports where to resume.
                why = "is cut short" if isinstance(exc, EOFError) else f"is corrupt ({exc})"
                broken.append(f"the gzip data {why} after line {number}")
                return
            number += 1
            if not line.strip():
                yield None  # keeps line numbers aligned; rejected as "empty"
                continue
            try:
                yield orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                yield ItemError([{"pointer": "", "field": "(line)", "detail": str(exc)}])


def ingest(
    file: Path = typer.Argument(
        ..., exists=True, dir_okay=False, readable=True, help="NDJSON, one event a line (or gzip of it)."
    ),
    account: str = typer.Option(..., "--account", "-a", help="Account id."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Validate and enqueue every line of FILE for ACCOUNT; rejected lines are listed with their numbers (and
    their errors, for the first PASSBRIDGE_NDJSON_REJECTED_DETAILS of them)."""
    from redis.asyncio import Redis
    from redis.exceptions import RedisError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from passbridge.accounts import AccountNotFound, AccountStore
    from passbridge.crypto import cipher_from_settings
    from passbridge.queue import BacklogFull
    from producer.api import PublishSummary, publish_iter
    from producer.ingest import Rejections

    s = settings()
    url = redis_url(s)
    total = _count_lines(file)
    stopped: list[str] = []  # why the file stopped part-way (the backlog is full, Redis went away, bad gzip)

    async def go() -> PublishSummary:
        redis = Redis.from_url(url)
        try:
            store = AccountStore(redis, cipher_from_settings(s))
            try:
                acct = await store.get(account)
            except AccountNotFound:
                fail(f"no account {account!r}; create it with `passbridge accounts add {account}`")
            summary = PublishSummary(rejected=Rejections(s.ndjson_rejected_details))
            with Progress(
                TextColumn("ingest"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=console,
                disable=as_json,
            ) as bar:
                task = bar.add_task("ingest", total=total)
                try:
                    async for done in publish_iter(
                        redis,
                        acct,
                        _lines(file, stopped),
                        summary,
                        source="ndjson",
                        default_region=s.default_phone_region,
                        high_water=s.backlog_high_water,
                        dedup_window_s=s.dedup_ttl_s,
                    ):
                        bar.update(task, completed=done)
                except BacklogFull as exc:
                    stopped.append(f"{exc}; let the workers drain it")
                except RedisError as exc:
                    stopped.append(redis_problem(exc, url))
            return summary
        finally:
            await redis.aclose()

    summary = run(go())
    if stopped:
        _stopped(file, account, summary, stopped[0], as_json)
    doc = {
        "file": str(file),
        "account": account,
        "lines": summary.total,
        "accepted": summary.accepted,
        "duplicates": summary.duplicates,
        "skipped": summary.skipped,
        **summary.rejected.report(),
    }
    if as_json:
        emit_json(doc)
    else:
        console.print(
            f"{summary.accepted} accepted, {summary.duplicates} duplicates, {summary.skipped} skipped, "
            f"{len(summary.rejected)} rejected"
        )
        _print_rejected(summary.rejected)
    if summary.rejected:
        raise typer.Exit(2)


def _print_rejected(rejected: Rejections) -> None:
    """The first 20 rejected lines, with their errors where they were kept."""
    for r in islice(rejected.entries(), 20):
        errors = r.get("errors")
        if errors:
            reason = "; ".join(f"{e['field']}: {e['detail']}" for e in errors)
        else:
            reason = f"(errors listed for the first {rejected.details} rejected lines only)"
        console.print(f"  line {r['line']}: " + safe(reason))


def _rest_command(file: Path, through: int) -> str:
    """A shell line writing the lines after ``through`` to rest.ndjson (decompressing a gzip file)."""
    import shlex

    rest = f"tail -n +{through + 1}"
    read = (
        f"gzip -dc {shlex.quote(str(file))} | {rest}"
        if _gzipped(file)
        else f"{rest} {shlex.quote(str(file))}"
    )
    return safe(f"{read} > rest.ndjson")


def _stopped(file: Path, account: str, summary: PublishSummary, reason: str, as_json: bool) -> NoReturn:
    """Report a file that stopped part-way: what is in Redis so far and the line to resume after, exit 1.

    Lines after ``settled_through`` were not enqueued (their batch failed as a whole); running the command
    again on the rest of the file, or on the whole file, adds no duplicates: the dedup window drops them.
    """
    through = summary.settled_through
    rejected = summary.rejected.report(through)
    if as_json:
        emit_json(
            {
                "file": str(file),
                "account": account,
                "stopped": reason,
                "resume_after_line": through,
                "accepted": summary.accepted,
                "duplicates": summary.duplicates,
                **rejected,
            }
        )
    else:
        console.print(f"[bold red]error:[/] stopped after line {through}: {safe(reason)}")
        console.print(
            f"{summary.accepted} accepted, {summary.duplicates} duplicates, {rejected['rejected_count']} rejected "
            "so far; "
            f"resume after line {through} (e.g. {_rest_command(file, through)})"
        )
    raise typer.Exit(1)
