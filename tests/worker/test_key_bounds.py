"""Every Redis key family stays bounded: real worker processes push many serials through the whole pass
lifecycle against the Klaviyo sandbox (created → installed → updated → uninstalled → deleted; some events
dead-lettered, replayed or purged, some retried; an account removed), short retention settings elapse, and then
every key left in Redis is classified by family (docs/architecture.md's key table) and checked against the bound
that family documents: gone, expiring within its TTL, or sized by what the operator still owns."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
from redis.asyncio import Redis

from passbridge.event import PassEvent
from passbridge.keys import account_keys
from passbridge.queue import dedup_bucket_width, enqueue
from producer import registrations
from producer.registrations import Limits
from tests.conftest import async_wait_for
from worker import dlq

from .e2e import Pipeline, Workers, drained
from .helpers import HIGH_WATER, REPLAY_RESERVE, pass_event

pytestmark = pytest.mark.slow

HISTORY_S = 3
DEDUP_S = 2
SERIALS = [f"S{i}" for i in range(12)]
GONE_SERIALS = ["G0", "G1", "G2"]
APPLE_SERIALS = SERIALS[6:10]
PASS_TYPE = "pass.com.example.loyalty"
HOUR_S = 3600
DAY_S = 86_400


@dataclass(frozen=True)
class Family:
    """A key family and its bound. ``ttl_s``: every key must expire within it; ``None``: the family is sized
    (checked by the test), or must be gone (``gone``)."""

    name: str
    pattern: str
    ttl_s: float | None = None
    gone: bool = False


#: Key families (``passbridge/keys.py``) in the order of docs/architecture.md; ``<a>`` = any account.
FAMILIES = [
    Family("accounts index", r"pb:accounts"),
    Family("removed accounts", r"pb:accounts:removed"),
    Family("config", r"pb:a:<a>:cfg"),
    Family("mailbox", r"pb:a:<a>:mb:.+", gone=True),
    Family("ready", r"pb:a:<a>:ready", gone=True),
    Family("leased", r"pb:a:<a>:leased", gone=True),
    Family("depth", r"pb:a:<a>:depth"),
    Family("seq", r"pb:a:<a>:seq"),
    Family("dedup bucket", r"pb:a:<a>:dd:\d+", ttl_s=DEDUP_S + dedup_bucket_width(DEDUP_S) + 61),
    Family("apple registrations", r"pb:a:<a>:apple:.+"),
    Family("apple generation", r"pb:a:<a>:apple-gen:.+"),
    Family("apple device", r"pb:a:<a>:apple-dev:.+"),
    Family("stats", r"pb:a:<a>:stats"),
    Family("oauth connect", r"pb:a:<a>:oauth:.+", ttl_s=600),
    Family("lease tokens", r"pb:a:<a>:tok", gone=True),
    Family("profile job markers", r"pb:a:<a>:pjobs", gone=True),
    Family("state", r"pb:a:<a>:state"),
    Family("retry records", r"pb:a:<a>:retry", gone=True),
    Family("dlq", r"pb:a:<a>:dlq"),
    Family("dlq entries", r"pb:a:<a>:dlq:e"),
    Family("history", r"pb:a:<a>:h:.+", gone=True),
    Family("paused", r"pb:a:<a>:paused", gone=True),
    Family("deferred", r"pb:a:<a>:defer", ttl_s=60),
    Family("pause log", r"pb:a:<a>:pauses"),
    Family("klaviyo ids", r"pb:a:<a>:klaviyo"),
    Family("rate window", r"pb:a:<a>:rl:[^:]+:[bs]", ttl_s=61),
    Family("rate pause", r"pb:a:<a>:rl:[^:]+:pause", ttl_s=3600),
    Family("rate pace", r"pb:a:<a>:rl:[^:]+:pace", ttl_s=63),
    Family("oauth lock", r"pb:a:<a>:oauth-lock", ttl_s=30),
    Family("setup lock", r"pb:a:<a>:setup-lock", ttl_s=300),
    Family("activity series", r"pb:a:<a>:ts:\d+", ttl_s=6 * HOUR_S + 10),
    Family("report", r"pb:a:<a>:rep:\d{8}", ttl_s=402 * DAY_S),
    Family("active accounts", r"pb:active"),
    Family("notify", r"pb:notify"),
    Family("express notify", r"pb:notify:x"),
    Family("express on", r"pb:notify:x:on", ttl_s=60),
    Family("backlog pacing", r"pb:pace", ttl_s=60),
    Family("express busy", r"pb:notify:x:busy", ttl_s=60),
    Family("lease counter", r"pb:lease-seq"),
    Family("data marker", r"pb:data-marker"),
    Family("workers", r"pb:workers"),
    Family("workers info", r"pb:workers:info"),
    Family("series gate", r"pb:ts-sampled:\d+", ttl_s=60),
    Family("login failures", r"pb:dashboard:login-failures:.+", ttl_s=900),
    Family("revoked sessions", r"pb:dashboard:revoked:.+", ttl_s=12 * HOUR_S),
    Family("arq queue", r"pb:arq"),
    Family("arq health check", r"pb:arq:health-check", ttl_s=3600),
    # arq's own per-job keys (the sweep cron): its job, in-progress and retry keys all expire.
    Family("arq job", r"arq:(job|in-progress|retry):.+", ttl_s=DAY_S + 60),
]
_COMPILED = [(f, re.compile(f.pattern.replace("<a>", "[^:]+") + r"\Z")) for f in FAMILIES]


@dataclass
class Found:
    """The keys of one family left in Redis: their names, TTLs (s, -1 = none) and sizes (elements)."""

    family: Family
    keys: dict[str, tuple[float, int]] = field(default_factory=dict)


async def size_of(redis: Redis, key: str) -> int:
    kind = (await redis.type(key)).decode()
    sizer = {"hash": redis.hlen, "zset": redis.zcard, "list": redis.llen, "set": redis.scard}.get(kind)
    return int(await sizer(key)) if sizer else 1


async def census(redis: Redis) -> tuple[dict[str, Found], list[str]]:
    """Every key in Redis by family (first matching pattern), and the keys of no known family."""
    found: dict[str, Found] = {}
    unknown: list[str] = []
    async for raw in redis.scan_iter(count=1000):
        key = raw.decode()
        family = next((f for f, rx in _COMPILED if rx.match(key)), None)
        if family is None:
            unknown.append(key)
            continue
        pttl = await redis.pttl(key)
        found.setdefault(family.name, Found(family)).keys[key] = (
            pttl / 1000 if pttl >= 0 else -1.0,
            await size_of(redis, key),
        )
    return found, sorted(unknown)


def table(found: dict[str, Found]) -> str:
    """What remains, one line per family: key count, TTL range, total size."""
    lines = [f"{'family':<22} {'keys':>5} {'ttl s (min..max, -1 none)':>28} {'elements':>9}"]
    for name, f in sorted(found.items()):
        ttls = [t for t, _ in f.keys.values()]
        size = sum(s for _, s in f.keys.values())
        lines.append(f"{name:<22} {len(f.keys):>5} {min(ttls):>13.0f}..{max(ttls):<13.0f} {size:>9}")
    return "\n".join(lines)


def cli(workers: Workers, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``passbridge`` in the workers' environment, as an operator would."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "passbridge"), *args],
        env=workers.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def now_ms() -> int:
    return int(time.time() * 1000)


async def put(pipeline: Pipeline, events: list[PassEvent]) -> None:
    """Enqueue like the producer does, with the short dedup window."""
    by_account: dict[str, list[PassEvent]] = {}
    for ev in events:
        by_account.setdefault(ev.account_id, []).append(ev)
    for account_id, evs in by_account.items():
        result = await enqueue(pipeline.redis, account_id, evs, high_water=HIGH_WATER, dedup_window_s=DEDUP_S)
        assert all(result.accepted)


@pytest.mark.parametrize("mode", ["adaptive", "bulk"])
async def test_every_key_family_is_bounded_after_a_whole_lifecycle(
    pipeline: Pipeline, workers: Workers, mode: str
) -> None:
    redis = pipeline.redis
    await pipeline.add_account("acme")
    await pipeline.add_account("gone")
    workers.env.update(
        {
            "PASSBRIDGE_HISTORY_RETENTION_S": str(HISTORY_S),
            "PASSBRIDGE_DEDUP_TTL_S": str(DEDUP_S),
            # bulk: profiles go through import jobs (their per-serial markers) and batched settles
            "PASSBRIDGE_WORKER_SYNC_MODE": mode,
        }
    )
    workers.start(2)

    def ev(account: str, serial: str, n: int, kind: str, **over: object) -> PassEvent:
        return pass_event(account, serial, n, kind=kind, **over)

    # Created and installed, every pass of both accounts.
    await put(
        pipeline,
        [
            ev(a, s, n, k)
            for a, ss in (("acme", SERIALS), ("gone", GONE_SERIALS))
            for s in ss
            for n, k in ((0, "created"), (1, "installed"))
        ],
    )
    await drained(pipeline, workers)
    # Apple devices register for four passes (their "installed" events come from the registration, as the
    # producer's Apple web service sends them), then unregister (the "uninstalled" ones).
    limits = Limits(high_water=HIGH_WATER, dedup_window_s=DEDUP_S)
    for s in APPLE_SERIALS:
        reg = await registrations.register(
            redis,
            "acme",
            PASS_TYPE,
            s,
            f"dev-{s}",
            "tok",
            now_ms=now_ms(),
            installed=ev("acme", s, 1, "installed"),
            limits=limits,
        )
        assert reg.outcome is registrations.Outcome.created
    await drained(pipeline, workers)
    # Poison updates (a permanent 400 on their profile write): four of acme's and one of gone's dead-lettered.
    pipeline.sandbox.set_faults(
        error_rates={400: 1.0}, operations=["create_or_update_profile", "bulk_import_profiles"]
    )
    poisoned = [*SERIALS[:4], "G0"]
    await put(
        pipeline,
        [
            ev("gone" if s.startswith("G") else "acme", s, 2, "updated", email="new@example.com")
            for s in poisoned
        ],
    )
    await drained(pipeline, workers)
    pipeline.sandbox.clear_faults()
    assert await dlq.count(redis, "acme") == 4
    # Updates through a flaky Klaviyo: retried (retry records), then written.
    pipeline.sandbox.set_faults(error_rates={503: 0.1})
    await put(
        pipeline, [ev("acme", s, 3, "updated", properties={"points": 3, "tier": "gold"}) for s in SERIALS]
    )
    await drained(pipeline, workers)
    pipeline.sandbox.clear_faults()
    # The operator replays two dead letters, purges one and keeps one.
    ids = sorted(e.dlq_id for e in await dlq.list_entries(redis, "acme"))
    assert ids == [f"acme-{s}-2" for s in SERIALS[:4]]  # the retried updates were all written
    replayed = await dlq.replay(
        redis,
        "acme",
        ids[:2],
        high_water=HIGH_WATER,
        reserve=REPLAY_RESERVE,
        history_retention_ms=HISTORY_S * 1000,
    )
    assert replayed.replayed == 2
    assert await dlq.purge(redis, "acme", ids[2:3]) == 1
    await drained(pipeline, workers)
    # Uninstalled and deleted, every pass of acme.
    for s in APPLE_SERIALS:
        unreg = await registrations.unregister(
            redis,
            "acme",
            PASS_TYPE,
            s,
            f"dev-{s}",
            now_ms=now_ms(),
            uninstalled=ev("acme", s, 4, "uninstalled"),
            limits=limits,
        )
        assert unreg.outcome is registrations.Outcome.changed
    await put(pipeline, [ev("acme", s, 4, "uninstalled") for s in SERIALS if s not in APPLE_SERIALS])
    await put(pipeline, [ev("acme", s, 5, "deleted") for s in SERIALS])
    await drained(pipeline, workers)
    left = await dlq.list_entries(redis, "acme")
    assert sorted(e.dlq_id for e in left) == ids[3:], [(e.dlq_id, e.reason) for e in left]
    # gone is removed (its queue and dead letter stay), then — later — purged.
    assert cli(workers, "accounts", "remove", "gone", "--yes").returncode == 0
    pipeline.accounts.pop("gone")
    purge = cli(workers, "accounts", "remove", "gone", "--yes", "--purge")
    assert purge.returncode == 0, purge.stderr

    # Retention elapses for the history of serials that never receive another event.
    async def no_history() -> bool:
        return not [k async for k in redis.scan_iter(match=account_keys("acme").history_prefix + "*")]

    await async_wait_for(no_history, timeout=HISTORY_S * 5)
    workers.stop_all()
    await asyncio.sleep(0.2)

    found, unknown = await census(redis)
    print("\n" + table(found))
    assert unknown == [], f"keys of no documented family: {unknown}"
    # Nothing is left of the removed and purged account.
    assert not [k for f in found.values() for k in f.keys if k.startswith(account_keys("gone").base + ":")]
    for f in found.values():
        if f.family.gone:
            pytest.fail(f"{f.family.name} should be gone: {sorted(f.keys)}")
        if f.family.ttl_s is not None:
            for key, (ttl, _) in f.keys.items():
                assert 0 <= ttl <= f.family.ttl_s, f"{key}: TTL {ttl} s, bound {f.family.ttl_s} s"
        else:
            # Sized families have no TTL to rely on: each is checked against what must remain below.
            assert f.family.name in SIZED, f"{f.family.name} has neither a TTL nor a checked size"

    def size(name: str) -> int:
        return sum(s for _, s in found[name].keys.values()) if name in found else 0

    # What must remain, and only that.
    assert size("accounts index") == 1
    assert size("removed accounts") == 0  # gone was purged: nothing of it is left to list
    assert list(found["config"].keys) == [account_keys("acme").config]
    assert await redis.get(account_keys("acme").depth) == b"0"
    # One applied state per pass the account has: deleted passes keep theirs (deleted is terminal).
    states = await redis.hgetall(account_keys("acme").state)
    assert sorted(s.decode() for s in states) == sorted(SERIALS)
    assert {orjson.loads(v)["status"] for v in states.values()} == {"deleted"}
    # The dead letter the operator kept.
    kept = [(e.dlq_id, e.reason) for e in await dlq.list_entries(redis, "acme")]
    assert (size("dlq"), size("dlq entries"), len(kept)) == (1, 1, 1), kept
    # Unregistered devices leave nothing but each pass's install generation (kept so event ids never repeat).
    assert size("apple registrations") == size("apple device") == 0
    assert sorted(found["apple generation"].keys) == sorted(
        account_keys("acme").apple_gen(PASS_TYPE, s) for s in APPLE_SERIALS
    )
    assert size("active accounts") == 0  # nothing pending anywhere
    assert size("workers") == size("workers info") == 0  # stopped workers unregister
    assert size("notify") <= 1000
    assert size("express notify") <= 1000
    assert size("pause log") <= 100
    assert size("arq queue") <= 2  # at most the next sweep tick's job
    assert size("data marker") <= 1  # one value


#: Families without a TTL whose size the test checks against what must remain (or that hold one value).
SIZED = {
    "accounts index",
    "removed accounts",
    "config",
    "depth",
    "seq",
    "stats",
    "state",
    "dlq",
    "dlq entries",
    "pause log",
    "klaviyo ids",
    "active accounts",
    "notify",
    "express notify",
    "lease counter",
    "data marker",
    "apple generation",
    "workers",
    "workers info",
    "arq queue",
}
