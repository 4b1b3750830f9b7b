"""Configuration from ``PASSBRIDGE_*`` environment variables (documented in ``.env.example``).

Read once per process with :func:`get_settings`; tests build :class:`Settings` directly.
"""

from __future__ import annotations

import math
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob passbridge reads from the environment."""

    model_config = SettingsConfigDict(env_prefix="PASSBRIDGE_", env_file=".env", extra="ignore")

    # Redis. Unset means: start (or find) the embedded server recorded in the state dir.
    redis_url: str | None = Field(default=None, validation_alias="REDIS_URL")
    state_dir: Path = Path(".passbridge")
    # When the embedded Redis fsyncs its AOF: everysec (a host crash can lose the last second of acknowledged
    # events) or always (none, at a cost measured in BENCHMARKS.md). See README, "Durability".
    redis_appendfsync: Literal["everysec", "always"] = "everysec"

    # Logging
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"

    # Producer
    producer_host: str = "127.0.0.1"
    producer_port: int = Field(default=8000, ge=0, le=65535)
    #: SIGTERM: how long requests in flight may take to finish before they are cut off (README, "Running the
    #: producer"). Below docker's 10 s stop timeout, so the process exits before it is killed.
    producer_shutdown_grace_s: int = Field(default=8, ge=1, le=300)
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    max_batch_events: int = Field(default=1000, ge=1)
    #: A gzip NDJSON upload (which has no total size limit) is stopped with a 413 once its decompressed bytes,
    #: past 1 MiB, exceed this many times the compressed bytes read (README, "POST .../events/ndjson"). Pass-event
    #: NDJSON compresses 8-20:1, a gzip bomb about 1000:1. At least 20 (below that, ordinary backfills are
    #: refused); 1032, deflate's most, never stops one.
    gzip_max_ratio: int = Field(default=100, ge=20, le=1032)
    #: An NDJSON answer (and `passbridge ingest`'s) lists every rejected line, with its errors for the first this
    #: many only: a backfill with a systematic error would otherwise be answered with each line's errors, many
    #: times the upload (README, "POST .../events/ndjson"). Up to 100,000 (about 35 MB of errors at a typical
    #: 350 bytes a line; more says no more about a systematic error); 0: line numbers only.
    ndjson_rejected_details: int = Field(default=1000, ge=0, le=100_000)
    dedup_ttl_s: int = Field(default=7 * 24 * 3600, ge=1)
    backlog_high_water: int = Field(default=1_000_000, ge=1)
    #: Share of the high-water mark a DLQ replay leaves to live ingest: a replay fills an account's backlog up
    #: to :func:`replay_limit` only, so live ingest is not refused while a replay waits for room (README,
    #: "The ordered engine"). 0: replays may fill the backlog up to the mark.
    replay_reserve: float = Field(default=0.1, ge=0, lt=1)
    retry_after_s: int = Field(default=5, ge=0)
    default_phone_region: str = "US"
    admin_token: SecretStr | None = None

    # Klaviyo
    klaviyo_base_url: str = "https://a.klaviyo.com"
    klaviyo_revision: str = "2026-10-15"
    klaviyo_rate_scale: float = Field(default=1.0, gt=0)
    #: Pace backlogs' requests evenly over Klaviyo's minute window while a small account's fresh events are about
    #: (worker.klaviyo.ratelimit.RateLimiter.pace, worker.bulk.AccountLanes.paced).
    klaviyo_backlog_pacing: bool = True
    #: With pacing: the share of an endpoint's minute budget a backlog may spend at once before it is paced.
    klaviyo_backlog_pace_burst: float = Field(default=0.0, ge=0, le=1)
    #: ``passbridge demo`` against a real Klaviyo (PASSBRIDGE_KLAVIYO_BASE_URL set): one private API key for
    #: every demo account, or a comma-separated list handed out to the demo accounts in turn.
    demo_klaviyo_api_keys: SecretStr | None = None

    # Engine (worker/): see docs/architecture.md and README "The ordered engine"
    #: Serials one worker process works on at once; also arq's ``max_jobs``.
    worker_max_jobs: int = Field(default=64, ge=1)
    #: arq's poll delay (only arq's own jobs - the cron sweeps - wait on it; the engine wakes via BLPOP).
    worker_poll_delay_s: float = Field(default=0.5, gt=0)
    #: Lease TTL: a SIGKILLed worker's serials are taken over at most this long after its last renewal.
    worker_lease_ttl_s: float = Field(default=10.0, gt=0)
    #: SIGTERM: how long in-flight serials may finish their current event before they are released.
    worker_grace_s: float = Field(default=8.0, ge=0)
    #: At start, how long to wait for Redis to answer before giving up with an error (a running worker waits
    #: out any outage: passbridge/outage.py).
    worker_redis_wait_s: float = Field(default=60.0, ge=0)
    #: Most serials one claim hands out, and most per account per claim.
    worker_claim_batch: int = Field(default=32, ge=1)
    #: Fair share: slots of a worker kept free for accounts holding fewer than this many serials there
    #: (unset: an eighth of the serials a worker holds: ``worker_bulk_max_serials`` in adaptive/bulk mode,
    #: ``worker_max_jobs`` in single mode). One account's backlog never fills a worker.
    worker_fair_reserve: int | None = Field(default=None, ge=0)
    #: Most events a serial is worked on under one lease before it goes to the back of the line.
    worker_events_per_lease: int = Field(default=200, ge=1)
    #: How workers write to Klaviyo (README "Throughput at Klaviyo's limits"): ``adaptive`` single calls for a
    #: small backlog and bulk endpoints as it grows, both budgets spent; ``single`` one call per operation,
    #: nothing coalesced; ``bulk`` bulk endpoints for everything (tests of the bulk path).
    worker_sync_mode: Literal["adaptive", "single", "bulk"] = "adaptive"
    #: In adaptive/bulk mode: serials a worker holds at once (a bulk request carries hundreds of them) ...
    worker_bulk_max_serials: int = Field(default=6000, ge=1)
    #: ... most serials one claim hands out (and per account) ...
    worker_bulk_claim_batch: int = Field(default=250, ge=1)
    #: ... and mailbox entries read per serial per round (its queued events coalesce into one write).
    worker_bulk_heads: int = Field(default=32, ge=1)
    #: Events received at most this long before they are worked on count as fresh: they are claimed ahead of
    #: a backlog and take single calls first (a few per second per account; the rest go by bulk). Long
    #: enough that a fresh event which waited for a free slot is still fresh when it gets one.
    worker_bulk_fresh_ms: int = Field(default=30_000, ge=0)
    #: A profile bulk-import job still queued or processing is waited for (no attempt counted, the serials'
    #: leases renewed) for up to this long; only then is the wait a transient failure. Klaviyo promises no
    #: completion time.
    worker_profile_job_max_wait_s: float = Field(default=1800.0, gt=0)
    #: Profile bulk-import jobs one worker process runs at once per account: while they run, more profiles
    #: wait in the lane and go in the next (bigger) job.
    worker_profile_jobs_in_flight: int = Field(default=4, ge=1)
    #: Express lane (README "Fair share"): each ``passbridge worker`` also runs a small child process that
    #: works only accounts with a small backlog, so their events never wait behind a big account's work ...
    worker_express_lane: bool = True
    #: ... an account is small while its backlog is at most this many pending events ...
    worker_express_small: int = Field(default=32, ge=0)
    #: ... other lanes leave a small account's due serials to the express lanes for this long (a dead
    #: express lane costs a small account at most this much latency) ...
    worker_express_grace_ms: int = Field(default=250, ge=0)
    #: ... the most serials one express lane works on at once ...
    worker_express_max_serials: int = Field(default=64, ge=1)
    #: ... and from how many held serials on a worker counts as busy (draining a backlog): only a busy worker
    #: leaves small accounts' events to the express lanes; an idle one takes them at once (0 = always leave).
    worker_express_busy_serials: int = Field(default=250, ge=0)
    #: With an express lane, the worker itself (whose loop drains backlogs) lowers its CPU priority by this
    #: much (``nice``): on a shared host, small accounts' events, Redis and the producer go first.
    worker_backlog_nice: int = Field(default=10, ge=0, le=19)
    #: Per-event history (ingested, attempts, written, dead-lettered, replayed) retention.
    history_retention_s: int = Field(default=7 * 86_400, ge=1)
    #: Retry defaults; an account's ``retry_policy`` overrides any of them.
    retry_base_delay_s: float = Field(default=1.0, ge=0)
    retry_max_delay_s: float = Field(default=300.0, ge=0)
    retry_max_attempts: int = Field(default=8, ge=1)
    retry_max_age_s: float = Field(default=24 * 3600.0, gt=0)
    #: How often the sweep checks a paused account's credentials (resuming it when they work again).
    pause_probe_interval_s: float = Field(default=60.0, gt=0)
    #: A metric event whose pass event happened longer ago than this when the worker sends it goes to Klaviyo
    #: with ``backfill: true`` (recorded, triggers no flow), as do all events of NDJSON backfills (0: only those).
    backfill_age_s: float = Field(default=24 * 3600.0, ge=0)

    # Operations (README "Operations"): each worker's Prometheus endpoint (unset = none) and its bind address.
    worker_metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    #: When set, /metrics (the producer's and each worker's) answers only ``Authorization: Bearer <token>``.
    metrics_token: SecretStr | None = None

    # Secrets at rest
    secret_key: SecretStr | None = None

    # Accounts (see README "Accounts")
    #: A declarative accounts.yaml the producer applies when it starts (workers do not); empty = none.
    accounts_file: Path | None = None
    #: The producer's public base URL, from which the OAuth redirect URI is built; empty = the bind address.
    public_url: str = ""
    #: Where a merchant approves an OAuth grant; empty = derived from the base URL (Klaviyo serves it on
    #: www.klaviyo.com, the sandbox on its own base URL).
    klaviyo_authorize_url: str = ""

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _any_case(cls, v: object) -> object:
        # INFO and info alike, as logging itself takes them.
        return v.lower() if isinstance(v, str) else v

    @field_validator("replay_reserve")
    @classmethod
    def _replay_room(cls, v: float, info: ValidationInfo) -> float:
        # A reserve that leaves no room under a small mark would make every replay wait forever.
        high_water = info.data.get("backlog_high_water")
        if isinstance(high_water, int) and replay_limit(high_water, v) < 1:
            raise ValueError(
                f"leaves a DLQ replay no room under PASSBRIDGE_BACKLOG_HIGH_WATER={high_water}: a replay fills "
                f"a backlog up to {high_water} x (1 - {v:g}) rounded down, which is 0; lower it"
            )
        return v

    @property
    def replay_limit(self) -> int:
        """Pending events per account up to which a DLQ replay fills a backlog (see :func:`replay_limit`)."""
        return replay_limit(self.backlog_high_water, self.replay_reserve)

    def oauth_authorize_url(self, klaviyo_base_url: str | None = None) -> str:
        """Klaviyo's authorize endpoint: ``PASSBRIDGE_KLAVIYO_AUTHORIZE_URL`` when set, else derived from
        ``klaviyo_base_url`` (an account's own base URL) or, without one, ``PASSBRIDGE_KLAVIYO_BASE_URL``."""
        if self.klaviyo_authorize_url:
            return self.klaviyo_authorize_url
        base = (klaviyo_base_url or self.klaviyo_base_url).rstrip("/")
        if base == "https://a.klaviyo.com":
            return "https://www.klaviyo.com/oauth/authorize"
        return f"{base}/oauth/authorize"

    def oauth_redirect_uri(self) -> str:
        """Where Klaviyo sends the merchant back: the producer's ``/oauth/klaviyo/callback``."""
        base = self.public_url or f"http://{self.producer_host}:{self.producer_port}"
        return base.rstrip("/") + "/oauth/klaviyo/callback"


def replay_limit(high_water: int, reserve: float) -> int:
    """``floor(high_water * (1 - reserve))``: how far a DLQ replay may fill an account's backlog, so that the
    rest of the high-water mark stays free for live ingest. The reserve is taken as written (0.1 is a tenth,
    not the binary float just above it), so a mark of 150 gives 135, not 134."""
    return math.floor(high_water * (1 - Fraction(repr(reserve))))


class SettingsError(ValueError):
    """A variable of the environment (or ``.env``) does not hold a valid value; the message names each one."""


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment.

    Raises :class:`SettingsError` naming each bad variable and why, never its value: it may be a secret.
    """
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors(include_input=False, include_url=False):
        field = str(err["loc"][0]) if err["loc"] else ""
        info = Settings.model_fields.get(field)
        alias = info.validation_alias if info is not None else None
        name = alias if isinstance(alias, str) else f"PASSBRIDGE_{field.upper()}"
        msg = err["msg"]
        # A validator's own message says what is wrong; pydantic's prefix adds nothing.
        if err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        lines.append(f"{name}: {msg}")
    return "invalid configuration:\n" + "\n".join(f"  {line}" for line in lines)
