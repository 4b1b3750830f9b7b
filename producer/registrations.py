"""Apple device registrations in Redis: register / unregister (with the lifecycle event, atomically) and the
device's list of passes. The Lua scripts are ``passbridge/lua/apple_register.lua`` and ``apple_unregister.lua``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from redis.asyncio import Redis

from passbridge.event import PassEvent
from passbridge.keys import ACTIVE_ACCOUNTS, NOTIFY, account_keys
from passbridge.queue import BacklogFull, dedup_bucket_width
from passbridge.scripts import script
from producer.sources.apple import event_id_prefix

#: Stands for the install generation in the event's id while the wire JSON is built; Lua substitutes it.
_GEN = "{gen}"


#: Devices one pass may have registered at once. A pass is on a person's phone and watch, perhaps a few more;
#: its authentication token is in the pass file, so without a bound anyone holding the file could register
#: device ids (a hash field and a key each) for as long as they like.
MAX_DEVICES_PER_PASS = 100


class Outcome(IntEnum):
    """What a register/unregister call did (the values are the HTTP status Apple expects)."""

    created = 201
    changed = 200  # register: already registered (token refreshed); unregister: removed
    not_registered = 204
    too_many_devices = 409  # register: the pass has MAX_DEVICES_PER_PASS devices already


@dataclass(frozen=True, slots=True)
class Registration:
    """The outcome, and the id of the lifecycle event it fired (``None`` when the device count did not cross
    0 ↔ 1, or the pass type is not synced)."""

    outcome: Outcome
    event_id: str | None
    #: Whether the pass's device count crossed 0 ↔ 1: the call's lifecycle event fired, or was skipped because
    #: the pass type is not synced.
    crossed: bool = False


@dataclass(frozen=True, slots=True)
class Limits:
    """The enqueue parameters the scripts need (from settings)."""

    high_water: int
    dedup_window_s: int


def _split_wire(event: PassEvent) -> tuple[str, str]:
    """The event's wire JSON split around the generation placeholder in its id.

    ``to_wire`` writes ``"v"`` and then ``"id"`` first, so the first placeholder is the one in the id, whatever
    the serial contains.
    """
    wire = event.to_wire().decode()
    head, sep, tail = wire.partition(_GEN)
    if not sep or not head.startswith('{"v":1,"id":"'):
        raise AssertionError("the event id must be the wire JSON's second field")
    return head, tail


async def _call(
    redis: Redis,
    name: str,
    account_id: str,
    pass_type_id: str,
    serial: str,
    device_id: str,
    push_token: str,
    now_ms: int,
    event: PassEvent | None,
    kind: str,
    limits: Limits,
) -> Registration:
    keys = account_keys(account_id)
    prefix = event_id_prefix(kind, pass_type_id, serial)
    head, tail = ("", "")
    if event is not None:
        head, tail = _split_wire(event.model_copy(update={"event_id": prefix + _GEN}))
    code, event_id, crossed = await script(redis, name)(
        keys=[
            keys.apple_regs(pass_type_id, serial),
            keys.apple_gen(pass_type_id, serial),
            keys.apple_device(device_id, pass_type_id),
        ],
        args=[
            device_id,
            push_token,
            serial,
            now_ms,
            keys.base,
            limits.high_water,
            limits.dedup_window_s,
            dedup_bucket_width(limits.dedup_window_s),
            NOTIFY,
            ACTIVE_ACCOUNTS,
            account_id,
            prefix,
            head,
            tail,
            MAX_DEVICES_PER_PASS,
        ],
    )
    if int(code) == 503:
        raise BacklogFull(account_id, -1, limits.high_water)
    return Registration(Outcome(int(code)), event_id.decode() or None, bool(int(crossed)))


async def register(
    redis: Redis,
    account_id: str,
    pass_type_id: str,
    serial: str,
    device_id: str,
    push_token: str,
    *,
    now_ms: int,
    installed: PassEvent | None,
    limits: Limits,
) -> Registration:
    """Register ``device_id`` for the pass; enqueue ``installed`` (its id gets the generation) on 0 → 1.

    ``installed`` is ``None`` when the pass type is not synced: the registration is still kept. Raises
    :class:`BacklogFull` (nothing written) when the event would take the backlog over the high-water mark.
    """
    return await _call(
        redis,
        "apple_register",
        account_id,
        pass_type_id,
        serial,
        device_id,
        push_token,
        now_ms,
        installed,
        "installed",
        limits,
    )


async def unregister(
    redis: Redis,
    account_id: str,
    pass_type_id: str,
    serial: str,
    device_id: str,
    *,
    now_ms: int,
    uninstalled: PassEvent | None,
    limits: Limits,
) -> Registration:
    """Unregister ``device_id`` from the pass; enqueue ``uninstalled`` on 1 → 0 (see :func:`register`)."""
    return await _call(
        redis,
        "apple_unregister",
        account_id,
        pass_type_id,
        serial,
        device_id,
        "",
        now_ms,
        uninstalled,
        "uninstalled",
        limits,
    )


async def updated_serials(
    redis: Redis, account_id: str, device_id: str, pass_type_id: str, since_ms: int
) -> tuple[list[str], int]:
    """Serials of ``pass_type_id`` the device registered after ``since_ms``, and the newest registration ms.

    passbridge does not serve pass files, so a pass counts as updated for a device when it registered.
    """
    key = account_keys(account_id).apple_device(device_id, pass_type_id)
    rows = await redis.zrangebyscore(key, f"({since_ms}", "+inf", withscores=True)
    if not rows:
        return [], since_ms
    return [s.decode() for s, _ in rows], int(max(score for _, score in rows))


async def device_count(redis: Redis, account_id: str, pass_type_id: str, serial: str) -> int:
    """How many devices hold the pass now."""
    return int(await redis.hlen(account_keys(account_id).apple_regs(pass_type_id, serial)))
