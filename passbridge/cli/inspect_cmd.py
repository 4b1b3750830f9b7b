"""``passbridge status|serial|event|report``: what is stuck, where and why — read through ``worker.inspect``.

Every command prints tables for people and, with ``--json``, one JSON document on stdout (logs go to stderr).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from passbridge.cli.common import emit_json, fail, out, redis_url, run, safe, settings

# Redis and the worker's modules are imported by the commands that use them: `--help` stays quick.
if TYPE_CHECKING:
    from redis.asyncio import Redis

    from worker.report import ReportRow

T = TypeVar("T")
JsonOpt = typer.Option(False, "--json", help="Machine-readable output.")


def _query(fn: Callable[[Redis], Awaitable[T]]) -> T:
    """Run ``fn`` against the configured Redis (never starting the embedded one); a clear error if unreachable."""
    from redis.asyncio import Redis

    url = redis_url(settings(), start=False)

    async def go() -> T:
        redis = Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10)
        try:
            return await fn(redis)
        finally:
            await redis.aclose()

    return run(go())  # an unreachable Redis is one error line naming host:port, never the URL's password


def _age(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def _detail(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items()) if d else ""


def _ready(a: dict[str, Any]) -> str:
    """The ready column: marked when no worker takes those serials whatever the workers do."""
    n = a["ready_serials"]
    if not n:
        return "0"
    if a["state"] != "connected":
        return f"{n} [red](held)[/]"
    if a["throttled_until"]:
        return f"{n} [yellow](throttled)[/]"
    return str(n)


def status(
    account: list[str] = typer.Option(None, "--account", "-a", help="Only these accounts (repeatable)."),
    as_json: bool = JsonOpt,
) -> None:
    """Per account: queued events, ready/parked/leased serials, oldest event, DLQ, rates, Klaviyo calls and
    429s, state; and the worker processes with their last heartbeat."""
    from rich.table import Table

    from worker import inspect

    async def go(redis: Redis) -> dict[str, Any]:
        if account:
            # A typo would otherwise show a normal-looking row of zeros (state "unknown").
            known = set(await inspect.account_ids(redis))
            unknown = [a for a in dict.fromkeys(account) if a not in known]
            if unknown:
                fail(
                    "no such account: "
                    + ", ".join(repr(a) for a in unknown)
                    + " (not registered, nothing queued or dead-lettered)"
                )
        now, accounts = await inspect.overview(redis, account or None)
        workers = await inspect.workers(redis)
        return {
            "at": inspect.iso(now),
            "accounts": [a.to_doc(now) for a in accounts],
            "workers": [w.to_doc(now) for w in workers],
        }

    doc = _query(go)
    if as_json:
        emit_json(doc)
        return
    table = Table(
        "account",
        "state",
        "pending",
        "oldest",
        "ready",
        "parked (next attempt)",
        "leased",
        "DLQ",
        "in/s 1m·5m",
        "out/s 1m·5m",
        "Klaviyo 5m req·429",
        title=f"accounts at {doc['at']}",
    )
    notes: list[str] = []
    for a in doc["accounts"]:
        state = a["state"]
        if state != "connected":
            # The kind says what to do (README, "What to do when … an account is paused"): auth means fix the
            # credentials and `engine resume`, operator means `accounts update --state connected`.
            since = f" since {a['paused']['since']} (kind {a['paused']['kind']})" if a["paused"] else ""
            notes.append(
                f"[red]{safe(a['account'])} is {safe(state)}{since}[/]: "
                + safe(a["state_reason"] or "no reason given")
            )
        if a["throttled_until"] and state == "connected":
            notes.append(
                f"[yellow]{safe(a['account'])} is throttled by Klaviyo (429) until {a['throttled_until']}[/]: "
                "its ready serials wait for that, not for a worker"
            )
        if a["dlq"]:
            notes.append(
                f"{safe(a['account'])} has {a['dlq']} dead-lettered: passbridge dlq list -a {safe(a['account'])}"
            )
        table.add_row(
            safe(a["account"]),
            safe(state) if state == "connected" else f"[red]{safe(state)}[/]",
            str(a["pending_events"]),
            _age(a["oldest_event_age_s"]) if a["pending_events"] else "-",
            _ready(a),
            f"{a['parked_serials']}" + (f" ({a['next_attempt']})" if a["next_attempt"] else ""),
            str(a["leased_serials"]),
            f"[red]{a['dlq']}[/]" if a["dlq"] else "0",
            f"{a['ingested_per_s']['1m']:.2f} · {a['ingested_per_s']['5m']:.2f}",
            f"{a['delivered_per_s']['1m']:.2f} · {a['delivered_per_s']['5m']:.2f}",
            f"{a['klaviyo_requests_5m']} · {a['klaviyo_429s_5m']}",
        )
    out.print(table)
    for note in notes:
        out.print(note, soft_wrap=True)
    if not doc["workers"]:
        out.print("[red]no worker has sent a heartbeat in the last minute: nothing is being delivered[/]")
        return
    wt = Table(
        "worker",
        "lane",
        "alive",
        "last heartbeat",
        "held",
        "written",
        "retried",
        "dead-lettered",
        title="workers",
    )
    for w in doc["workers"]:
        wt.add_row(
            safe(w["worker"]),
            safe(w["lane"]),
            "yes" if w["alive"] else "[red]no[/]",
            f"{w['last_heartbeat']} ({w['heartbeat_age_s']} s ago)",
            f"{w['held_serials']}/{w['max_serials']}",
            str(w["written"]),
            str(w["retried"]),
            str(w["dead_lettered"]),
        )
    out.print(wt)


def serial(
    account: str = typer.Argument(..., help="The account."),
    serial_number: str = typer.Argument(..., metavar="SERIAL", help="The pass serial number."),
    as_json: bool = JsonOpt,
) -> None:
    """One pass: its pending events in order, applied state, lease holder, attempts and timeline."""
    from rich.table import Table

    from worker import inspect

    detail = _query(lambda r: inspect.serial_detail(r, account, serial_number))
    doc = detail.to_doc()
    unknown = not detail.pending_total and not detail.timeline and detail.applied is None
    if as_json:
        emit_json(doc)
        if unknown:
            raise typer.Exit(1)
        return
    if unknown:
        fail(f"nothing known about serial {serial_number!r} of account {account!r}")
    line = f"[bold]{safe(serial_number)}[/] of {safe(account)}: {doc['status']}"
    if detail.lease is not None:
        line += (
            f", held by {safe(detail.lease.worker_id)} (lease until {inspect.iso(detail.lease.expires_ms)})"
        )
    if doc["next_attempt"]:
        line += f", next attempt {doc['next_attempt']}"
    out.print(line)
    if doc["waiting"]:
        out.print(f"waiting: {safe(doc['waiting'])}")
    if detail.pending:
        table = Table(
            "#", "event id", "kind", "occurred", "received", "attempts", title="pending, in send order"
        )
        for i, p in enumerate(doc["pending"], 1):
            table.add_row(
                str(i),
                safe(p["event_id"]),
                safe(p["kind"]),
                safe(p["occurred_at"]),
                safe(p["received_at"]),
                str(p["attempts"]),
            )
        out.print(table)
    else:
        out.print("nothing pending")
    for event_id, record in detail.retries.items():
        for err in record.get("errors", [])[-3:]:
            line = (
                f"  {event_id} failed {inspect.iso(err.get('at_ms'))}: {err.get('status') or ''} "
                f"{err.get('code') or err.get('kind')} {err.get('endpoint') or ''} {err.get('message') or ''}"
            )
            out.print(safe(line[:200]))
    if detail.dead:
        out.print(
            "dead-lettered: "
            + ", ".join(f"{safe(e.dlq_id)} ({inspect.iso(e.dead_at_ms)})" for e in detail.dead)
        )
    out.print("applied state:" if detail.applied else "applied state: none yet")
    if detail.applied:
        out.print_json(data=detail.applied, ensure_ascii=True)
    tl = Table("time", "what", "event id", "detail", title="timeline")
    for h in detail.timeline:
        tl.add_row(inspect.iso(h.at_ms) or "", safe(h.kind), safe(h.event_id), safe(_detail(h.detail)[:120]))
    out.print(tl)
    unlisted = detail.pending_total - len(detail.pending)
    if detail.timeline_omitted or unlisted:
        shown = detail.history_total - detail.timeline_omitted
        out.print(
            safe(
                f"timeline: the newest {shown} of {detail.history_total} kept history entries, the arrival of "
                f"the {len(detail.pending)} pending events listed; `passbridge engine history {account} "
                f"--serial {serial_number}` lists everything"
            )
        )


def event(
    account: str = typer.Argument(..., help="The account."),
    event_id: str = typer.Argument(..., help="The event id."),
    serial_number: str | None = typer.Option(
        None,
        "--serial",
        help="The event's serial: finds an event still queued after the dedup window (which maps ids to "
        "serials) has forgotten it.",
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Where one event is now (queued, dead-lettered, delivered) and its history."""
    import orjson

    from worker import inspect

    window = settings().dedup_ttl_s
    found = _query(lambda r: inspect.find_event(r, account, event_id, window, serial=serial_number))
    if as_json:
        emit_json(found.to_doc())
        if found.where == "unknown":
            raise typer.Exit(1)
        return
    if found.where == "unknown" and found.serial is None:
        fail(f"event {event_id!r} of account {account!r}: {found.detail}")
    out.print(
        f"[bold]{safe(event_id)}[/] (serial {safe(found.serial)}): [bold]{found.where}[/] — {safe(found.detail)}"
    )
    for h in found.history:
        out.print(f"  {inspect.iso(h.at_ms)}  {safe(h.kind):<10} {safe(_detail(h.detail)[:140])}")
    if found.history_omitted:
        out.print(
            safe(
                f"  (the serial's {found.history_omitted} oldest history entries were not read: "
                f"`passbridge engine history {account} --event {event_id} --serial {found.serial}` reads all)"
            )
        )
    if found.event:
        # ASCII-only JSON: every control character (C1 included) is a \u escape, never sent to the terminal.
        out.print_json(orjson.dumps(found.event).decode(), ensure_ascii=True)
    if found.where == "unknown":
        raise typer.Exit(1)


def report(
    account: str = typer.Argument(..., help="The account."),
    since: str = typer.Option("30d", help="From: ISO 8601 or an age (7d, 24h)."),
    until: str = typer.Option("now", help="To (exclusive): ISO 8601, an age, or now."),
    as_json: bool = JsonOpt,
) -> None:
    """Pass save rate (installed/created) and install-to-uninstall ratio, by platform and pass type, for the
    events that occurred in a time range (hour granularity)."""
    from rich.table import Table

    from worker import inspect
    from worker.report import summarize

    try:
        since_ms, until_ms = inspect.parse_when(since), inspect.parse_when(until)
    except ValueError as exc:
        fail(str(exc))
    if since_ms >= until_ms:
        fail(f"--since ({inspect.iso(since_ms)}) must be before --until ({inspect.iso(until_ms)})")

    async def go(redis: Redis) -> tuple[int, list[ReportRow]]:
        # Counters are kept 400 days: an older --since would only read days that are gone.
        start = max(since_ms, inspect.report_kept_since(await inspect.now_ms(redis)))
        return start, await inspect.report_rows(redis, account, start, until_ms) if start < until_ms else []

    start_ms, rows = _query(go)
    doc: dict[str, Any] = {"account": account, "since": inspect.iso(start_ms), "until": inspect.iso(until_ms)}
    note = None
    if start_ms > since_ms:
        doc["requested_since"] = inspect.iso(since_ms)
        kept = f"report counters are kept {inspect.REPORT_DAYS - 1} days"
        note = (
            f"{kept}: --since {inspect.iso(since_ms)} is older, so the report covers {doc['since']} – "
            f"{doc['until']}"
            if start_ms < until_ms
            else f"{kept}: the whole range is older, nothing is left to count"
        )
        doc["note"] = note
    doc.update(summarize(rows).to_doc())
    if as_json:
        emit_json(doc)
        return
    out.print(f"[bold]{safe(account)}[/]: events that occurred {doc['since']} – {doc['until']}")
    if note:
        out.print(f"[yellow]note:[/] {safe(note)}")

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1%}"

    def ratio(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    table = Table(
        "platform",
        "pass type",
        "created",
        "installed",
        "updated",
        "uninstalled",
        "deleted",
        "save rate",
        "install:uninstall",
    )
    lines: list[tuple[str, str, dict[str, Any]]] = [
        (r["platform"], r["pass_type"], r) for r in doc["by_platform_and_pass_type"]
    ]
    lines += [(p, "(all)", t) for p, t in doc["by_platform"].items()]
    lines += [("(all)", t, v) for t, v in doc["by_pass_type"].items()]
    lines.append(("(all)", "(all)", doc["total"]))
    for platform, pass_type, t in lines:
        table.add_row(
            safe(platform),
            safe(pass_type),
            *(str(t[k]) for k in ("created", "installed", "updated", "uninstalled", "deleted")),
            pct(t["save_rate"]),
            ratio(t["install_uninstall_ratio"]),
        )
    out.print(table)
