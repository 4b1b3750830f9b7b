"""Profile bulk-import jobs (:mod:`worker.import_jobs`) against the sandbox over HTTP and a real Redis.

The sandbox here processes jobs slowly (``job_step_s``: queued, then processing, then complete, each step
0.4 s), so a job a "killed" worker left behind is still running when the next holder of its serials asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from klaviyo_sandbox.client import SandboxClient
from klaviyo_sandbox.config import SandboxConfig
from klaviyo_sandbox.testing import SandboxServer, start_sandbox
from passbridge.accounts import Account
from passbridge.keys import WORKERS, account_keys
from passbridge.settings import Settings
from tests.conftest import async_wait_for
from worker import dlq, history
from worker.history import HistoryKind
from worker.import_jobs import ImportJobs, job_body
from worker.klaviyo.client import KlaviyoClient
from worker.klaviyo.endpoints import BULK_IMPORT_PROFILES, GET_BULK_IMPORT_PROFILES_JOB
from worker.klaviyo.errors import PermanentError, TransientError

from .e2e import RATE_SCALE, Pipeline, Workers, drained, worker_env
from .helpers import pass_event

JOB_STEP_S = 0.4


@pytest.fixture(scope="module")
def slow_jobs_server() -> Iterator[SandboxServer]:
    server = start_sandbox(SandboxConfig(rate_scale=RATE_SCALE, job_step_s=JOB_STEP_S))
    yield server
    server.stop()


@pytest.fixture
def slow_sandbox(slow_jobs_server: SandboxServer) -> Iterator[SandboxClient]:
    client = SandboxClient(slow_jobs_server.url)
    client.clear_faults()
    yield client
    client.clear_faults()
    client.close()


@pytest.fixture
async def setup(
    redis: Redis,
    slow_sandbox: SandboxClient,
    slow_jobs_server: SandboxServer,
    settings: Settings,
    secret_key: str,
) -> AsyncIterator[tuple[Pipeline, Account, KlaviyoClient]]:
    s = settings.model_copy(
        update={"klaviyo_base_url": slow_jobs_server.url, "klaviyo_rate_scale": RATE_SCALE}
    )
    pipeline = Pipeline(redis, slow_sandbox, slow_jobs_server, secret_key, s)
    account = await pipeline.add_account(f"acct-{time.monotonic_ns()}")
    async with KlaviyoClient.from_settings(s, redis, pipeline.store) as client:
        yield pipeline, account, client


def profile(serial: str, **attrs: Any) -> bytes:
    return orjson.dumps({"type": "profile", "attributes": {"external_id": serial, **attrs}})


async def start_job(client: KlaviyoClient, account: Account, serials: list[str]) -> str:
    """POST a job the way a worker does, without waiting for it (the worker is then "killed")."""
    reply = await client.call(account, BULK_IMPORT_PROFILES, content=job_body([profile(s) for s in serials]))
    return str(reply.body["data"]["id"])


async def job_status(client: KlaviyoClient, account: Account, job_id: str) -> str:
    reply = await client.call(account, GET_BULK_IMPORT_PROFILES_JOB, path_params={"job_id": job_id})
    return str(reply.body["data"]["attributes"]["status"])


async def markers(redis: Redis, account: Account) -> dict[str, dict[str, Any]]:
    raw = await redis.hgetall(account_keys(account.account_id).profile_jobs)
    return {k.decode(): orjson.loads(v) for k, v in raw.items()}


async def mark(redis: Redis, account: Account, serials: list[str], job: str, at_ms: int) -> None:
    doc = orjson.dumps({"job": job, "at": at_ms})
    await redis.hset(account_keys(account.account_id).profile_jobs, mapping=dict.fromkeys(serials, doc))


def now_ms() -> int:
    return int(time.time() * 1000)


async def test_run_maps_each_import_error_to_its_item_and_clears_its_markers(
    setup: tuple[Pipeline, Account, KlaviyoClient],
) -> None:
    pipeline, account, client = setup
    pipeline.sandbox.set_faults(reject_external_ids=["S2"])
    jobs = ImportJobs(client, pipeline.redis, poll_first_s=0.02, poll_max_s=0.1)
    serials = ["S1", "S2", "S3", "S4"]
    blobs = [
        profile("S1", email="one@example.com"),
        profile("S2"),
        profile("S3", email="one@example.com"),  # S1 (imported first) owns this email
        profile("S4", phone_number="+14155550123"),
    ]
    task = asyncio.create_task(jobs.run(account, blobs, serials))
    # While the job runs, each serial is marked with the job's id (a later holder would wait for it).
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 5
    while not task.done() and time.monotonic() < deadline:
        m = await markers(pipeline.redis, account)
        if m and all(doc["job"] for doc in m.values()):
            seen = m
            break
        await asyncio.sleep(0.01)
    errors = await task
    assert sorted(seen) == serials
    assert len({doc["job"] for doc in seen.values()}) == 1
    assert errors[0] is None
    assert errors[3] is None
    assert isinstance(errors[1], PermanentError)
    assert (errors[1].status, errors[1].code) == (400, "invalid")
    assert errors[1].pointer == "/data/attributes/profiles/data/1/attributes/external_id"
    assert isinstance(errors[2], PermanentError)
    assert (errors[2].status, errors[2].code) == (409, "duplicate_profile")
    assert errors[2].endpoint == "bulk_import_profiles"
    assert await markers(pipeline.redis, account) == {}
    assert jobs.jobs == 1
    assert pipeline.sandbox.profile("S4", pipeline.accounts[account.account_id]) is not None


async def test_wait_clear_waits_for_the_job_a_killed_worker_left(
    setup: tuple[Pipeline, Account, KlaviyoClient],
) -> None:
    pipeline, account, client = setup
    started = time.monotonic()
    job_id = await start_job(client, account, ["A", "B"])
    await mark(pipeline.redis, account, ["A", "B"], job_id, now_ms())
    assert await job_status(client, account, job_id) == "queued"
    jobs = ImportJobs(client, pipeline.redis, poll_first_s=0.02, poll_max_s=0.1)
    await jobs.wait_clear(account, ["A", "C"])
    # Not before the job completed (queued, then processing: two steps).
    assert await job_status(client, account, job_id) == "complete"
    assert time.monotonic() - started >= 2 * JOB_STEP_S * 0.9
    # The marker of the serial asked about is gone; the other serial's stays for whoever holds it.
    assert sorted(await markers(pipeline.redis, account)) == ["B"]


async def test_wait_clear_without_markers_asks_nothing(
    setup: tuple[Pipeline, Account, KlaviyoClient],
) -> None:
    pipeline, account, client = setup
    polls = pipeline.sandbox.count("get_bulk_import_profiles_job")
    lists = pipeline.sandbox.count("get_bulk_import_profiles_jobs")
    jobs = ImportJobs(client, pipeline.redis)
    started = time.monotonic()
    await jobs.wait_clear(account, ["X", "Y"])
    await jobs.wait_clear(account, [])
    assert time.monotonic() - started < 0.5
    assert pipeline.sandbox.count("get_bulk_import_profiles_job") == polls
    assert pipeline.sandbox.count("get_bulk_import_profiles_jobs") == lists


async def test_orphan_marker_waits_for_jobs_created_around_it(
    setup: tuple[Pipeline, Account, KlaviyoClient],
) -> None:
    """A worker killed during the POST leaves an unnamed marker: its job may exist, and nobody knows its id.
    The next holder waits until no job created up to ``orphan_slack_s`` after the marker is unfinished."""
    pipeline, account, client = setup
    await mark(pipeline.redis, account, ["A"], "", now_ms())
    job_id = await start_job(client, account, ["A"])
    jobs = ImportJobs(client, pipeline.redis, poll_first_s=0.02, poll_max_s=0.1, orphan_slack_s=2.0)
    await jobs.wait_clear(account, ["A"])
    assert await job_status(client, account, job_id) == "complete"
    assert await markers(pipeline.redis, account) == {}


async def test_orphan_wait_asks_the_job_list_again_after_a_failure(
    setup: tuple[Pipeline, Account, KlaviyoClient],
) -> None:
    pipeline, account, client = setup
    await mark(pipeline.redis, account, ["A"], "", now_ms())
    job_id = await start_job(client, account, ["A"])
    pipeline.sandbox.set_faults(error_rates={503: 1.0}, operations=["get_bulk_import_profiles_jobs"])
    jobs = ImportJobs(client, pipeline.redis, poll_first_s=0.02, poll_max_s=0.05, orphan_slack_s=2.0)
    task = asyncio.create_task(jobs.wait_clear(account, ["A"]))
    await asyncio.sleep(0.2)
    pipeline.sandbox.clear_faults()
    await asyncio.wait_for(task, 10)
    assert client.calls[("get_bulk_import_profiles_jobs", "503")] > 0
    assert await job_status(client, account, job_id) == "complete"
    assert await markers(pipeline.redis, account) == {}


async def test_orphan_marker_does_not_wait_for_jobs_created_well_after_it(
    setup: tuple[Pipeline, Account, KlaviyoClient],
) -> None:
    pipeline, account, client = setup
    await mark(pipeline.redis, account, ["A"], "", now_ms() - 60_000)
    job_id = await start_job(client, account, ["Z"])
    jobs = ImportJobs(client, pipeline.redis, poll_first_s=0.02, poll_max_s=0.1, orphan_slack_s=2.0)
    started = time.monotonic()
    await jobs.wait_clear(account, ["A"])
    assert time.monotonic() - started < JOB_STEP_S
    assert await job_status(client, account, job_id) != "complete"
    assert await markers(pipeline.redis, account) == {}


async def test_wait_clear_gives_up_after_max_wait_and_keeps_the_marker(
    setup: tuple[Pipeline, Account, KlaviyoClient],
) -> None:
    pipeline, account, client = setup
    job_id = await start_job(client, account, ["A"])
    await mark(pipeline.redis, account, ["A"], job_id, now_ms())
    jobs = ImportJobs(client, pipeline.redis, poll_first_s=0.02, poll_max_s=0.05, max_wait_s=0.2)
    with pytest.raises(TransientError, match="not complete yet"):
        await jobs.wait_clear(account, ["A"])
    # The serial's next attempt must wait for the same job again.
    assert (await markers(pipeline.redis, account))["A"]["job"] == job_id


async def test_a_job_klaviyo_no_longer_knows_counts_as_done(
    setup: tuple[Pipeline, Account, KlaviyoClient],
) -> None:
    pipeline, account, client = setup
    await mark(pipeline.redis, account, ["A"], "01JUNKNOWNJOB0000000000000", now_ms())
    jobs = ImportJobs(client, pipeline.redis, poll_first_s=0.01)
    await jobs.wait_clear(account, ["A"])
    assert await markers(pipeline.redis, account) == {}


async def test_a_failed_status_poll_is_asked_again_not_raised(
    setup: tuple[Pipeline, Account, KlaviyoClient],
) -> None:
    pipeline, account, client = setup
    jobs = ImportJobs(client, pipeline.redis, poll_first_s=0.02, poll_max_s=0.05, max_wait_s=5.0)
    # Every status poll fails at first (a 5xx, then a connection dropped after the answer was made): the job
    # itself runs on, so the import waits it out instead of failing its serials' attempt.
    pipeline.sandbox.set_faults(error_rates={503: 0.5}, operations=["get_bulk_import_profiles_job"], seed=7)
    task = asyncio.create_task(jobs.run(account, [profile("A"), profile("B")], ["A", "B"]))
    await asyncio.sleep(0.3)
    pipeline.sandbox.set_faults(
        drop_rate=1.0, drop_after_processing=True, operations=["get_bulk_import_profiles_job"]
    )
    await asyncio.sleep(0.2)
    pipeline.sandbox.clear_faults()
    assert await asyncio.wait_for(task, 10) == [None, None]
    assert await markers(pipeline.redis, account) == {}
    assert (
        client.calls[("get_bulk_import_profiles_job", "503")]
        + client.calls[("get_bulk_import_profiles_job", "network")]
        > 0
    )
    # Past the deadline a failing poll still raises (the serial is retried later, its marker kept).
    pipeline.sandbox.set_faults(error_rates={503: 1.0}, operations=["get_bulk_import_profiles_job"])
    short = ImportJobs(client, pipeline.redis, poll_first_s=0.02, poll_max_s=0.05, max_wait_s=0.2)
    with pytest.raises(TransientError):
        await short.run(account, [profile("C")], ["C"])
    assert sorted(await markers(pipeline.redis, account)) == ["C"]


async def test_markers_stay_when_the_post_may_have_created_a_job(
    setup: tuple[Pipeline, Account, KlaviyoClient],
) -> None:
    pipeline, account, client = setup
    jobs = ImportJobs(client, pipeline.redis)
    # A 5xx: Klaviyo may have created the job; the unnamed markers stay so the next holder waits for it.
    pipeline.sandbox.set_faults(error_rates={503: 1.0}, operations=["bulk_import_profiles"])
    with pytest.raises(TransientError):
        await jobs.run(account, [profile("A"), profile("B")], ["A", "B"])
    left = await markers(pipeline.redis, account)
    assert sorted(left) == ["A", "B"]
    assert {doc["job"] for doc in left.values()} == {""}
    # A 4xx: no job exists; the markers go.
    await pipeline.redis.delete(account_keys(account.account_id).profile_jobs)
    pipeline.sandbox.set_faults(error_rates={400: 1.0}, operations=["bulk_import_profiles"])
    with pytest.raises(PermanentError):
        await jobs.run(account, [profile("C")], ["C"])
    assert await markers(pipeline.redis, account) == {}
    assert jobs.jobs == 0
    # Cancelled while the POST is in flight (a shutdown): the job may exist, so the markers stay.
    pipeline.sandbox.set_faults(latency_ms=1000, operations=["bulk_import_profiles"])
    task = asyncio.create_task(jobs.run(account, [profile("D")], ["D"]))
    await async_wait_for(lambda: markers(pipeline.redis, account), timeout=5, interval=0.01)
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(await markers(pipeline.redis, account)) == ["D"]


@pytest.mark.parametrize("throttled", ["status", "errors"])
async def test_a_throttle_after_the_job_was_created_is_transient_and_keeps_the_markers(
    setup: tuple[Pipeline, Account, KlaviyoClient], throttled: str
) -> None:
    """The job exists once Klaviyo answered 202: a 429 on its status polls (until the wait's deadline) or on
    its error list is no "not sent". Raised as ThrottledError, the profile lane would send the same profiles
    again as a new job that overwrites this one's markers; it must be a TransientError, markers kept."""
    pipeline, account, client = setup
    if throttled == "status":
        pipeline.sandbox.set_faults(error_rates={429: 1.0}, operations=["get_bulk_import_profiles_job"])
    else:
        # An import error for B makes the job's error list worth reading; reading it is throttled.
        pipeline.sandbox.set_faults(
            error_rates={429: 1.0},
            operations=["get_errors_for_bulk_import_profiles_job"],
            reject_external_ids=["B"],
            reject_operations=["bulk_import_profiles"],
        )
    # (Throttled polls go on until the deadline; the error list is read once the job completed, ~0.8 s.)
    wait_s = 0.5 if throttled == "status" else 10.0
    jobs = ImportJobs(client, pipeline.redis, poll_first_s=0.02, poll_max_s=0.05, max_wait_s=wait_s)
    with pytest.raises(TransientError, match="profile import job") as raised:
        await jobs.run(account, [profile("A"), profile("B")], ["A", "B"])
    assert type(raised.value) is TransientError
    assert jobs.jobs == 1
    op = (
        "get_bulk_import_profiles_job" if throttled == "status" else "get_errors_for_bulk_import_profiles_job"
    )
    assert client.calls[(op, "429")] > 0
    # The markers name the job, so the serials' next profile writes wait for it.
    left = await markers(pipeline.redis, account)
    assert sorted(left) == ["A", "B"]
    (job_id,) = {doc["job"] for doc in left.values()}
    assert job_id
    pipeline.sandbox.clear_faults()
    await jobs.wait_clear(account, ["A", "B"])
    assert await job_status(client, account, job_id) == "complete"
    assert await markers(pipeline.redis, account) == {}


def test_polls_back_off_with_the_jobs_age() -> None:
    """A fast job is polled as it always was (doubling from 50 ms up to 2 s); an older one every tenth of its
    age, at most every 30 s: a 30-minute job costs about a hundred polls, not 900."""
    jobs = ImportJobs(None, None)  # type: ignore[arg-type]  # (the schedule needs neither)
    delays, age, delay = [], 0.0, jobs.poll_first_s
    while age < 1800:
        age += delay
        delays.append(delay)
        delay = jobs.next_delay(delay, age)
    assert delays[:7] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0]
    assert jobs.next_delay(2.0, 100.0) == 4.0
    assert jobs.next_delay(8.0, 100.0) == 10.0
    assert jobs.next_delay(30.0, 1000.0) == 30.0
    assert len(delays) < 110
    assert jobs.max_wait_s == 1800


# --- jobs slower than the old 60 s bound ------------------------------------------------------------------------

#: Each job takes 150–200 Klaviyo seconds (1.5–2 s at RATE_SCALE): longer than the 60 s after which a job
#: still running used to count as a failed attempt (0.6 s at this scale).
LATENCY_S = 150.0
LATENCY_JITTER_S = 50.0


@pytest.fixture(scope="module")
def latent_jobs_server() -> Iterator[SandboxServer]:
    server = start_sandbox(
        SandboxConfig(rate_scale=RATE_SCALE, job_latency_s=LATENCY_S, job_latency_jitter_s=LATENCY_JITTER_S)
    )
    yield server
    server.stop()


async def test_concurrent_jobs_of_an_account_are_polled_with_one_list_call(
    redis: Redis, latent_jobs_server: SandboxServer, settings: Settings, secret_key: str
) -> None:
    """Six jobs waited for at once: one poller asks the account's running jobs (one list call for all six)
    and each job's own status only once the list no longer shows it running; nothing fails however long
    the jobs take (longer than the old bound, scaled)."""
    s = settings.model_copy(
        update={"klaviyo_base_url": latent_jobs_server.url, "klaviyo_rate_scale": RATE_SCALE}
    )
    with SandboxClient(latent_jobs_server.url) as sandbox:
        pipeline = Pipeline(redis, sandbox, latent_jobs_server, secret_key, s)
        account = await pipeline.add_account(f"acct-{time.monotonic_ns()}")
        async with KlaviyoClient.from_settings(s, redis, pipeline.store) as client:
            jobs = ImportJobs(client, redis)
            started = time.monotonic()
            results = await asyncio.gather(
                *(jobs.run(account, [profile(f"J{i}")], [f"J{i}"]) for i in range(6))
            )
            took = time.monotonic() - started
            assert results == [[None]] * 6
            assert took > LATENCY_S / RATE_SCALE
            assert jobs.jobs == 6
            assert await markers(redis, account) == {}
            status = client.calls[("get_bulk_import_profiles_job", "200")]
            lists = client.calls[("get_bulk_import_profiles_jobs", "200")]
            # Polled one by one (the old way) the six jobs cost 6 × 6 status polls; together: one list call
            # per tick (about six) and one status read per job once it is done.
            assert lists >= 3
            assert status <= 6 + 2
            assert status + lists <= 16


# --- across processes: a worker killed while its profile job runs ---------------------------------------------

SLOW_STEP_S = 2.0


@pytest.fixture(scope="module")
def very_slow_jobs_server() -> Iterator[SandboxServer]:
    """Profile jobs take 2 × 2 s: long enough for the lease (2 s) to expire and an idle worker to take over."""
    server = start_sandbox(SandboxConfig(rate_scale=RATE_SCALE, job_step_s=SLOW_STEP_S))
    yield server
    server.stop()


@dataclass
class IdleWorkers:
    pipeline: Pipeline
    account: Account
    procs: list[subprocess.Popen[bytes]]
    workers: Workers


@contextlib.asynccontextmanager
async def _idle_bulk_workers(
    n: int,
    redis: Redis,
    redis_url: str,
    server: SandboxServer,
    settings: Settings,
    secret_key: str,
    tmp_path: Path,
    **env: str,
) -> AsyncIterator[IdleWorkers]:
    """Account ``acme`` on ``server`` and ``n`` bulk-mode workers, each registered (up and idle) before the
    test's first event, so their start-up time never counts; the workers are stopped on the way out."""
    s = settings.model_copy(update={"klaviyo_base_url": server.url, "klaviyo_rate_scale": RATE_SCALE})
    with SandboxClient(server.url) as sandbox:
        pipeline = Pipeline(redis, sandbox, server, secret_key, s)
        account = await pipeline.add_account("acme")
        logs = tmp_path / "logs"
        logs.mkdir()
        workers = Workers(
            worker_env(
                redis_url,
                server.url,
                secret_key,
                tmp_path / "state",
                PASSBRIDGE_WORKER_SYNC_MODE="bulk",
                **env,
            ),
            logs,
        )
        try:
            procs = workers.start(n)

            async def up() -> bool:
                ids = await redis.zrange(WORKERS, 0, -1)
                return all(any(f":{p.pid}:".encode() in w for w in ids) for p in procs)

            await async_wait_for(up, timeout=30, interval=0.02)
            yield IdleWorkers(pipeline, account, procs, workers)
        finally:
            workers.stop_all()


StartWorkers = Callable[..., contextlib.AbstractAsyncContextManager[IdleWorkers]]


@pytest.fixture
def idle_bulk_workers(
    redis: Redis,
    redis_url: str,
    very_slow_jobs_server: SandboxServer,
    settings: Settings,
    secret_key: str,
    tmp_path: Path,
) -> StartWorkers:
    """``idle_bulk_workers(n, **env)``: :func:`_idle_bulk_workers` against the very slow jobs' sandbox."""
    return functools.partial(
        _idle_bulk_workers,
        redis=redis,
        redis_url=redis_url,
        server=very_slow_jobs_server,
        settings=settings,
        secret_key=secret_key,
        tmp_path=tmp_path,
    )


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_next_holder_waits_for_the_job_of_a_killed_worker_before_writing_the_profile(
    redis: Redis, idle_bulk_workers: StartWorkers
) -> None:
    # Two workers: one takes the serial, the other one takes it over as soon as the lease expires. A killed
    # holder has no express lane, whose child would finish its job gracefully when its worker dies (that path
    # is tests/worker/test_express_lane.py's).
    async with idle_bulk_workers(2, PASSBRIDGE_WORKER_EXPRESS_LANE="false") as up:
        pipeline, sandbox, procs, workers = up.pipeline, up.pipeline.sandbox, up.procs, up.workers
        server = pipeline.server
        first = pass_event("acme", "S1", 0, kind="created", properties={"points": 1})
        await pipeline.put([first])
        key = account_keys("acme").profile_jobs

        async def named() -> bool:
            raw = await redis.hget(key, "S1")
            return raw is not None and bool(orjson.loads(raw)["job"])

        # The holder's job is queued at Klaviyo (the marker names it); the holder dies before it completes.
        await async_wait_for(named, timeout=30, interval=0.01)
        job_id = orjson.loads(await redis.hget(key, "S1"))["job"]
        token = (await redis.hget(account_keys("acme").lease_tokens, "S1") or b"").decode()
        (victim,) = [p for p in procs if f":{p.pid}:" in token]
        workers.kill(victim)
        killed_at = time.time()
        newer = pass_event("acme", "S1", 5, kind="updated", properties={"points": 2})
        await pipeline.put([newer])
        await drained(pipeline, workers, idle_timeout=20)
        state = server.app.runtime.states[pipeline.accounts["acme"]]
        old_job = state.import_jobs[job_id]
        assert old_job.status == "complete"
        assert old_job.completed is not None
        # Worker B asked about the old job while it was still running (it waited for it) ...
        polls = [
            r
            for r in server.app.runtime.requests.recent
            if r.operation == "get_bulk_import_profiles_job" and killed_at < r.at < old_job.completed
        ]
        trace = [
            (round(r.at - killed_at, 3), r.operation, r.status)
            for r in server.app.runtime.requests.recent
            if r.at > killed_at - 1
        ]
        assert polls, (
            f"the next holder never waited for the running job: job created {old_job.created - killed_at:.3f}, "
            f"completed {old_job.completed - killed_at:.3f} s after the kill; requests: {trace}"
        )
        # ... and wrote the serial's profile only after that job completed: the old job cannot overwrite it.
        later = [j for j in state.import_jobs.values() if j.id != job_id]
        singles = [
            r
            for r in server.app.runtime.requests.recent
            if r.operation == "create_or_update_profile" and r.at > killed_at
        ]
        assert later
        assert all(j.created >= old_job.completed for j in later)
        assert all(r.at >= old_job.completed for r in singles)
        profile = sandbox.profile("S1", pipeline.accounts["acme"])
        assert profile is not None
        assert profile["attributes"]["properties"]["points"] == 2
        assert profile["attributes"]["properties"]["wallet_pass_status"] == "active"
        assert await redis.hlen(key) == 0
        assert sorted(pipeline.stored_unique_ids("acme")) == sorted([first.event_id, newer.event_id])


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_running_job_of_one_serial_does_not_hold_back_the_others(
    redis: Redis, idle_bulk_workers: StartWorkers
) -> None:
    async with idle_bulk_workers(1) as up:
        pipeline, account = up.pipeline, up.account
        # A killed worker left S0's profile job running (4 s in this sandbox) and its marker in Redis.
        async with KlaviyoClient.from_settings(pipeline.settings, redis, pipeline.store) as client:
            job_id = await start_job(client, account, ["S0"])
        await mark(redis, account, ["S0"], job_id, now_ms())
        events = [pass_event("acme", f"S{i}", 0, kind="created") for i in range(10)]
        await pipeline.put(events)
        await async_wait_for(pipeline.drained, timeout=60, interval=0.05)
        state = pipeline.server.app.runtime.states[pipeline.accounts["acme"]]
        old_job = state.import_jobs[job_id]
        assert old_job.completed is not None
        assert sorted(pipeline.stored_unique_ids("acme")) == sorted(e.event_id for e in events)
        # The other nine serials' profiles went out (in a job of their own) while S0's job was still running.
        others = {f"S{i}" for i in range(1, 10)}
        first_write = min(
            j.created
            for j in state.import_jobs.values()
            if others & {str(p["attributes"]["external_id"]) for p in j.profiles}
        )
        assert first_write < old_job.completed


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_dead_letter_in_the_profile_lane_waits_for_its_job_before_the_next_round(
    redis: Redis, idle_bulk_workers: StartWorkers
) -> None:
    """S1's profile job is created but the answer to its POST is lost (a transient failure: the job runs on at
    Klaviyo, its unnamed marker stays). With one attempt allowed the round's first event is dead-lettered and
    the worker goes on with the serial's next event within the same lease: that round's profile must wait
    for the first job, else the first job could complete after it and overwrite it (finding 4a)."""
    async with idle_bulk_workers(
        1, PASSBRIDGE_RETRY_MAX_ATTEMPTS="1", PASSBRIDGE_WORKER_EXPRESS_LANE="false"
    ) as up:
        pipeline, sandbox, workers = up.pipeline, up.pipeline.sandbox, up.workers
        sandbox.set_faults(drop_rate=1.0, drop_after_processing=True, operations=["bulk_import_profiles"])
        try:
            events = [
                pass_event("acme", "S1", 0, kind="created", properties={"points": 1}),
                pass_event("acme", "S1", 5, kind="updated", properties={"points": 2}),
            ]
            await pipeline.put(events)
            await drained(pipeline, workers, idle_timeout=20)
        finally:
            sandbox.clear_faults()
        # Both rounds failed the same way: each event went to the DLQ after its one attempt.
        entries = await dlq.list_entries(redis, "acme")
        assert sorted(e.event_id for e in entries) == sorted(e.event_id for e in events)
        state = pipeline.server.app.runtime.states[pipeline.accounts["acme"]]
        first, *later = sorted(state.import_jobs.values(), key=lambda j: j.created)
        assert later, "the serial's second round never wrote its profile"
        assert first.completed is not None
        # The second round's job was created only once the first one (its answer lost) was complete.
        assert all(j.created >= first.completed for j in later), (
            f"a later job was created {first.completed - later[0].created:.3f} s before the first completed"
        )


@pytest.fixture
def latent_bulk_workers(
    redis: Redis,
    redis_url: str,
    latent_jobs_server: SandboxServer,
    settings: Settings,
    secret_key: str,
    tmp_path: Path,
) -> StartWorkers:
    """``latent_bulk_workers(n, **env)``: :func:`_idle_bulk_workers` against the sandbox whose jobs take
    150–200 Klaviyo seconds."""
    return functools.partial(
        _idle_bulk_workers,
        redis=redis,
        redis_url=redis_url,
        server=latent_jobs_server,
        settings=settings,
        secret_key=secret_key,
        tmp_path=tmp_path,
    )


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_a_backlog_syncs_exactly_once_when_every_job_outlasts_the_old_bound(
    redis: Redis, latent_bulk_workers: StartWorkers
) -> None:
    """Every profile job takes longer than the 60 s (scaled) after which a running job used to count as a failed
    attempt and its profiles were sent again as a new job. Now each serial waits for its job (lease renewed,
    no attempt): every event is delivered once, nothing is dead-lettered, each profile goes in exactly one job,
    at most ``PROFILE_JOBS_IN_FLIGHT`` jobs run at once, and the polls stay few."""
    async with latent_bulk_workers(
        1,
        PASSBRIDGE_WORKER_PROFILE_JOBS_IN_FLIGHT="2",
        PASSBRIDGE_WORKER_EXPRESS_LANE="false",
    ) as up:
        pipeline, workers = up.pipeline, up.workers
        old = datetime.now(UTC) - timedelta(hours=1)
        events = [
            pass_event("acme", f"S{i:02d}", n, kind="created" if n == 0 else "updated", received_at=old)
            for i in range(48)
            for n in range(2)
        ]
        serials = sorted({e.serial_number for e in events})
        before = pipeline.sandbox.requests(limit=0)["counts"]
        # Four waves of twelve serials, 0.3 s apart: the first two waves' jobs run together, the last two
        # waves wait in the lane for a free place and go in one job.
        for wave in range(4):
            await pipeline.put(events[wave * 24 : (wave + 1) * 24])
            await asyncio.sleep(0.3)
        await drained(pipeline, workers, timeout=40)
        state = pipeline.server.app.runtime.states[pipeline.accounts["acme"]]
        jobs = sorted(state.import_jobs.values(), key=lambda j: j.created)
        # Each serial's profile went in exactly one job: none was sent again.
        carried = sorted(str(p["attributes"]["external_id"]) for j in jobs for p in j.profiles)
        assert carried == serials
        assert all(j.status == "complete" and j.completed is not None for j in jobs)
        assert min(j.completed - j.created for j in jobs) > 60 / RATE_SCALE  # type: ignore[operator]
        # Every event delivered once, nothing dead-lettered, no attempt failed.
        assert sorted(pipeline.stored_unique_ids("acme")) == sorted(e.event_id for e in events)
        assert pipeline.duplicate_events("acme") == 0
        assert await dlq.count(redis, "acme") == 0
        for serial in serials:
            timeline = await history.timeline(redis, "acme", serial)
            assert not [h for h in timeline if h.kind in (HistoryKind.attempt, HistoryKind.dead)], serial
        # At most two jobs ran at once; the profiles that came meanwhile waited and went in one bigger job.
        assert len(jobs) >= 3
        for job in jobs:
            running = [j for j in jobs if j.created <= job.created < (j.completed or 0)]
            assert len(running) <= 2, [(j.created, j.completed, len(j.profiles)) for j in jobs]
        assert max(len(j.profiles) for j in jobs) > 12
        # Polls: a handful per job (one list call covers both running jobs), far under the 150/min budget.
        after = pipeline.sandbox.requests(limit=0)["counts"]

        def made(op: str) -> int:
            return sum(after.get(op, {}).values()) - sum(before.get(op, {}).values())

        polls, lists = made("get_bulk_import_profiles_job"), made("get_bulk_import_profiles_jobs")
        assert lists > 0
        assert polls + lists <= 8 * len(jobs), (polls, lists, len(jobs))
