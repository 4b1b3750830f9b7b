"""Profile bulk-import jobs: submit one, wait until Klaviyo completed it, map each import error to its item.

A job is asynchronous: ``POST /api/profile-bulk-import-jobs`` answers 202 with a queued job, which Klaviyo
processes later. DESIGN §4 defines "accepted" for an item as "the job completed without an import error for
it", and requires that later profile writes for a serial wait while a job carrying it is not complete (else
a job that completes late could overwrite a newer profile). Within one lease the serial's worker simply waits
for its job. Across leases — a worker killed while its job runs — a marker per serial in Redis
(``AccountKeys.profile_jobs``) carries the job id; whoever holds the serial next calls :meth:`ImportJobs.wait_clear`
before writing its profile. The marker is written *before* the POST (without an id: a kill during the POST
leaves a job we cannot name) and completed with the id after the 202; an unnamed marker waits until no job of
the account that was created up to ``orphan_slack_s`` after it is still queued or processing.

Klaviyo promises no completion time (tens of seconds to minutes are plausible), and the status endpoint has a
small budget (10/s, 150/m per account). So a job still queued or processing is waited for, not failed, for up
to ``max_wait_s`` (``PASSBRIDGE_WORKER_PROFILE_JOB_MAX_WAIT_S``, 30 min by default: only then is it a transient
failure of its serials); the polls back off with the job's age; and every job of an account waited for in
this process is watched by one poller, which asks the account's job list (one call for all of them) while
more than one runs, and a job's own status only once the list no longer shows it running.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import structlog
from redis.asyncio import Redis
from redis.exceptions import WatchError

from passbridge.accounts import Account
from passbridge.keys import account_keys
from worker.batching import rejected_item
from worker.klaviyo.client import KlaviyoClient
from worker.klaviyo.endpoints import (
    BULK_IMPORT_PROFILES,
    GET_BULK_IMPORT_PROFILES_JOB,
    GET_BULK_IMPORT_PROFILES_JOBS,
    GET_ERRORS_FOR_BULK_IMPORT_PROFILES_JOB,
    Operation,
)
from worker.klaviyo.errors import AuthError, PermanentError, ThrottledError, TransientError

log = structlog.get_logger(__name__)

#: Where the profiles sit in the job body (import errors point into it).
PROFILES_POINTER = "/data/attributes/profiles/data"
DONE = frozenset({"complete", "cancelled"})
RUNNING_FILTER = 'any(status,["queued","processing"])'
#: Pages of the running-jobs list read per poll at most (100 jobs each); a job not seen in them is simply
#: asked about on its own, so the list only saves calls and never decides a job is done.
LIST_PAGES = 5


#: A marker older than this (or than twice the configured max wait, if longer) is dropped by the sweep
#: (:func:`prune_markers`): its job is long complete, and a marker is otherwise only cleared by the serial's
#: next profile write — one that never comes (the serial's last event was dead-lettered while its job could
#: not be confirmed) would keep it for good.
MARKER_HORIZON_S = 86_400


async def prune_markers(redis: Redis, account_id: str, older_than_ms: int) -> int:
    """Drop the account's profile-job markers written before ``older_than_ms`` (epoch ms); returns how many.

    A marker re-written meanwhile (a new job carrying the serial) is kept: the deletion is a transaction
    watching the hash, given up for this round when another writer touched it.
    """
    key = account_keys(account_id).profile_jobs
    stale = [
        serial
        async for serial, raw in redis.hscan_iter(key, count=500)
        if int(orjson.loads(raw).get("at") or 0) < older_than_ms
    ]
    if not stale:
        return 0
    async with redis.pipeline(transaction=True) as pipe:
        try:
            await pipe.watch(key)
            now = await pipe.hmget(key, stale)
            gone = [
                s
                for s, raw in zip(stale, now, strict=True)
                if raw and int(orjson.loads(raw).get("at") or 0) < older_than_ms
            ]
            if not gone:
                await pipe.unwatch()
                return 0
            pipe.multi()
            pipe.hdel(key, *gone)
            await pipe.execute()
        except WatchError:
            return 0
    log.info("profile_job_markers_pruned", account=account_id, markers=len(gone))
    return len(gone)


def job_body(profiles: Sequence[bytes]) -> bytes:
    """The ``POST /api/profile-bulk-import-jobs`` body around already serialized profile resource objects."""
    return (
        b'{"data":{"type":"profile-bulk-import-job","attributes":{"profiles":{"data":['
        + b",".join(profiles)
        + b"]}}}}"
    )


class ImportJobs:
    """Runs profile bulk-import jobs for every account of a worker process."""

    def __init__(
        self,
        client: KlaviyoClient,
        redis: Redis,
        *,
        poll_first_s: float = 0.05,
        poll_max_s: float = 2.0,
        poll_age_share: float = 0.1,
        poll_ceiling_s: float = 30.0,
        max_wait_s: float = 1800.0,
        orphan_slack_s: float = 5.0,
    ) -> None:
        self.client = client
        self.redis = redis
        #: Polls start ``poll_first_s`` after the job and double up to ``poll_max_s`` (what a fast job sees);
        #: an older job is polled every ``poll_age_share`` of its age, at most every ``poll_ceiling_s``.
        self.poll_first_s = poll_first_s
        self.poll_max_s = poll_max_s
        self.poll_age_share = poll_age_share
        self.poll_ceiling_s = poll_ceiling_s
        #: How long a job may stay queued or processing before the wait is a transient failure.
        self.max_wait_s = max_wait_s
        self.orphan_slack_s = orphan_slack_s
        self.jobs = 0
        self._watches: dict[str, _Watch] = {}

    def next_delay(self, delay: float, age_s: float) -> float:
        """The wait before the next poll of a job ``age_s`` old whose last wait was ``delay``."""
        cap = max(self.poll_max_s, min(self.poll_ceiling_s, age_s * self.poll_age_share))
        return min(cap, delay * 2)

    async def run(
        self,
        account: Account,
        profiles: Sequence[bytes],
        serials: Sequence[str],
        *,
        acquired: str | None = None,
    ) -> list[PermanentError | None]:
        """Import ``profiles`` (serialized profile resource objects; ``serials[i]`` is the serial of
        ``profiles[i]``) as one job and wait for it. Per item: ``None`` (accepted) or its import error.

        Raises the client's errors when the request itself fails; the markers of a job that may exist (an
        answer lost in the network, a 5xx) stay, so the serials' next profile writes wait for it. Once the job
        exists, a throttled status poll or error list is raised as a :class:`TransientError`, not as a
        ``ThrottledError`` ("not sent"), which would send the profiles again as a new job.
        """
        key = account_keys(account.account_id).profile_jobs
        unnamed = orjson.dumps({"job": "", "at": int(time.time() * 1000)})
        await self.redis.hset(key, mapping=dict.fromkeys(serials, unnamed))
        try:
            reply = await self.client.call(
                account, BULK_IMPORT_PROFILES, content=job_body(profiles), acquired=acquired
            )
        except (PermanentError, ThrottledError, AuthError):
            # Refused (4xx, 429, auth) or never sent: no job exists. Anything else (a 5xx, a lost answer, a
            # cancellation mid-request, an unexpected error after the request went out) may leave a job behind:
            # the markers stay so the serials' next profile writes wait for it.
            await self.redis.hdel(key, *serials)
            raise
        job_id = str(((reply.body or {}).get("data") or {}).get("id") or "")
        if not job_id:
            raise TransientError(BULK_IMPORT_PROFILES.name, "profile import job answered without a job id")
        self.jobs += 1
        named = orjson.dumps({"job": job_id, "at": int(time.time() * 1000)})
        await self.redis.hset(key, mapping=dict.fromkeys(serials, named))
        try:
            attrs = await self._wait(account, job_id)
            if attrs.get("status") == "cancelled":
                await self.redis.hdel(key, *serials)
                raise TransientError(BULK_IMPORT_PROFILES.name, f"profile import job {job_id} was cancelled")
            errors: list[PermanentError | None] = [None] * len(profiles)
            failed = int(attrs.get("failed_count") or 0)
            if failed > 0:
                index = {s: i for i, s in enumerate(serials)}
                for err in await self._errors(account, job_id):
                    i = _item_of(err, index)
                    if i is not None and errors[i] is None:
                        errors[i] = _import_error(err)
                mapped = sum(e is not None for e in errors)
                if failed > mapped:
                    # Some failed profiles cannot be told apart from the imported ones: none of the unplaced
                    # items counts as written (else a rejected profile would be recorded as synced and never
                    # sent again). They take the per-event path, whose single upserts are idempotent.
                    log.warning(
                        "profile_import_errors_unmapped",
                        account=account.account_id,
                        job=job_id,
                        failed=failed,
                        mapped=mapped,
                    )
                    unmapped = _unmapped_error(job_id, failed, mapped)
                    errors = [unmapped if e is None else e for e in errors]
        except ThrottledError as exc:
            # The job exists (its status or error list was throttled, not the job): a ThrottledError would
            # tell the lane "not sent" and it would send the same profiles again as a new job, overwriting
            # this job's markers while the job may still run. As a transient failure the serials are retried
            # later, and their next holder waits for this job (the markers stay).
            raise TransientError(exc.endpoint, f"profile import job {job_id}: {exc}") from exc
        await self.redis.hdel(key, *serials)
        log.debug(
            "profile_import_job_done",
            account=account.account_id,
            job=job_id,
            profiles=len(profiles),
            failed=sum(e is not None for e in errors),
        )
        return errors

    async def wait_clear(self, account: Account, serials: Sequence[str]) -> None:
        """Return once no profile import job that carries one of ``serials`` can still be running.

        Called before a serial's profile is written. Usually nothing is marked (one ``HMGET``). A running job is
        waited for, however slow, up to ``max_wait_s``; then :class:`TransientError` is raised (the serial is
        retried later, its marker kept, so even then it is never written before that job is complete).
        """
        if not serials:
            return
        key = account_keys(account.account_id).profile_jobs
        raw = await self.redis.hmget(key, list(serials))
        marked = [(s, orjson.loads(m)) for s, m in zip(serials, raw, strict=True) if m is not None]
        if not marked:
            return
        jobs = {str(doc.get("job") or "") for _, doc in marked}
        # Together, so one poller watches them all (one list call while several run).
        await asyncio.gather(*(self._wait(account, job_id) for job_id in sorted(jobs - {""})))
        if "" in jobs:
            newest = max(int(doc.get("at") or 0) for _, doc in marked if not doc.get("job"))
            await self._wait_orphans(account, newest + int(self.orphan_slack_s * 1000))
        log.info(
            "profile_import_jobs_waited", account=account.account_id, serials=len(marked), jobs=len(jobs)
        )
        await self.redis.hdel(key, *(s for s, _ in marked))

    async def _wait(self, account: Account, job_id: str) -> dict[str, Any]:
        """The job's attributes once it is complete or cancelled (a job Klaviyo no longer knows counts as
        done). The account's poller asks (see :meth:`_poll`); a failed or throttled poll is asked again. Raises
        :class:`TransientError` after ``max_wait_s``, and a poll's :class:`PermanentError` (other than 404)."""
        watch = self._watches.get(account.account_id)
        if watch is None:
            watch = self._watches[account.account_id] = _Watch(account)
        watch.account = account
        job = watch.jobs.get(job_id)
        if job is None:
            now = time.monotonic()
            fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            # Retrieved here even when every waiter left first (a cancelled wait), so it is never "unretrieved".
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            job = watch.jobs[job_id] = _Job(fut, now, now + self.poll_first_s, self.poll_first_s)
            watch.wake.set()
        job.waiters += 1
        if watch.task is None:
            watch.task = asyncio.create_task(self._poll(watch), name=f"profile-jobs-{account.account_id}")
        try:
            return await asyncio.wait_for(asyncio.shield(job.fut), self.max_wait_s)
        except TimeoutError:
            last = f" (last poll: {job.last_error})" if job.last_error else ""
            raise TransientError(
                GET_BULK_IMPORT_PROFILES_JOB.name,
                f"profile import job {job_id} not complete yet after {self.max_wait_s:g} s{last}",
            ) from None
        finally:
            job.waiters -= 1
            if job.waiters <= 0 and watch.jobs.get(job_id) is job:
                del watch.jobs[job_id]

    async def _poll(self, watch: _Watch) -> None:
        """Poll the jobs of one account that this process waits for, while there are any, each when its
        backoff is due (``next_delay``); polls due at about the same time are asked together."""
        try:
            while watch.jobs:
                now = time.monotonic()
                due_at = min(j.due for j in watch.jobs.values())
                if due_at > now:
                    watch.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(watch.wake.wait(), due_at - now)
                    continue
                try:
                    await self._poll_once(watch)
                except Exception as exc:
                    # Never let the poller die with jobs waiting on it: they would hang until max_wait_s.
                    log.exception("profile_job_poll_failed", account=watch.account.account_id)
                    for job in watch.jobs.values():
                        job.last_error = str(exc)[:200]
                        job.due = time.monotonic() + job.delay
        finally:
            watch.task = None

    async def _poll_once(self, watch: _Watch) -> None:
        account = watch.account
        now = time.monotonic()
        asked = {jid: j for jid, j in watch.jobs.items() if j.due <= now}
        if len(watch.jobs) > 1:
            # Several jobs: one look at the account's running jobs covers them all; only those it no longer
            # shows running are asked about on their own (for their failed_count, or because the list missed
            # them).
            try:
                running = await self._running(account, set(watch.jobs))
            except ThrottledError as exc:
                for job in asked.values():
                    job.throttled(exc)
                return
            except TransientError as exc:
                now = time.monotonic()
                for job in asked.values():
                    job.last_error = str(exc)[:200]
                    job.reschedule(self, now)
                return
            if running is not None:
                now = time.monotonic()
                for jid, job in watch.jobs.items():
                    if jid in running:
                        job.reschedule(self, now)
                asked = {jid: j for jid, j in watch.jobs.items() if jid not in running}
        for jid, job in list(asked.items()):
            if not job.fut.done():
                await self._ask(account, jid, job)
            if job.fut.done() and watch.jobs.get(jid) is job:
                del watch.jobs[jid]

    async def _running(self, account: Account, wanted: set[str]) -> set[str] | None:
        """Which of ``wanted`` the account's job list shows queued or processing; ``None`` when Klaviyo
        refuses the list (the jobs are then asked about on their own). A failed or throttled call raises."""
        running: set[str] = set()
        params = {"filter": RUNNING_FILTER, "sort": "created_at", "page[size]": "100"}
        pages = self._pages(account, GET_BULK_IMPORT_PROFILES_JOBS, params, max_pages=LIST_PAGES)
        try:
            async with contextlib.aclosing(pages):
                async for job in pages:
                    running.add(str(job.get("id")))
                    if wanted <= running:
                        break
        except PermanentError:
            return None
        return running & wanted

    async def _ask(self, account: Account, job_id: str, job: _Job) -> None:
        """One status poll of one job: resolve it when done, else schedule its next poll."""
        try:
            reply = await self.client.call(
                account, GET_BULK_IMPORT_PROFILES_JOB, path_params={"job_id": job_id}
            )
        except PermanentError as exc:
            if exc.status == 404:
                job.fut.set_result({"status": "complete", "failed_count": 0})
            else:
                job.fut.set_exception(exc)
            return
        except ThrottledError as exc:
            # The job runs on regardless; ask again once the status endpoint has budget.
            job.throttled(exc)
            return
        except TransientError as exc:
            # A lost or failed status poll (5xx, network) is not a failed job, which runs on at Klaviyo:
            # ask again rather than charge every serial of the job a retry attempt. Under a 10 % error
            # rate a job's polls failed often enough to exhaust its events' attempts (the property test's
            # fast retry clock did it within seconds).
            job.last_error = str(exc)[:200]
            job.reschedule(self, time.monotonic())
            return
        attrs: dict[str, Any] = ((reply.body or {}).get("data") or {}).get("attributes") or {}
        if attrs.get("status") in DONE:
            job.fut.set_result(attrs)
        else:
            job.last_error = None
            job.reschedule(self, time.monotonic())

    async def _errors(self, account: Account, job_id: str) -> list[dict[str, Any]]:
        """Every import error of the job (pages of 100)."""
        op, params = GET_ERRORS_FOR_BULK_IMPORT_PROFILES_JOB, {"page[size]": "100"}
        return [e async for e in self._pages(account, op, params, path_params={"id": job_id})]

    async def _pages(
        self,
        account: Account,
        op: Operation,
        params: Mapping[str, str],
        *,
        path_params: Mapping[str, str] | None = None,
        max_pages: int | None = None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The resources of a paged collection, following ``links.next`` cursors (at most ``max_pages``)."""
        query = dict(params)
        pages = 0
        while True:
            reply = await self.client.call(account, op, params=query, path_params=path_params)
            body = reply.body or {}
            for item in body.get("data") or []:
                if isinstance(item, dict):
                    yield item
            pages += 1
            cursor = _next_cursor((body.get("links") or {}).get("next"))
            if not cursor or (max_pages is not None and pages >= max_pages):
                return
            query = {**params, "page[cursor]": cursor}

    async def _wait_orphans(self, account: Account, created_before_ms: int) -> None:
        """Wait until the account's oldest unfinished job (if any) was created after ``created_before_ms``."""
        delay = self.poll_first_s
        started = time.monotonic()
        deadline = started + self.max_wait_s
        while True:
            try:
                reply = await self.client.call(
                    account,
                    GET_BULK_IMPORT_PROFILES_JOBS,
                    params={
                        "filter": RUNNING_FILTER,
                        "sort": "created_at",
                        "page[size]": "1",
                    },
                )
            except TransientError:
                # As in ``_wait``: a failed look at the job list is asked again, not charged to the serials.
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = self.next_delay(delay, time.monotonic() - started)
                continue
            data = (reply.body or {}).get("data") or []
            created = _ms((data[0].get("attributes") or {}).get("created_at")) if data else None
            if created is None or created > created_before_ms:
                return
            if time.monotonic() > deadline:
                raise TransientError(
                    GET_BULK_IMPORT_PROFILES_JOBS.name, "an earlier profile import job is still running"
                )
            await asyncio.sleep(delay)
            delay = self.next_delay(delay, time.monotonic() - started)


@dataclass(slots=True)
class _Job:
    """A job this process waits for: resolved with its attributes once done."""

    fut: asyncio.Future[dict[str, Any]]
    #: When this process began to wait for it (``time.monotonic()``): the age its polls back off with.
    started: float
    #: When it is polled next, and the wait before that poll.
    due: float
    delay: float
    waiters: int = 0
    #: Why the last poll failed, for the error raised if the wait gives up.
    last_error: str | None = None

    def reschedule(self, jobs: ImportJobs, now: float) -> None:
        self.delay = jobs.next_delay(self.delay, now - self.started)
        self.due = now + self.delay

    def throttled(self, exc: ThrottledError) -> None:
        self.last_error = str(exc)[:200]
        self.due = time.monotonic() + max(exc.retry_after_s, self.delay)


@dataclass(slots=True)
class _Watch:
    """The jobs of one account waited for in this process, and the task polling them."""

    account: Account
    jobs: dict[str, _Job] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)


def _item_of(err: dict[str, Any], index: dict[str, int]) -> int | None:
    """Which item of the job an import error is about: its pointer into the job body, else its payload's
    external_id (the payload as the resource object, or as its bare attributes: the spec leaves it open)."""
    attrs = err.get("attributes") or {}
    source = attrs.get("source") or {}
    i = rejected_item(source.get("pointer") if isinstance(source, dict) else None, PROFILES_POINTER)
    if i is not None and 0 <= i < len(index):
        return i
    payload = attrs.get("original_payload")
    if not isinstance(payload, dict):
        return None
    inner = payload.get("attributes")
    external_id = inner.get("external_id") if isinstance(inner, dict) else None
    if external_id is None:
        external_id = payload.get("external_id")
    return index.get(str(external_id)) if external_id is not None else None


def _unmapped_error(job_id: str, failed: int, mapped: int) -> PermanentError:
    """What an item gets when its job reported more failed profiles than import errors that name theirs."""
    return PermanentError(
        400,
        "import_error_unmapped",
        f"profile import job {job_id} failed {failed} profile(s) but only {mapped} import error(s) name "
        "their profile; this one may not have been imported",
        None,
        endpoint=BULK_IMPORT_PROFILES.name,
    )


def _import_error(err: dict[str, Any]) -> PermanentError:
    attrs = err.get("attributes") or {}
    source = attrs.get("source") or {}
    code = str(attrs.get("code") or "import_error")
    return PermanentError(
        409 if code == "duplicate_profile" else 400,
        code,
        str(attrs.get("detail") or attrs.get("title") or "")[:500],
        str(source.get("pointer")) if isinstance(source, dict) and source.get("pointer") else None,
        endpoint=BULK_IMPORT_PROFILES.name,
    )


def _next_cursor(link: Any) -> str | None:
    """The ``page[cursor]`` of a JSON:API ``next`` link, or ``None`` on the last page."""
    if not isinstance(link, str):
        return None
    values = parse_qs(urlsplit(link).query).get("page[cursor]")
    return values[0] if values else None


def _ms(value: Any) -> int | None:
    if not isinstance(value, str):
        return None
    try:
        return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None
