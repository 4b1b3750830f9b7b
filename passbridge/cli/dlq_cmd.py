"""``passbridge dlq list|show|replay|purge``: the dead-letter queue of every account.

Selections take the same filters everywhere: ``--account``, ``--code`` (a Klaviyo error code, an HTTP status or
an error kind seen in any attempt), ``--serial``, ``--since``/``--until`` (ISO 8601 or a relative age such as
``30m``, ``2h``, ``7d``). Operations on more than one entry ask for confirmation (``--yes`` skips it) and
show a progress bar; ``--json`` prints machine-readable output.

Entries are named by their DLQ id: the event id, or ``<event id>#2``, ``#3``, ... for a later entry of an event
id that is in the DLQ already (a client may send an event id again once the dedup window forgot it).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import typer

from passbridge.cli.common import console, emit_json, fail, out, run, running_redis, safe, settings

# Redis and the worker's modules are imported by the commands that use them: `--help` stays quick.
if TYPE_CHECKING:
    from redis.asyncio import Redis
    from rich.progress import TaskID

    from worker.dlq import DLQEntry, DLQFilter

app = typer.Typer(
    help="Dead-lettered events: inspect, replay into their serials, purge.", no_args_is_help=True
)

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

AccountOpt = typer.Option(None, "--account", "-a", help="Only this account (default: every account).")
CodeOpt = typer.Option(None, "--code", help="Error code, HTTP status or kind seen in any attempt.")
SerialOpt = typer.Option(None, "--serial", help="Only this pass serial.")
SinceOpt = typer.Option(None, "--since", help="Dead-lettered at/after: ISO 8601 or an age like 30m, 2h, 7d.")
UntilOpt = typer.Option(None, "--until", help="Dead-lettered at/before: ISO 8601 or an age like 30m, 2h, 7d.")
JsonOpt = typer.Option(False, "--json", help="Machine-readable output.")
YesOpt = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation.")
_IDS_HELP = "DLQ ids, as `dlq list` shows them (default: everything the filters select)."


def parse_when(text: str, *, now: datetime | None = None) -> int:
    """Epoch ms of ``text``: an ISO 8601 time (UTC when it has no offset) or an age (``90s``, ``30m``, ``7d``)."""
    now = now or datetime.now(UTC)
    m = _RELATIVE.match(text.strip())
    if m:
        return int((now.timestamp() - float(m.group(1)) * _UNIT_S[m.group(2)]) * 1000)
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is neither ISO 8601 (2026-11-25T10:00Z) nor an age (30m, 2h, 7d)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def _filter(code: str | None, serial: str | None, since: str | None, until: str | None) -> DLQFilter:
    from worker.dlq import DLQFilter

    return DLQFilter(
        code=code,
        serial=serial,
        since_ms=parse_when(since) if since else None,
        until_ms=parse_when(until) if until else None,
    )


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


async def _with_redis(fn: Callable[[Redis], Awaitable[Any]]) -> Any:
    # The DLQ holds no secrets, so no secret key is needed (or created) either.
    redis = running_redis()
    try:
        return await fn(redis)
    finally:
        await redis.aclose()


async def _accounts(redis: Redis, account: str | None) -> list[str]:
    """``account``, or every account the other operator tools show (removed ones with dead letters too)."""
    from worker import inspect

    if account:
        return [account]
    return await inspect.account_ids(redis)


async def _select(redis: Redis, account: str | None, flt: DLQFilter, ids: list[str]) -> dict[str, list[str]]:
    """account → DLQ ids chosen by explicit ids (looked up in every account unless --account) or filters."""
    from worker import dlq

    chosen: dict[str, list[str]] = {}
    for account_id in await _accounts(redis, account):
        if ids:
            found = [
                i for i in ids if (e := await dlq.get(redis, account_id, i)) is not None and flt.matches(e)
            ]
        else:
            found = await dlq.select_ids(redis, account_id, flt)
        if found:
            chosen[account_id] = found
    return chosen


@app.command("list")
def list_(
    account: str | None = AccountOpt,
    code: str | None = CodeOpt,
    serial: str | None = SerialOpt,
    since: str | None = SinceOpt,
    until: str | None = UntilOpt,
    limit: int = typer.Option(100, min=1, help="At most this many entries per account."),
    as_json: bool = JsonOpt,
) -> None:
    """Dead-lettered events, oldest first, with their last error and attempts (of the last run since a
    replay; "in all" counts every run)."""
    from rich.table import Table

    from worker import dlq
    from worker.inspect import dlq_summary

    flt = _filter(code, serial, since, until)

    async def go(redis: Redis) -> tuple[list[dict[str, Any]], dict[str, int]]:
        rows, totals = [], {}
        for account_id in await _accounts(redis, account):
            totals[account_id] = await dlq.count(redis, account_id)
            rows += [
                dlq_summary(account_id, e)
                for e in await dlq.list_entries(redis, account_id, flt, limit=limit)
            ]
        return rows, totals

    rows, totals = run(_with_redis(go))
    if as_json:
        emit_json({"entries": rows, "totals": totals})
        return
    if not rows:
        typer.echo("no dead-lettered events match")
        return
    table = Table("account")
    # The id is what `dlq show|replay|purge` take: never cut short, the other columns give way.
    width = min(80, max(len(r["dlq_id"]) for r in rows))
    table.add_column("id", no_wrap=True, min_width=width)
    for name in ("serial", "kind", "dead at", "attempts", "error", "reason"):
        table.add_column(name)
    for r in rows:
        table.add_row(
            safe(r["account"]),
            safe(r["dlq_id"]) + ("" if r["dlq_id"] == r["event_id"] else f"\n(event {safe(r['event_id'])})"),
            safe(r["serial"]),
            safe(r["kind"]),
            safe(r["dead_at"]),
            _attempts(r),
            safe(f"{r['status'] or ''} {r['code'] or ''}".strip()),
            safe(r["reason"][:80]),
        )
    out.print(table)
    out.print(
        f"{len(rows)} shown; in the DLQ: " + ", ".join(f"{safe(a)} {n}" for a, n in totals.items() if n)
    )


def _attempts(row: dict[str, Any]) -> str:
    last = "?" if row["attempts"] is None else str(row["attempts"])
    return last if row["attempts"] == row["attempts_total"] else f"{last} ({row['attempts_total']} in all)"


@app.command()
def show(
    dlq_id: str = typer.Argument(
        ..., help="The entry's DLQ id (its event id; <event id>#2, #3, ... for later entries of that id)."
    ),
    account: str | None = AccountOpt,
    as_json: bool = JsonOpt,
) -> None:
    """One entry in full: the event, the reason, every attempt's error and the event's history; and the
    other entries of its event id, if any."""
    from rich.table import Table

    from worker import dlq, history

    async def go(redis: Redis) -> tuple[str, DLQEntry, list[dict[str, Any]], list[DLQEntry]] | None:
        for account_id in await _accounts(redis, account):
            entry = await dlq.get(redis, account_id, dlq_id)
            if entry is not None:
                hist = await history.event_history(redis, account_id, entry.event_id, entry.serial)
                same = await dlq.entries_of(redis, account_id, [entry.event_id])
                others = [e for e in same if e.dlq_id != entry.dlq_id]
                return account_id, entry, [h.to_doc() for h in hist], others
        return None

    found = run(_with_redis(go))
    if found is None:
        fail(f"no dead-lettered event {dlq_id!r}" + (f" in account {account!r}" if account else ""))
    account_id, entry, hist, others = found
    same_id = [{"dlq_id": e.dlq_id, "dead_at": _iso(e.dead_at_ms)} for e in others]
    doc = {
        "account": account_id,
        **entry.to_doc(),
        "event": entry.event,
        "history": hist,
        "same_event_id": same_id,
    }
    doc.pop("member")
    if as_json:
        emit_json(doc)
        return
    title = safe(entry.dlq_id)
    if entry.dlq_id != entry.event_id:
        title += f" (event {safe(entry.event_id)})"
    out.print(f"[bold]{title}[/] (account {safe(account_id)}, serial {safe(entry.serial)})")
    out.print(f"dead-lettered {_iso(entry.dead_at_ms)} by {safe(entry.worker)}: {safe(entry.reason)}")
    last = "?" if entry.last_run_attempts is None else str(entry.last_run_attempts)
    out.print(
        f"attempts: {last} in its last run"
        + (f", {entry.total_attempts} in all ({entry.replays} replay(s) before)" if entry.replays else "")
    )
    for o in same_id:
        out.print(f"also in the DLQ with this event id: {safe(o['dlq_id'])} (dead-lettered {o['dead_at']})")
    # ASCII-only JSON: every control character (C1 included) is a \u escape, never sent to the terminal.
    out.print_json(data=entry.event, ensure_ascii=True)
    table = Table("time", "worker", "kind", "status", "code", "endpoint", "detail")
    for err in entry.errors:
        table.add_row(
            _iso(int(err.get("at_ms", 0))),
            safe(err.get("worker", "")),
            safe(err.get("kind", "")),
            safe(err.get("status") or ""),
            safe(err.get("code") or ""),
            safe(err.get("endpoint") or ""),
            safe(str(err.get("detail") or err.get("message") or "")[:100]),
        )
    out.print(table)
    for h in hist:
        out.print(f"  {_iso(int(h['at_ms']))} {safe(h['kind'])}")


def _bulk(
    verb: str,
    action: Callable[[Redis, str, list[str], Callable[[int], None]], Awaitable[int]],
    ids: list[str],
    account: str | None,
    flt: DLQFilter,
    everything: bool,
    yes: bool,
    as_json: bool,
) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from worker.dlq import DLQFilter

    if not ids and flt == DLQFilter() and not everything:
        fail(
            f"name the events to {verb}, narrow with filters (--code, --serial, --since, --until) or pass --all"
        )

    async def pick(redis: Redis) -> dict[str, list[str]]:
        return await _select(redis, account, flt, ids)

    chosen = run(_with_redis(pick))
    total = sum(len(v) for v in chosen.values())
    if total == 0:
        if as_json:
            emit_json({verb: 0, "selected": 0, "accounts": {}})
            return
        fail("no dead-lettered events match", code=1)
    if total > 1 and not yes:
        where = ", ".join(f"{a}: {len(v)}" for a, v in chosen.items())
        if not typer.confirm(f"{verb} {total} dead-lettered events ({where})?", err=True):
            fail("aborted")

    async def go(redis: Redis) -> dict[str, int]:
        done: dict[str, int] = {}
        with Progress(
            TextColumn(f"{verb} {{task.description}}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=total <= 1 or as_json,
        ) as progress:
            for account_id, dlq_ids in chosen.items():
                task = progress.add_task(account_id, total=len(dlq_ids))

                def advance(n: int, task: TaskID = task) -> None:
                    progress.advance(task, n)

                done[account_id] = await action(redis, account_id, dlq_ids, advance)
        return done

    done = run(_with_redis(go))
    if as_json:
        emit_json({verb: sum(done.values()), "selected": total, "accounts": done})
    else:
        typer.echo(f"{verb}: {sum(done.values())} of {total} selected")


@app.command()
def replay(
    dlq_ids: list[str] = typer.Argument(None, help=_IDS_HELP),
    account: str | None = AccountOpt,
    code: str | None = CodeOpt,
    serial: str | None = SerialOpt,
    since: str | None = SinceOpt,
    until: str | None = UntilOpt,
    everything: bool = typer.Option(False, "--all", help="Every entry (of --account, or of all accounts)."),
    yes: bool = YesOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Put entries back into their serials' mailboxes, in their original place in time.

    A replayed event older than what its serial has applied since is written as a metric event only:
    the pass's state never goes backwards.
    """
    from worker import dlq

    retention_ms = settings().history_retention_s * 1000

    async def action(redis: Redis, account_id: str, ids: list[str], progress: Callable[[int], None]) -> int:
        return await dlq.replay(
            redis, account_id, ids, history_retention_ms=retention_ms, by="cli", progress=progress
        )

    _bulk(
        "replayed",
        action,
        dlq_ids or [],
        account,
        _filter(code, serial, since, until),
        everything,
        yes,
        as_json,
    )


@app.command()
def purge(
    dlq_ids: list[str] = typer.Argument(None, help=_IDS_HELP),
    account: str | None = AccountOpt,
    code: str | None = CodeOpt,
    serial: str | None = SerialOpt,
    since: str | None = SinceOpt,
    until: str | None = UntilOpt,
    everything: bool = typer.Option(False, "--all", help="Every entry (of --account, or of all accounts)."),
    yes: bool = YesOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Delete entries for good (their events are not sent)."""
    from worker import dlq

    async def action(redis: Redis, account_id: str, ids: list[str], progress: Callable[[int], None]) -> int:
        return await dlq.purge(redis, account_id, ids, progress=progress)

    _bulk(
        "purged",
        action,
        dlq_ids or [],
        account,
        _filter(code, serial, since, until),
        everything,
        yes,
        as_json,
    )
