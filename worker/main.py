"""The worker process: an arq ``Worker`` hosting the engine.

arq gives the process its lifecycle (signal handling, ``on_startup``/``on_shutdown``), its health check
(``<queue>:health-check``, read by ``passbridge worker --check``) and its cron, which runs the housekeeping
sweep once per tick across all workers (arq's unique cron job ids). The engine itself does not run as arq
jobs: it claims serials through our own Lua scripts and wakes on ``BLPOP pb:notify``, because arq's polling
and its killed-job delay (job timeout + 10 s) are too slow for latency and takeover (DESIGN §3).

Run it with ``passbridge worker`` (or ``arq worker.main.WorkerSettings``, which reads ``PASSBRIDGE_*`` and
``REDIS_URL`` from the environment at import).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import structlog
from arq import cron
from arq.connections import RedisSettings
from redis.asyncio import Redis

from passbridge import metrics
from passbridge.accounts import AccountStore
from passbridge.crypto import load_cipher
from passbridge.gc_tuning import tune_gc
from passbridge.keys import ACTIVE_ACCOUNTS, ARQ_QUEUE, WORKERS, WORKERS_INFO, account_keys
from passbridge.redis_client import fast_redis
from passbridge.settings import Settings, get_settings
from worker import pause
from worker.batching import SyncMode
from worker.bulk import BulkOptions, BulkSync
from worker.engine import Engine, EngineConfig
from worker.exporter import ProcessOps
from worker.express import ExpressProcess
from worker.import_jobs import MARKER_HORIZON_S, prune_markers
from worker.klaviyo.client import KlaviyoClient
from worker.klaviyo.endpoints import GET_DATA_SOURCE
from worker.klaviyo.errors import KlaviyoError
from worker.retry import RetryPolicy
from worker.setup import load_provisioned
from worker.sync import Syncer

log = structlog.get_logger(__name__)

#: How often the sweep runs (arq cron seconds).
SWEEP_EVERY_S = 5
#: How often (per worker process) the sweep drops profile-job markers past their horizon.
MARKERS_PRUNE_EVERY_S = 3600.0
#: A worker whose heartbeat is older than this is dropped from the registry of live workers.
WORKER_STALE_MS = 60_000
HEALTH_CHECK_INTERVAL_S = 10


def engine_config(settings: Settings) -> EngineConfig:
    """The engine's tunables from settings (the bulk modes hold and claim many more serials at once)."""
    bulk = settings.worker_sync_mode != "single"
    return EngineConfig(
        max_serials=settings.worker_bulk_max_serials if bulk else settings.worker_max_jobs,
        claim_batch=settings.worker_bulk_claim_batch if bulk else settings.worker_claim_batch,
        heads_per_serial=settings.worker_bulk_heads if bulk else 8,
        fresh_ms=settings.worker_bulk_fresh_ms if bulk else 0,
        fresh_take=16 if bulk else 0,
        fair_reserve=settings.worker_fair_reserve,
        express_small=settings.worker_express_small,
        express_grace_ms=settings.worker_express_grace_ms,
        express_busy_serials=settings.worker_express_busy_serials,
        lease_ms=int(settings.worker_lease_ttl_s * 1000),
        events_per_lease=settings.worker_events_per_lease,
        history_retention_ms=settings.history_retention_s * 1000,
        retry=RetryPolicy(
            base_delay_s=settings.retry_base_delay_s,
            max_delay_s=settings.retry_max_delay_s,
            max_attempts=settings.retry_max_attempts,
            max_age_s=settings.retry_max_age_s,
        ),
    )


def open_engine(
    settings: Settings, url: str, config: EngineConfig, *, mode: SyncMode | None = None
) -> dict[str, Any]:
    """One process's Redis clients, account store, Klaviyo client and engine (not started), by ctx name;
    ``mode`` overrides ``PASSBRIDGE_WORKER_SYNC_MODE``."""
    # Commands packed in C: a backlog's settles and renewals carry thousands of arguments, and redis-py's
    # asyncio packer (pure Python) was the worker's biggest single cost (passbridge.redis_client).
    redis = fast_redis(url)
    blocking = fast_redis(url)
    secret = settings.secret_key.get_secret_value() if settings.secret_key else None
    store = AccountStore(redis, load_cipher(secret, settings.state_dir))
    client = KlaviyoClient.from_settings(settings, redis, store)
    syncer = Syncer(client, redis, backfill_age_s=settings.backfill_age_s)
    mode = mode or SyncMode(settings.worker_sync_mode)
    engine = Engine(
        redis,
        store,
        syncer,
        config=config,
        blocking_redis=blocking,
        batch_sync=BulkSync(
            syncer,
            BulkOptions(
                mode=mode,
                urgent_age_ms=settings.worker_bulk_fresh_ms,
                profile_job_max_wait_s=settings.worker_profile_job_max_wait_s,
                profile_jobs_in_flight=settings.worker_profile_jobs_in_flight,
            ),
        ),
    )
    log.info("sync_mode", mode=mode.value, max_serials=config.max_serials, express=config.express)
    return {"pb_redis": redis, "pb_blocking": blocking, "store": store, "client": client, "engine": engine}


async def startup(ctx: dict[str, Any]) -> None:
    """arq ``on_startup``: one Klaviyo client, syncer and engine per process; start the engine, and watch
    the express-lane child ``passbridge worker`` forked before the loop started (``ctx["express"]``)."""
    settings: Settings = ctx["settings"]
    url: str = ctx["redis_url"]
    ctx.update(open_engine(settings, url, engine_config(settings)))
    tune_gc()
    await ctx["engine"].start()
    ctx["ops"] = await ProcessOps.start(
        ctx["pb_redis"],
        metrics_host=settings.metrics_host,
        metrics_port=settings.worker_metrics_port,
        metrics_token=settings.metrics_token.get_secret_value() if settings.metrics_token else None,
    )
    express: ExpressProcess | None = ctx.get("express")
    if express is not None:
        ctx["express_watch"] = asyncio.create_task(express.supervise(), name="express-supervise")


async def shutdown(ctx: dict[str, Any]) -> None:
    """arq ``on_shutdown`` (after SIGTERM/SIGINT): stop claiming, finish or release, close clients."""
    settings: Settings = ctx["settings"]
    engine: Engine | None = ctx.get("engine")
    express: ExpressProcess | None = ctx.get("express")
    if (watch := ctx.get("express_watch")) is not None:
        watch.cancel()
    # The express lane finishes its in-flight events while this process does.
    stopping = asyncio.ensure_future(express.stop(settings.worker_grace_s)) if express else None
    if engine is not None:
        await engine.stop(settings.worker_grace_s)
    if stopping is not None:
        await stopping
    if (ops := ctx.get("ops")) is not None:
        await ops.stop()
    await close_clients(ctx)


async def close_clients(ctx: dict[str, Any]) -> None:
    """Close what :func:`open_engine` opened (those of them in ``ctx``): the Klaviyo client, then Redis."""
    client: KlaviyoClient | None = ctx.get("client")
    if client is not None:
        await client.aclose()
    for name in ("pb_blocking", "pb_redis"):
        r: Redis | None = ctx.get(name)
        if r is not None:
            await r.aclose()


async def probe_credentials(
    client: KlaviyoClient, store: AccountStore, redis: Redis, account_id: str
) -> bool:
    """Whether the account's Klaviyo credentials work and it is provisioned, with its data source still there
    and the revision served (what a pause for an :class:`~worker.klaviyo.errors.AccountFault` waits for): one
    cheap read."""
    return await credentials_problem(client, store, redis, account_id) is None


async def credentials_problem(
    client: KlaviyoClient, store: AccountStore, redis: Redis, account_id: str
) -> str | None:
    """What :func:`probe_credentials` found wrong, in words for an operator (``None``: nothing): a missing
    set-up, or the Klaviyo error of the probe (a refusal, but also a network error, a 429 or a 5xx, which say
    nothing about the credentials)."""
    provisioned = await load_provisioned(redis, account_id)
    if provisioned is None:
        return f"not set up in Klaviyo: run `passbridge klaviyo setup --account {account_id}`"
    try:
        account = await store.get(account_id)
        await client.call(account, GET_DATA_SOURCE, path_params={"id": provisioned.data_source_id})
    except KlaviyoError as exc:
        log.info("credentials_probe_failed", account=account_id, error=str(exc))
        return f"the Klaviyo check failed: {exc}"
    return None


async def sweep(ctx: dict[str, Any]) -> dict[str, int]:
    """arq cron: take over expired leases everywhere, mirror/lift pauses, prune dead workers.

    Claims take over expired leases of the accounts they visit anyway; the sweep is the safety net for
    accounts no claim visits (e.g. one that fell out of the scheduling index) and the place where paused
    accounts get their credentials probed (at most every ``pause_probe_interval_s``).
    """
    settings: Settings = ctx["settings"]
    engine: Engine = ctx["engine"]
    redis: Redis = ctx["pb_redis"]
    store: AccountStore = ctx["store"]
    client: KlaviyoClient = ctx["client"]
    interval_ms = int(settings.pause_probe_interval_s * 1000)

    async def probe(account_id: str) -> bool:
        # One probe per account per interval across all workers: the paused hash remembers the last one.
        key = account_keys(account_id).paused
        now = int(time.time() * 1000)
        last = await redis.hget(key, "probed_ms")
        if last is not None and now - int(last) < interval_ms:
            return False
        if not await pause.set_if_paused(redis, account_id, {"probed_ms": now}):
            return False  # resumed meanwhile (an operator, another sweep): nothing to probe
        return await probe_credentials(client, store, redis, account_id)

    ids = set(await store.list_ids())
    ids |= {m.decode() for m in await redis.zrange(ACTIVE_ACCOUNTS, 0, -1)}
    taken = resumed = 0
    for account_id in sorted(ids):
        taken += await engine.queue.sweep(account_id)
        if await pause.reconcile(redis, store, account_id, probe=probe) == "resumed":
            resumed += 1
    metrics.leases_taken_over(taken)
    # Heartbeats and markers are on Redis time: a sweeping host whose clock runs ahead must not prune live
    # workers, nor markers early.
    now_ms = await pause.redis_now_ms(redis)
    # Profile-job markers no next write clears: once an hour is plenty for data that is only ever days old.
    pruned = 0
    if time.monotonic() - ctx.get("markers_pruned_s", -MARKERS_PRUNE_EVERY_S) >= MARKERS_PRUNE_EVERY_S:
        ctx["markers_pruned_s"] = time.monotonic()
        horizon_s = max(MARKER_HORIZON_S, 2 * settings.worker_profile_job_max_wait_s)
        cutoff_ms = now_ms - int(horizon_s * 1000)
        for account_id in sorted(ids):
            pruned += await prune_markers(redis, account_id, cutoff_ms)
    stale = await redis.zrangebyscore(WORKERS, "-inf", now_ms - WORKER_STALE_MS)
    if stale:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.zrem(WORKERS, *stale)
            pipe.hdel(WORKERS_INFO, *stale)
            await pipe.execute()
    if taken or resumed or stale or pruned:
        log.info("sweep", taken_over=taken, resumed=resumed, workers_pruned=len(stale), markers_pruned=pruned)
    return {"taken_over": taken, "resumed": resumed, "workers_pruned": len(stale), "markers_pruned": pruned}


def worker_settings(
    settings: Settings,
    redis_url: str,
    *,
    express: ExpressProcess | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``arq.Worker`` (what ``WorkerSettings`` holds, built from explicit settings);
    ``express``: the express-lane child (:mod:`worker.express`), forked before the event loop by
    ``passbridge worker``, which the worker then supervises and stops."""
    return {
        "functions": [],
        "cron_jobs": [
            cron(
                sweep,
                name="passbridge-sweep",
                second=set(range(0, 60, SWEEP_EVERY_S)),
                timeout=60,
                unique=True,
            )
        ],
        "on_startup": startup,
        "on_shutdown": shutdown,
        "redis_settings": RedisSettings.from_dsn(redis_url),
        "queue_name": ARQ_QUEUE,
        "max_jobs": settings.worker_max_jobs,
        "poll_delay": settings.worker_poll_delay_s,
        "job_timeout": 60,
        "keep_result": 0,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        "ctx": {
            "settings": settings,
            "redis_url": redis_url,
            "express": express,
        },
    }


def __getattr__(name: str) -> Any:
    """``WorkerSettings`` for ``arq worker.main.WorkerSettings``, built from the environment when asked for
    (not at import): ``REDIS_URL`` and ``PASSBRIDGE_*``."""
    if name == "WorkerSettings":
        settings = get_settings()
        if not settings.redis_url:
            raise RuntimeError("WorkerSettings needs REDIS_URL; or run `passbridge worker`")
        return worker_settings(settings, settings.redis_url)
    raise AttributeError(name)
