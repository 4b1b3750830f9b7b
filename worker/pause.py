"""Pausing and resuming an account's work.

An account is paused for the engine while ``AccountKeys.paused`` exists: ``claim.lua`` then skips it (its
events wait in their mailboxes) and drops it from the scheduling index until :func:`resume_account`. Two
kinds of pause:

- ``auth``: Klaviyo rejected the account's credentials (401 after a refresh, 403, not provisioned) or refuses
  its whole integration (:class:`~worker.klaviyo.errors.AccountFault`: a retired or unserved revision, the
  data source deleted in Klaviyo). The
  registry entry is set to ``paused`` with the reason, for operators. It resumes when the credentials work
  again: an operator runs ``passbridge engine resume`` (optionally ``--check``), or the engine's sweep
  probes the credentials every ``pause_probe_interval_s`` and resumes on success, or an operator sets the
  account back to ``connected``.
- ``operator``: the registry entry says ``paused``/``disconnected`` (set by an operator); the engine mirrors
  it and resumes when the registry says ``connected`` again.

While paused, the account's events do not age (:func:`worker.retry.active_age_ms` subtracts the closed
intervals in ``AccountKeys.pause_log``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import structlog
from redis.asyncio import Redis

from passbridge.accounts import AccountNotFound, AccountState, AccountStore
from passbridge.keys import ACTIVE_ACCOUNTS, NOTIFY, account_keys
from worker.scripts import Scripts

log = structlog.get_logger(__name__)

#: Closed pause intervals kept per account (older ones no longer matter for any queued event's age).
PAUSE_LOG_KEEP = 100


@dataclass(frozen=True, slots=True)
class Pause:
    """An account's current pause."""

    account_id: str
    since_ms: int
    kind: str
    reason: str
    #: False while an auth pause has not yet been written to the registry.
    synced: bool = True


async def redis_now_ms(redis: Redis) -> int:
    """Redis's clock in ms (the engine's scripts all use it)."""
    sec, usec = await redis.time()
    return int(sec) * 1000 + int(usec) // 1000


async def pause_account(
    redis: Redis, store: AccountStore | None, account_id: str, reason: str, *, kind: str = "auth"
) -> bool:
    """Pause the account's work (idempotent: a second pause keeps the first one's start and reason).

    With ``kind="auth"`` the registry entry is also set to ``paused`` with ``reason``. Returns whether this
    call started the pause.
    """
    keys = account_keys(account_id)
    now = await redis_now_ms(redis)
    started = bool(await redis.hsetnx(keys.paused, "since_ms", now))
    if started:
        # "registry": pending until the registry says paused too, so that reconcile() does not mistake the
        # still-"connected" registry entry for an operator's resume in between.
        await set_if_paused(redis, account_id, {"reason": reason, "kind": kind, "registry": "pending"})
        await redis.zrem(ACTIVE_ACCOUNTS, account_id)
        log.warning("account_paused", account=account_id, kind=kind, reason=reason)
    if kind == "auth" and store is not None:
        try:
            account = await store.get(account_id)
        except AccountNotFound:
            account = None
        if account is not None and account.state is AccountState.connected:
            await store.set_state(account_id, AccountState.paused, reason)
    await set_if_paused(redis, account_id, {"registry": "synced"})
    return started


async def set_if_paused(redis: Redis, account_id: str, fields: Mapping[str, str | int]) -> bool:
    """Set ``fields`` of the account's pause, atomically only if it is still paused; returns whether it was.

    Every write to the pause after the one that starts it goes through here: a resume may have deleted it
    meanwhile, and a recreated hash without ``since_ms`` would be a pause no resume ends.
    """
    args: list[str | int] = [account_keys(account_id).base]
    for name, value in fields.items():
        args += [name, value]
    return bool(await Scripts(redis).pause_set(args=args))


async def get_pause(redis: Redis, account_id: str) -> Pause | None:
    """The account's current pause, if any."""
    raw = await redis.hgetall(account_keys(account_id).paused)
    if not raw:
        return None
    d = {k.decode(): v.decode() for k, v in raw.items()}
    return Pause(
        account_id,
        int(d.get("since_ms", 0)),
        d.get("kind", "auth"),
        d.get("reason", ""),
        d.get("registry", "synced") == "synced",
    )


async def pause_intervals(redis: Redis, account_id: str) -> list[tuple[int, int]]:
    """The account's closed pause intervals ``(start_ms, end_ms)``, oldest first."""
    out = []
    for raw in await redis.lrange(account_keys(account_id).pause_log, 0, -1):
        start, _, end = raw.decode().partition(":")
        out.append((int(start), int(end)))
    return out


async def resume_account(redis: Redis, store: AccountStore | None, account_id: str) -> int | None:
    """Resume the account now: its serials are claimable at once. Returns the pause's length in ms, or
    ``None`` if it was not paused. A registry entry left ``paused`` by an auth pause is set ``connected``."""
    keys = account_keys(account_id)
    pause = await get_pause(redis, account_id)
    # Registry first: a worker woken by the resume must not read the old "paused" and pause again.
    if store is not None and pause is not None and pause.kind == "auth":
        try:
            account = await store.get(account_id)
        except AccountNotFound:
            account = None
        if account is not None and account.state is AccountState.paused:
            await store.set_state(account_id, AccountState.connected, "")
    paused_ms = int(
        await Scripts(redis).resume(args=[keys.base, account_id, ACTIVE_ACCOUNTS, NOTIFY, PAUSE_LOG_KEEP])
    )
    if paused_ms < 0:
        return None
    log.info("account_resumed", account=account_id, paused_ms=paused_ms)
    return paused_ms


async def reconcile(
    redis: Redis,
    store: AccountStore,
    account_id: str,
    *,
    probe: Callable[[str], Awaitable[bool]] | None = None,
) -> str:
    """Bring the engine's pause in line with the registry (the sweep calls this for every account).

    - registry ``paused``/``disconnected`` and no engine pause → pause (``operator``);
    - engine pause and registry ``connected`` → resume (an operator fixed or reconnected the account);
    - ``auth`` pause and ``probe(account_id)`` answers True (the credentials work again) → resume.

    Returns what it did: ``paused``, ``resumed``, ``still_paused`` or ``ok``.
    """
    pause = await get_pause(redis, account_id)
    try:
        account = await store.get(account_id)
    except AccountNotFound:
        return "ok"
    if pause is None:
        if account.state is not AccountState.connected:
            await pause_account(
                redis,
                store,
                account_id,
                account.state_reason or f"account is {account.state}",
                kind="operator",
            )
            return "paused"
        return "ok"
    if account.state is AccountState.connected and pause.synced:
        await resume_account(redis, store, account_id)
        return "resumed"
    if pause.kind == "auth" and probe is not None and await probe(account_id):
        await resume_account(redis, store, account_id)
        return "resumed"
    return "still_paused"
