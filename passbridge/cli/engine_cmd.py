"""``passbridge engine status|resume|history``: the ordered engine as an operator sees it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import typer

from passbridge.account_state import AccountState
from passbridge.cli.common import emit_json, fail, out, plain, run, running_redis, safe, settings

# Redis, the account store and the worker's modules are imported by the commands that use them.
if TYPE_CHECKING:
    from redis.asyncio import Redis

    from passbridge.accounts import AccountStore

app = typer.Typer(
    help="The ordered engine: queues, leases, pauses, workers, event history.", no_args_is_help=True
)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _store(redis: Redis) -> AccountStore:
    """The registry with the secret key: only where an account's secrets are read (``resume``)."""
    from passbridge.accounts import AccountStore
    from passbridge.crypto import load_cipher

    s = settings()
    return AccountStore(
        redis, load_cipher(s.secret_key.get_secret_value() if s.secret_key else None, s.state_dir)
    )


async def account_status(redis: Redis, account_id: str, now_ms: int) -> dict[str, Any]:
    """Queue figures of one account (what ``engine status`` shows)."""
    from passbridge.keys import account_keys
    from worker import dlq, pause

    keys = account_keys(account_id)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.get(keys.depth)
        pipe.zcount(keys.ready, "-inf", now_ms)
        pipe.zcount(keys.ready, f"({now_ms}", "+inf")
        pipe.zcard(keys.leased)
        pipe.zrange(keys.ready, 0, 0, withscores=True)
        depth, due, parked, leased, _ = await pipe.execute()
    next_parked = await redis.zrangebyscore(keys.ready, f"({now_ms}", "+inf", start=0, num=1, withscores=True)
    p = await pause.get_pause(redis, account_id)
    return {
        "account": account_id,
        "pending_events": int(depth or 0),
        "ready_serials": int(due),
        "parked_serials": int(parked),
        "next_attempt": _iso(int(next_parked[0][1])) if next_parked else None,
        "leased_serials": int(leased),
        "dlq": await dlq.count(redis, account_id),
        "paused": None if p is None else {"since": _iso(p.since_ms), "kind": p.kind, "reason": p.reason},
    }


@app.command()
def status(as_json: bool = typer.Option(False, "--json")) -> None:
    """Per account: pending events, ready/parked/leased serials, DLQ size, pause; the live workers; and whether
    backlogs are paced now (a small account's fresh events were worked on in the last minute)."""
    import orjson
    from rich.table import Table

    from passbridge.keys import PACE_BACKLOGS, WORKERS, WORKERS_INFO
    from worker import inspect

    async def go() -> dict[str, Any]:
        redis = running_redis()
        try:
            now = await inspect.now_ms(redis)  # the scores are Redis time, whatever this host's clock says
            accounts = [await account_status(redis, a, now) for a in await inspect.account_ids(redis)]
            workers = []
            for wid, beat in await redis.zrange(WORKERS, 0, -1, withscores=True):
                raw = await redis.hget(WORKERS_INFO, wid)
                info = orjson.loads(raw) if raw else {}
                workers.append({**info, "worker": wid.decode(), "beat_age_s": round((now - beat) / 1000, 1)})
            pace_ms = int(await redis.pttl(PACE_BACKLOGS))
            pacing = {"active": pace_ms > 0, "for_s": round(pace_ms / 1000, 1) if pace_ms > 0 else 0.0}
            return {"accounts": accounts, "workers": workers, "backlog_pacing": pacing}
        finally:
            await redis.aclose()

    doc = run(go())
    if as_json:
        emit_json(doc)
        return
    table = Table("account", "pending", "ready", "parked", "next attempt", "leased", "DLQ", "paused")
    for a in doc["accounts"]:
        paused = a["paused"]
        table.add_row(
            safe(a["account"]),
            str(a["pending_events"]),
            str(a["ready_serials"]),
            str(a["parked_serials"]),
            a["next_attempt"] or "",
            str(a["leased_serials"]),
            str(a["dlq"]),
            safe(f"{paused['kind']}: {paused['reason']}"[:60]) if paused else "",
        )
    out.print(table)
    wt = Table("worker", "lane", "held", "written", "retried", "dead-lettered", "heartbeat")
    for w in doc["workers"]:
        wt.add_row(
            safe(w["worker"]),
            safe(w.get("lane", "main")),
            f"{w.get('held', 0)}/{w.get('max_serials', '?')}",
            str(w.get("written", 0)),
            str(w.get("retried", 0)),
            str(w.get("dead_lettered", 0)),
            f"{w['beat_age_s']} s ago",
        )
    out.print(wt)
    pacing = doc["backlog_pacing"]
    if pacing["active"]:
        out.print(
            "backlogs paced over Klaviyo's minute: yes, a small account's fresh events were worked on "
            f"(for {pacing['for_s']:g} s more unless more arrive)"
        )
    else:
        out.print(
            "backlogs paced over Klaviyo's minute: no (no small account's fresh events in the last minute)"
        )


@app.command()
def resume(
    account: str = typer.Argument(..., help="The paused account."),
    check: bool = typer.Option(
        False,
        "--check",
        help="First make one cheap Klaviyo call with the account's credentials; resume only if it works.",
    ),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Resume an account the engine paused (e.g. after its Klaviyo credentials were fixed)."""
    from passbridge.accounts import AccountNotFound
    from worker import pause
    from worker.klaviyo.client import KlaviyoClient
    from worker.main import credentials_problem

    s = settings()

    async def go() -> dict[str, Any]:
        redis = running_redis()
        try:
            store = _store(redis)
            try:
                registered = await store.get(account)
            except AccountNotFound:
                fail(f"no account {account!r}")
            held = await pause.get_pause(redis, account)
            # Only an auth pause's registry "paused" is lifted by the resume; any other registry state makes
            # the next sweep pause the account again within seconds, so a resume here would be a false success.
            lifted = held is not None and held.kind == "auth" and registered.state is AccountState.paused
            if registered.state is not AccountState.connected and not lifted:
                why = f" ({registered.state_reason})" if registered.state_reason else ""
                return {
                    "account": account,
                    "resumed": False,
                    "reason": f"the account is {registered.state.value} in the registry{why}; "
                    f"`passbridge accounts update {account} --state connected` resumes it",
                }
            if check:
                async with KlaviyoClient.from_settings(s, redis, store) as client:
                    problem = await credentials_problem(client, store, redis, account)
                    if problem is not None:
                        return {"account": account, "resumed": False, "reason": problem}
            paused_ms = await pause.resume_account(redis, store, account)
            if paused_ms is None:
                return {"account": account, "resumed": False, "reason": "not paused"}
            return {"account": account, "resumed": True, "paused_s": round(paused_ms / 1000, 1)}
        finally:
            await redis.aclose()

    doc = run(go())
    if as_json:
        emit_json(doc)
    elif doc["resumed"]:
        typer.echo(f"resumed {account} (paused {doc['paused_s']} s)")
    else:
        typer.echo(f"{plain(account)} not resumed: {plain(doc['reason'])}")
    if not doc["resumed"] and doc["reason"] != "not paused":
        raise typer.Exit(1)


@app.command("history")
def history_(
    account: str = typer.Argument(...),
    serial: str | None = typer.Option(None, "--serial", help="The serial's whole timeline."),
    event_id: str | None = typer.Option(None, "--event", help="One event's history."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """What happened to a serial's events (ingested, attempts, written, dead-lettered, replayed)."""
    import orjson

    from worker import history, inspect

    if not serial and not event_id:
        fail("give --serial or --event")
    window_s = settings().dedup_ttl_s

    async def go() -> list[dict[str, Any]] | None:
        redis = running_redis()
        try:
            # The serial of an event id from the dedup index, the lookup `passbridge event` makes (no SCAN).
            found = serial or await inspect.serial_of(redis, account, event_id or "", window_s)
            if found is None:
                return None
            if event_id:
                entries = await history.event_history(redis, account, event_id, found)
            else:
                entries = await history.timeline(redis, account, found)
            return [e.to_doc() for e in entries]
        finally:
            await redis.aclose()

    rows = run(go())
    if rows is None:
        fail(
            f"no event {event_id!r} in account {account!r} within the dedup window ({window_s} s): "
            "give --serial for an older event"
        )
    if as_json:
        emit_json(rows)
        return
    if not rows:
        typer.echo("no history (unknown, or older than the retention)")
        return
    for r in rows:
        detail = {k: v for k, v in r.items() if k not in ("at_ms", "kind", "event_id")}
        out.print(
            f"{_iso(int(r['at_ms']))}  {safe(r['kind']):<10} {safe(r['event_id'])}  "
            + (safe(orjson.dumps(detail).decode()) if detail else "")
        )
