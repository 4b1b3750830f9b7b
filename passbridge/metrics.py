"""What producer and worker processes count as things happen: Prometheus metrics and the activity recorder.

Every hook below is one call at the place where the thing happens, and feeds two sinks:

1. **prometheus-client** counters and a histogram in the process, scraped at ``/metrics`` (the producer's
   route, each worker's ``--metrics-port``). With several producer processes set ``PROMETHEUS_MULTIPROC_DIR``
   before they start (``passbridge producer --workers N`` does, see :func:`setup_multiprocess`): each process
   then writes its values to files there and a scrape of any one process adds them all up.
2. **the recorder** (:data:`RECORDER`): the same per-account counts, buffered in memory and added to Redis every
   :data:`FLUSH_S` seconds in 10-second buckets (``AccountKeys.series``) plus hourly pass-lifecycle counters
   (``AccountKeys.report``). That is what ``passbridge status``, the dashboard's charts and ``passbridge
   report`` read, so they see every process's activity without a Prometheus server. A process killed with
   SIGKILL loses at most its last unflushed :data:`FLUSH_S` seconds of counts (rates only, never events).

Gauges (queue depth, oldest event age, DLQ size, account state, workers) are not counted here: they are read
from Redis at scrape time (``worker/exporter.py`` over ``worker/inspect.py``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import os
import re
import shutil
import sys
import threading
import time
from collections import Counter as Tally
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import orjson
import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    mmap_dict,
    multiprocess,
)
from prometheus_client import values as prometheus_values
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from redis.asyncio import Redis
from redis.exceptions import RedisError

from passbridge.keys import (
    ACCOUNT_BASE_PREFIX,
    ACCOUNTS_INDEX,
    ACTIVE_ACCOUNTS,
    REMOVED_ACCOUNTS,
    SERIES_SAMPLED,
    account_keys,
)
from passbridge.scripts import script
from passbridge.tasks import cancel_until_done

if TYPE_CHECKING:
    # Only a type here: importing it would load email and phone validation into every reader of the
    # series (`passbridge status`, `dlq list`), which never builds an event.
    from passbridge.event import PassEvent

log = structlog.get_logger(__name__)

CONTENT_TYPE = CONTENT_TYPE_LATEST

# --- Prometheus ------------------------------------------------------------------------------------------

#: Where processes count in multiprocess mode (prometheus-client's own variable). An operator may set one
#: directory for every passbridge process on a host: each process tree then counts in a subdirectory of it.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: Set by passbridge, never by an operator: the directory passbridge chose for this process tree. When it
#: equals PROMETHEUS_MULTIPROC_DIR, that directory is this tree's own, not an operator's shared base.
OWN_DIR_ENV = "PASSBRIDGE_METRICS_OWN_DIR"
#: Free disk a multiprocess metrics directory must have at start: its processes' first value files.
ROOM_BYTES = 1 << 20


def setup_multiprocess(directory: Path) -> Path:
    """Point ``PROMETHEUS_MULTIPROC_DIR`` at ``directory``, emptied of metric files, for child processes.

    prometheus-client chooses its storage when it is first imported, so this must run before the processes
    that record metrics start (they inherit the environment); the calling process itself is not switched
    (unless it was in multiprocess mode already and has opened no metric file yet, as at this module's import).
    """
    directory.mkdir(parents=True, exist_ok=True)
    # Values of earlier runs would be added to this run's; only prometheus-client's own files are removed.
    for stale in directory.glob("*.db"):
        stale.unlink()
    # Room for the value files the processes open as they start (an OSError here is one line for the CLI,
    # not a traceback of the first metric each process creates).
    probe = directory / f".room-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            _allocate(fd, ROOM_BYTES)
        finally:
            os.close(fd)
    finally:
        probe.unlink(missing_ok=True)
    os.environ[MULTIPROC_ENV] = str(directory)
    os.environ[OWN_DIR_ENV] = str(directory)
    return directory


def _own_multiprocess_dir() -> None:
    """Move this process tree out of an operator's shared ``PROMETHEUS_MULTIPROC_DIR`` into a subdirectory.

    One directory is often set for every unit on a host (one env file for producer and workers). Used as it
    is, every /metrics would add up the files of all processes there (counting each event once per scraped
    process), and a producer start, which empties its directory, would delete running workers' counts. So the
    first passbridge process that sees such a directory counts in ``<dir>/<command>-<pid>`` instead, emptied
    first (a reused pid) and removed when the process exits; its children (uvicorn's processes, the express
    lane) inherit that and add up with it. A scrape reads only its own tree's directory.

    Runs at import, before any metric below opens its file.
    """
    base = os.environ.get(MULTIPROC_ENV)
    if not base or os.environ.get(OWN_DIR_ENV) == base:
        return
    own = setup_multiprocess(Path(base) / f"{_command_name()}-{os.getpid()}")
    atexit.register(_remove_own_dir, own, os.getpid())


def _command_name() -> str:
    # `passbridge producer ...` -> "producer": tells an operator looking into the directory whose files are whose.
    args = sys.argv
    program = Path(args[0]) if args else Path()
    ours = program.name == "passbridge" or program.parts[-2:] == ("passbridge", "__main__.py")  # or -m
    if ours and len(args) > 1 and re.fullmatch(r"[a-z][a-z-]{0,30}", args[1]):
        return args[1]
    return "process"


def _remove_own_dir(directory: Path, creator: int) -> None:
    if os.getpid() == creator:  # not in a forked copy that happens to exit through Python
        shutil.rmtree(directory, ignore_errors=True)


class _AllocatedMmapedDict(mmap_dict.MmapedDict):
    """prometheus-client's value file (multiprocess mode), with its disk blocks allocated before use.

    The library sizes the file with ``truncate`` (a sparse file: no blocks yet) and writes values into a
    memory map of it. On a full disk the first write to a page without a block is a SIGBUS, which killed a
    worker outright (found by filling the disk of its state dir under load). Allocated up front, a full disk
    is an ``OSError`` where the file is opened or grown, and a disk that fills later never reaches the map.
    """

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        if not read_mode:
            fd = os.open(filename, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                _allocate(fd, max(os.fstat(fd).st_size, mmap_dict._INITIAL_MMAP_SIZE))
            finally:
                os.close(fd)
        super().__init__(filename, read_mode)  # type: ignore[no-untyped-call]

    def _init_value(self, key: str) -> None:
        # A new key that does not fit doubles the file (in the library): allocate that size first. The
        # key's record is its bytes, up to 8 of padding and 4 + 16 of length and values.
        needed = self._used + len(key.encode("utf-8")) + 28
        capacity = self._capacity
        while needed > capacity:
            capacity *= 2
        if capacity != self._capacity:
            _allocate(self._f.fileno(), capacity)
        super()._init_value(key)  # type: ignore[no-untyped-call]


def _allocate(fd: int, size: int) -> None:
    """Give the file ``size`` bytes of disk blocks (where the OS can say so; else the library's own way)."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)


_own_multiprocess_dir()
if os.environ.get(MULTIPROC_ENV):
    # Before any metric below opens its file.
    prometheus_values.MmapedDict = _AllocatedMmapedDict  # type: ignore[attr-defined]
if _multiproc_dir := os.environ.get(MULTIPROC_ENV):
    # In multiprocess mode every metric below opens a file there as it is created: the directory must exist.
    Path(_multiproc_dir).mkdir(parents=True, exist_ok=True)

INGESTED = Counter(
    "passbridge_ingested_events",
    "Events the producer accepted and enqueued (duplicates not included), by account and source.",
    ["account", "source"],
)
DUPLICATES = Counter(
    "passbridge_duplicate_events",
    "Events the producer acknowledged as duplicates of an event id seen within the dedup window.",
    ["account", "source"],
)
REJECTED = Counter(
    "passbridge_rejected",
    "Requests (and NDJSON lines) the producer refused, by reason (the problem type, e.g. unauthorized, "
    "validation, unavailable).",
    ["reason"],
)
DELIVERED = Counter(
    "passbridge_delivered_events",
    "Events Klaviyo accepted and the engine removed from the queue.",
    ["account"],
)
DEAD_LETTERED = Counter(
    "passbridge_dead_lettered_events", "Events the engine moved to the dead-letter queue.", ["account"]
)
RETRIES = Counter(
    "passbridge_retries",
    "Failed attempts the engine scheduled for another try, by failure kind (transient, internal, ...).",
    ["account", "kind"],
)
KLAVIYO_REQUESTS = Counter(
    "passbridge_klaviyo_requests",
    "Klaviyo API requests, by account, endpoint (Klaviyo operationId) and HTTP status, or timeout / network "
    "when no answer came.",
    ["account", "endpoint", "status"],
)
KLAVIYO_THROTTLED = Counter(
    "passbridge_klaviyo_throttled",
    "Klaviyo 429 answers (also counted in passbridge_klaviyo_requests_total{status='429'}).",
    ["account", "endpoint"],
)
LATENCY = Histogram(
    "passbridge_end_to_end_latency_seconds",
    "From the producer receiving an event to Klaviyo accepting it (retries and pauses included).",
    ["account"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 6 * 3600, 86_400),
)
TAKEOVERS = Counter(
    "passbridge_lease_takeovers",
    "Expired leases taken over by another worker or the sweep (a worker died or stalled).",
)


class _Families(Collector):
    """Hands precomputed metric families (the scrape-time gauges) to a registry."""

    def __init__(self, families: Sequence[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def exposition(extra: Sequence[Metric] = ()) -> bytes:
    """The text exposition of this process's metrics (all processes' in multiprocess mode) plus ``extra``."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        base = generate_latest(registry)
    else:
        base = generate_latest(REGISTRY)
    if not extra:
        return base
    scraped = CollectorRegistry(auto_describe=False)
    scraped.register(_Families(extra))
    return base + generate_latest(scraped)


# --- the recorder ---------------------------------------------------------------------------------------

#: Width of one activity bucket, seconds.
BUCKET_S = 10
#: Buckets per ``AccountKeys.series`` hash (one hour).
BUCKETS_PER_HOUR = 3600 // BUCKET_S
#: How long activity buckets are kept (the dashboard charts the last 30 minutes).
SERIES_TTL_S = 6 * 3600
#: How long report counters are kept after their day.
REPORT_TTL_S = 400 * 86_400
#: How often a process adds its buffered counts to Redis.
FLUSH_S = 2.0

#: Counted series: ingested (``in``), duplicates (``dup``), delivered (``out``), dead-lettered (``dead``),
#: retries scheduled (``retry``), Klaviyo answers (``req``) and 429s (``429``).
SERIES = ("in", "dup", "out", "dead", "retry", "req", "429")
#: Sampled once per bucket by one process: pending events (``depth``) and DLQ size (``dlq``).
SAMPLED = ("depth", "dlq")

_SEQ_CHARS = 12  # a mailbox member starts with the arrival sequence, 12 hex digits (enqueue.lua)


def bucket_of(epoch_s: float) -> int:
    """The activity bucket holding ``epoch_s``."""
    return int(epoch_s) // BUCKET_S


def report_field(hour: int, kind: str, platform: str, pass_type: str) -> str:
    """A field of an ``AccountKeys.report`` hash."""
    return f"{hour:02d}|{kind}|{platform}|{pass_type}"


class Recorder:
    """Per-account counts buffered in the process; :meth:`flush` adds them to Redis (see the module docstring).

    Thread-safe: tests run producers in threads of one process, each flushing the same recorder.
    """

    #: Buffered entries beyond which counts are dropped while Redis is unreachable (memory bound).
    MAX_PENDING = 100_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: Tally[tuple[str, int, str]] = Tally()
        self._report: Tally[tuple[str, str, str]] = Tally()

    def count(self, account_id: str, name: str, n: int = 1, *, at_s: float | None = None) -> None:
        """Add ``n`` to series ``name`` (one of :data:`SERIES`) of the account, in the current bucket."""
        if n <= 0:
            return
        bucket = bucket_of(time.time() if at_s is None else at_s)
        with self._lock:
            self._series[(account_id, bucket, name)] += n

    def tally(self, account_id: str, occurred: datetime, kind: str, platform: str, pass_type: str) -> None:
        """Count one pass lifecycle event for the report, in the UTC hour it occurred."""
        at = occurred.astimezone(UTC)
        field = report_field(at.hour, kind, platform, pass_type)
        day = f"{at.year:04d}{at.month:02d}{at.day:02d}"  # strftime("%Y%m%d"), without its cost per event
        with self._lock:
            self._report[(account_id, day, field)] += 1

    def tally_report(self, account_id: str, counts: Mapping[tuple[str, str], int]) -> None:
        """:meth:`tally` for many events at once: ``counts`` by (day, field) from :func:`report_key`."""
        with self._lock:
            for (day, field), n in counts.items():
                self._report[(account_id, day, field)] += n

    def take(self) -> tuple[Tally[tuple[str, int, str]], Tally[tuple[str, str, str]]]:
        """Everything buffered so far (the buffers start empty again)."""
        with self._lock:
            series, report = self._series, self._report
            self._series, self._report = Tally(), Tally()
        return series, report

    def put_back(self, series: Tally[tuple[str, int, str]], report: Tally[tuple[str, str, str]]) -> None:
        """Return counts a failed flush took (dropped if the buffer is already too large)."""
        with self._lock:
            if len(self._series) + len(self._report) < self.MAX_PENDING:
                self._series.update(series)
                self._report.update(report)

    async def flush(self, redis: Redis, *, now_s: float | None = None) -> int:
        """Add the buffered counts to Redis and sample depths if this process is first in the bucket.

        Returns how many counters were written (a purged account's are dropped). Counts survive a failed flush (see :meth:`put_back`).
        """
        series, report = self.take()
        written = 0
        if series or report:
            try:
                written = await _write(redis, series, report)
            except (RedisError, OSError):
                self.put_back(series, report)
                raise
        await sample(redis, time.time() if now_s is None else now_s)
        return written

    async def run(self, redis: Redis, interval_s: float = FLUSH_S) -> None:
        """Flush every ``interval_s`` until cancelled (see :func:`start_flusher`)."""
        from passbridge.outage import OutageLog, is_outage

        outage = OutageLog("activity-flush")
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.flush(redis)
            except (RedisError, OSError) as exc:
                if is_outage(exc):
                    outage.failed(exc)  # the counts wait in the buffer (put_back)
                else:
                    log.warning("activity_flush_failed", error=type(exc).__name__)
                continue
            outage.succeeded()


def start_flusher(redis: Redis, interval_s: float = FLUSH_S) -> asyncio.Task[None]:
    """Start flushing :data:`RECORDER` to ``redis`` in the background (one per process and event loop)."""
    return asyncio.create_task(RECORDER.run(redis, interval_s), name="activity-flusher")


async def stop_flusher(task: asyncio.Task[None], redis: Redis) -> None:
    """Stop the flusher and flush what is left (best effort: Redis may be gone already)."""
    await cancel_until_done(task)  # not a bare cancel and await: see cancel_until_done
    with contextlib.suppress(RedisError, OSError):
        await RECORDER.flush(redis)


#: Increments per ``record_counts.lua`` call: a large flush is split so that no call holds Redis for long.
_WRITE_CHUNK = 2000


async def _write(
    redis: Redis, series: Tally[tuple[str, int, str]], report: Tally[tuple[str, str, str]]
) -> int:
    # Lua calls (record_counts.lua) with the increments, each with one EXPIREAT per hash it touched (and the
    # hash's account: a purged account's counts are dropped there).
    counts: list[tuple[str, str, int, int, str]] = []
    series_end = int(time.time()) + SERIES_TTL_S
    for (account_id, bucket, name), n in series.items():
        key = account_keys(account_id).series(bucket // BUCKETS_PER_HOUR)
        counts.append((key, f"{bucket}:{name}", n, series_end, account_id))
    for (account_id, day, field), n in report.items():
        key = account_keys(account_id).report(day)
        counts.append((key, field, n, _day_end(day) + REPORT_TTL_S, account_id))
    call = script(redis, "record_counts")
    written = 0
    for start in range(0, len(counts), _WRITE_CHUNK):
        part = counts[start : start + _WRITE_CHUNK]
        args: list[str | int] = [len(part), ACCOUNTS_INDEX, ACTIVE_ACCOUNTS, REMOVED_ACCOUNTS]
        hashes: dict[str, tuple[int, str]] = {}
        for key, field, n, at, account_id in part:
            args += [key, field, n]
            hashes[key] = (at, account_id)
        for key, (at, account_id) in hashes.items():
            args += [key, at, account_id]
        written += int(await call(args=args))
    return written


@functools.lru_cache(maxsize=1024)
def _day_end(day: str) -> int:
    """Epoch seconds at the end of a ``YYYYMMDD`` UTC day."""
    return int(datetime.strptime(day, "%Y%m%d").replace(tzinfo=UTC).timestamp()) + 86_400


async def sample(redis: Redis, now_s: float) -> bool:
    """Record every account's depth and DLQ size in the current bucket, once per bucket across all processes.

    Returns whether this call took the sample.
    """
    bucket = bucket_of(now_s)
    if not await redis.set(SERIES_SAMPLED + str(bucket), 1, nx=True, ex=BUCKET_S * 6):
        return False
    # In one script: see sample_series.lua (a purge in between left a purged account's series behind).
    await script(redis, "sample_series")(
        args=[
            ACCOUNTS_INDEX,
            ACTIVE_ACCOUNTS,
            ACCOUNT_BASE_PREFIX,
            bucket // BUCKETS_PER_HOUR,
            bucket,
            SERIES_TTL_S,
        ]
    )
    return True


#: The process's recorder; the hooks below feed it.
RECORDER = Recorder()


# --- hooks: one call where the thing happens -------------------------------------------------------------


@functools.lru_cache(maxsize=65_536)
def report_key(
    year: int, month: int, day: int, hour: int, kind: str, platform: str, pass_type: str
) -> tuple[str, str]:
    """The report's (day, field) for an event that occurred in that UTC hour; cached, as a backfill repeats
    the same few thousand hours, kinds and platforms over and over."""
    return f"{year:04d}{month:02d}{day:02d}", report_field(hour, kind, platform, pass_type)


@functools.lru_cache(maxsize=16_384)
def _counter_child(metric: Counter, *labels: str) -> Counter:
    # prometheus-client validates and locks on every labels() call (~3 µs); the children never change.
    return metric.labels(*labels)


@functools.lru_cache(maxsize=4_096)
def _histogram_child(metric: Histogram, *labels: str) -> Histogram:
    return metric.labels(*labels)


class _Discard:
    """Stands in for a metric child whose value file could not be written (a full disk, multiprocess mode)."""

    def inc(self, amount: float = 1) -> None:
        """Count nothing."""

    def observe(self, amount: float) -> None:
        """Observe nothing."""


_DISCARD = _Discard()
#: When the last "metrics not written" line was logged (monotonic s): at most one a minute.
_discard_logged = -60.0


def _no_child(exc: OSError) -> Any:
    # A new child opens (and, in multiprocess mode, allocates) its value file: on a full disk that fails, and
    # a metric must never fail the work it counts (a written event, a Klaviyo call). Not cached: counting
    # resumes once there is room.
    global _discard_logged
    now = time.monotonic()
    if now - _discard_logged >= 60:
        _discard_logged = now
        log.error(
            "metrics_not_written",
            error=f"{type(exc).__name__}: {exc}",
            directory=os.environ.get(MULTIPROC_ENV),
        )
    return _DISCARD


def _counter(metric: Counter, *labels: str) -> Counter:
    try:
        return _counter_child(metric, *labels)
    except OSError as exc:
        return cast(Counter, _no_child(exc))


def _histogram(metric: Histogram, *labels: str) -> Histogram:
    try:
        return _histogram_child(metric, *labels)
    except OSError as exc:
        return cast(Histogram, _no_child(exc))


def events_ingested(account_id: str, events: Sequence[PassEvent], accepted: Sequence[bool]) -> None:
    """The producer enqueued ``events``; ``accepted[i]`` is False for a duplicate."""
    # Plain dicts and the kind/platform members themselves (a StrEnum member is its value as a str; reading
    # ``.value`` goes through an enum property): this runs once per ingested event.
    fresh: dict[str, int] = {}
    dups: dict[str, int] = {}
    report: dict[tuple[str, str], int] = {}
    for event, new in zip(events, accepted, strict=True):
        if new:
            fresh[event.source] = fresh.get(event.source, 0) + 1
            at = event.occurred_at
            if at.tzinfo is not UTC:
                at = at.astimezone(UTC)
            key = report_key(at.year, at.month, at.day, at.hour, event.kind, event.platform, event.pass_type)
            report[key] = report.get(key, 0) + 1
        else:
            dups[event.source] = dups.get(event.source, 0) + 1
    if report:
        RECORDER.tally_report(account_id, report)
    for source, n in fresh.items():
        _counter(INGESTED, account_id, source).inc(n)
    for source, n in dups.items():
        _counter(DUPLICATES, account_id, source).inc(n)
    RECORDER.count(account_id, "in", sum(fresh.values()))
    RECORDER.count(account_id, "dup", sum(dups.values()))


def rejected(reason: str, n: int = 1) -> None:
    """The producer refused a request (or ``n`` NDJSON lines) for ``reason``."""
    if n > 0:
        _counter(REJECTED, reason).inc(n)


def klaviyo_response(account_id: str, endpoint: str, status: int | str) -> None:
    """Klaviyo answered a request with HTTP ``status``, or gave no answer: ``"timeout"`` or ``"network"``
    (connection refused, reset or dropped)."""
    _counter(KLAVIYO_REQUESTS, account_id, endpoint, str(status)).inc()
    RECORDER.count(account_id, "req")
    if status == 429:
        _counter(KLAVIYO_THROTTLED, account_id, endpoint).inc()
        RECORDER.count(account_id, "429")


def events_written(account_id: str, members: Sequence[bytes], *, now_s: float | None = None) -> None:
    """The engine settled ``members`` (mailbox entries) as accepted by Klaviyo; observes their latency."""
    now = time.time() if now_s is None else now_s
    _counter(DELIVERED, account_id).inc(len(members))
    RECORDER.count(account_id, "out", len(members), at_s=now)
    histogram = _histogram(LATENCY, account_id)
    for member in members:
        received = _received_s(member)
        if received is not None:
            histogram.observe(max(0.0, now - received))


def event_dead_lettered(account_id: str) -> None:
    """The engine moved an event to the DLQ."""
    _counter(DEAD_LETTERED, account_id).inc()
    RECORDER.count(account_id, "dead")


def retry_scheduled(account_id: str, kind: str) -> None:
    """The engine parked a serial to try its failed head event again."""
    _counter(RETRIES, account_id, kind).inc()
    RECORDER.count(account_id, "retry")


def leases_taken_over(n: int) -> None:
    """``n`` expired leases were taken over."""
    if n > 0:
        TAKEOVERS.inc(n)


def _received_s(member: bytes) -> float | None:
    try:
        received = orjson.loads(member[_SEQ_CHARS:])["r"]
        return datetime.fromisoformat(received).timestamp()
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
