"""``passbridge dlq list|show|replay|purge``: the dead-letter queue of every account.

Selections take the same filters everywhere: ``--account``, ``--code`` (a Klaviyo error code, an HTTP status or
an error kind seen in any attempt), ``--serial``, ``--since``/``--until`` (ISO 8601 or a relative age such as
``30m``, ``2h``, ``7d``). Operations on more than one entry ask for confirmation (``--yes`` skips it) and
show a progress bar; ``--json`` prints machine-readable output.

Entries are named by their DLQ id: the event id, or ``<event id>#2``, ``#3``, ... for a later entry of an event
id that is in the DLQ already (a client may send an event id again once the dedup window forgot it).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import typer

from passbridge.cli.common import console, emit_json, fail, out, run, running_redis, safe, settings

# Redis and the worker's modules are imported by the commands that use them: `--help` stays quick.
if TYPE_CHECKING:
    from redis.asyncio import Redis
    from rich.progress import Progress, TaskID

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


def _choose(
    verb: str,
    ids: list[str],
    account: str | None,
    flt: DLQFilter,
    everything: bool,
    yes: bool,
    as_json: bool,
    notes: Callable[[Redis, dict[str, list[str]]], Awaitable[list[str]]] | None = None,
) -> dict[str, list[str]]:
    """The entries an operation acts on (account → ids, oldest first), confirmed when more than one; exit 1
    when nothing matches (with ``--json``, after the empty result). ``notes`` adds lines shown before the
    confirmation."""
    from worker.dlq import DLQFilter

    # ``verb`` is the past tense the results are reported in ("replayed"); questions ask in the present.
    act = {"replayed": "replay", "purged": "purge"}.get(verb, verb)
    if not ids and flt == DLQFilter() and not everything:
        fail(
            f"name the events to {act}, narrow with filters (--code, --serial, --since, --until) or pass --all"
        )

    async def pick(redis: Redis) -> tuple[dict[str, list[str]], list[str]]:
        chosen = await _select(redis, account, flt, ids)
        return chosen, await notes(redis, chosen) if notes and chosen else []

    picked: tuple[dict[str, list[str]], list[str]] = run(_with_redis(pick))
    chosen, lines = picked
    total = sum(len(v) for v in chosen.values())
    if total == 0:
        if as_json:
            # The document a script parses, and the exit code a person gets: `--json` changes the output's
            # format, never whether the command failed (as `klaviyo show --json` does for an account not set up).
            emit_json({verb: 0, "selected": 0, "accounts": {}})
        fail("no dead-lettered events match", code=1)
    for line in lines:
        console.print(safe(line))
    if total > 1 and not yes:
        where = ", ".join(f"{a}: {len(v)}" for a, v in chosen.items())
        if not typer.confirm(f"{act} {total} dead-lettered events ({where})?", err=True):
            fail("aborted")
    return chosen


def _progress(verb: str, total: int, as_json: bool) -> Progress:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn(f"{verb} {{task.description}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=total <= 1 or as_json,
    )


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
    chosen = _choose(verb, ids, account, flt, everything, yes, as_json)
    total = sum(len(v) for v in chosen.values())

    async def go(redis: Redis) -> dict[str, int]:
        done: dict[str, int] = {}
        with _progress(verb, total, as_json) as progress:
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


#: How often a waiting replay looks at the backlogs it waits on.
WAIT_POLL_S = 0.5


def _wave_size(left: int, limit: int) -> int:
    """Room a waiting replay waits for before its next wave: a whole chunk (or all that is left; a tenth of a
    small replay limit), not a single freed slot, so the replay does not chase each slot under its limit the
    moment a worker frees it."""
    from worker.dlq import CHUNK

    return max(1, min(left, CHUNK, limit // 10))


@dataclass(slots=True)
class _Waves:
    """A replay in waves: what each account got back, what is still in the DLQ and why."""

    replayed: dict[str, int] = field(default_factory=dict)
    left: dict[str, list[str]] = field(default_factory=dict)
    #: The account's pending events when its last wave found no room under the replay limit.
    full: dict[str, int] = field(default_factory=dict)
    interrupted: bool = False


async def _replay_waves(
    redis: Redis,
    chosen: dict[str, list[str]],
    *,
    high_water: int,
    reserve: float,
    retention_ms: int,
    wait: bool,
    progress: Progress,
) -> _Waves:
    """Replay ``chosen`` as far as each account's replay limit allows (its high-water mark less the
    ``reserve`` kept for live ingest); with ``wait``, again whenever the workers have drained a wave's worth
    under the limit, until everything is back or Ctrl-C (SIGINT) stops it between two atomic steps (what was
    replayed stays replayed, the rest stays in the DLQ)."""
    import asyncio
    import signal

    from passbridge.settings import replay_limit
    from worker import dlq, pause

    limit = replay_limit(high_water, reserve)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    state = _Waves(replayed=dict.fromkeys(chosen, 0), left=dict(chosen))
    tasks = {a: progress.add_task(a, total=len(ids)) for a, ids in chosen.items()}
    announced: set[str] = set()
    try:
        while state.left and not stop.is_set():
            for account_id in list(state.left):
                task = tasks[account_id]
                progress.update(task, description=account_id)

                def advance(n: int, task: TaskID = task) -> None:
                    progress.advance(task, n)

                outcome = await dlq.replay(
                    redis,
                    account_id,
                    state.left[account_id],
                    high_water=high_water,
                    reserve=reserve,
                    history_retention_ms=retention_ms,
                    by="cli",
                    progress=advance,
                    stop=stop.is_set,
                )
                state.replayed[account_id] += outcome.replayed
                state.left[account_id] = outcome.left
                if not outcome.left:
                    del state.left[account_id]
                    state.full.pop(account_id, None)
                elif outcome.full:
                    state.full[account_id] = outcome.depth
            if not state.left or not wait or stop.is_set():
                break
            for account_id in state.full.keys() - announced:
                announced.add(account_id)
                paused = await pause.get_pause(redis, account_id)
                console.print(
                    safe(
                        f"account {account_id}'s backlog has reached its replay limit ({state.full[account_id]} "
                        f"pending; a replay fills it up to {dlq.limit_text(high_water, reserve)}): waiting for "
                        "the workers to drain it, then replaying the rest in waves (Ctrl-C stops; what is "
                        "replayed stays replayed, the rest stays in the DLQ)"
                        + (
                            f"; it is paused ({paused.reason}), so nothing drains until "
                            f"`passbridge engine resume {account_id}`"
                            if paused
                            else ""
                        )
                    )
                )
            while not stop.is_set():
                depths = {a: await dlq.depth(redis, a) for a in state.left}
                if any(limit - d >= _wave_size(len(state.left[a]), limit) for a, d in depths.items()):
                    break
                for a, d in depths.items():
                    state.full[a] = d
                    progress.update(
                        tasks[a], description=f"{a} (waiting for room: {d} pending, replay limit {limit})"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), WAIT_POLL_S)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    state.interrupted = stop.is_set() and bool(state.left)
    return state


@app.command()
def replay(
    dlq_ids: list[str] = typer.Argument(None, help=_IDS_HELP),
    account: str | None = AccountOpt,
    code: str | None = CodeOpt,
    serial: str | None = SerialOpt,
    since: str | None = SinceOpt,
    until: str | None = UntilOpt,
    everything: bool = typer.Option(False, "--all", help="Every entry (of --account, or of all accounts)."),
    wait: bool = typer.Option(
        True,
        "--wait/--no-wait",
        help="When an account's backlog reaches its replay limit (PASSBRIDGE_BACKLOG_HIGH_WATER less "
        "PASSBRIDGE_REPLAY_RESERVE): wait for the workers to drain it and go on in waves (default), or stop there "
        "and leave the rest in the DLQ.",
    ),
    yes: bool = YesOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Put entries back into their serials' mailboxes, in their original place in time, oldest first.

    A replay fills an account's pending events only up to its replay limit: PASSBRIDGE_BACKLOG_HIGH_WATER
    (ingest answers 503 beyond it) less the share PASSBRIDGE_REPLAY_RESERVE kept for live ingest. It replays
    what fits, then waits for the workers to drain the backlog and goes on in waves; with --no-wait it stops
    there. Exits 1 when entries were left in the DLQ (130 after Ctrl-C).

    A replayed event older than what its serial has applied since is written as a metric event only:
    the pass's state never goes backwards.
    """
    from worker import dlq

    s = settings()
    high_water, reserve, retention_ms = s.backlog_high_water, s.replay_reserve, s.history_retention_s * 1000

    async def room_notes(redis: Redis, chosen: dict[str, list[str]]) -> list[str]:
        lines = []
        for account_id, ids in chosen.items():
            room = max(0, s.replay_limit - await dlq.depth(redis, account_id))
            if len(ids) > room:
                then = "the rest waits for the workers to drain it" if wait else "the rest stays in the DLQ"
                lines.append(
                    f"account {account_id}: room for {room} of its {len(ids)} selected entries under its "
                    f"replay limit ({dlq.limit_text(high_water, reserve)}); {then}"
                )
        return lines

    chosen = _choose(
        "replayed",
        dlq_ids or [],
        account,
        _filter(code, serial, since, until),
        everything,
        yes,
        as_json,
        notes=room_notes,
    )
    total = sum(len(v) for v in chosen.values())

    async def go(redis: Redis) -> _Waves:
        with _progress("replayed", total, as_json) as progress:
            return await _replay_waves(
                redis,
                chosen,
                high_water=high_water,
                reserve=reserve,
                retention_ms=retention_ms,
                wait=wait,
                progress=progress,
            )

    waves: _Waves = run(_with_redis(go))
    replayed = sum(waves.replayed.values())
    left = {a: len(ids) for a, ids in waves.left.items()}
    if as_json:
        emit_json(
            {
                "replayed": replayed,
                "selected": total,
                "accounts": waves.replayed,
                "left": left,
                "interrupted": waves.interrupted,
            }
        )
    else:
        typer.echo(f"replayed: {replayed} of {total} selected")
    for account_id, n in left.items():
        if waves.interrupted:
            console.print(
                safe(f"stopped: {n} of account {account_id}'s selected entries are still in the DLQ")
            )
        else:
            console.print(
                safe(
                    dlq.backlog_full_message(
                        account_id, waves.full.get(account_id, s.replay_limit), high_water, reserve, n
                    )
                    + "; replay them once the workers have drained it (without --no-wait, the replay waits)"
                )
            )
    if waves.interrupted:
        raise typer.Exit(130)
    if left:
        raise typer.Exit(1)


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
