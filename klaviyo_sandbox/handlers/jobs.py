"""Profile bulk-import jobs: 202 with a queued job that moves to processing, then complete; items that fail
(bad contact, identity conflict) become import errors instead of failing the request."""

from __future__ import annotations

import functools
import random
import time
from typing import Any

from klaviyo_sandbox import ids, paging
from klaviyo_sandbox import profiles as rules
from klaviyo_sandbox.errors import ApiError, invalid, not_found
from klaviyo_sandbox.filters import matches
from klaviyo_sandbox.handlers.common import Call, Reply, data, document
from klaviyo_sandbox.store import AccountState, ImportJob

MAX_PROFILES = 10_000
EXPIRES_S = 7 * 86400


def _resource(job: ImportJob, base_url: str) -> dict[str, Any]:
    link = f"{base_url}/api/profile-bulk-import-jobs/{job.id}/"
    return {
        "type": "profile-bulk-import-job",
        "id": job.id,
        "attributes": {
            "status": job.status,
            "created_at": ids.iso(job.created),
            "total_count": len(job.profiles),
            "completed_count": job.completed_count,
            "failed_count": job.failed_count,
            "completed_at": ids.iso(job.completed) if job.completed else None,
            "expires_at": ids.iso(job.created + EXPIRES_S),
            "started_at": ids.iso(job.started) if job.started else None,
        },
        "relationships": {
            "lists": {
                "data": [{"type": "list", "id": lid} for lid in job.list_ids],
                "links": {"self": f"{link}relationships/lists/", "related": f"{link}lists/"},
            },
            "profiles": {"links": {"self": f"{link}relationships/profiles/", "related": f"{link}profiles/"}},
            "import-errors": {"links": {"related": f"{link}import-errors/"}},
        },
        "links": {"self": link},
    }


def _job_field(job: ImportJob, name: str) -> Any:
    return job.status if name == "status" else None


def _apply(state: AccountState, job: ImportJob, i: int) -> None:
    """Apply the job's profile ``i`` (a failure becomes an import error of the job)."""
    item = job.profiles[i]
    attrs = item.get("attributes") or {}
    try:
        if i in job.rejected:
            raise invalid(
                f"'{attrs.get('external_id')}' is not a valid value (refused by the sandbox's fault).",
                pointer="/data/attributes/external_id",
            )
        profile, _ = rules.upsert(state, attrs, item.get("id"), item.get("meta"), time.time())
    except ApiError as exc:
        job.failed_count += 1
        error: dict[str, Any] = {
            "code": exc.code,
            "title": exc.title,
            "detail": exc.detail,
            "source": {"pointer": exc.pointer or "/data"},
        }
        if job.error_shape == "absolute":
            error["source"]["pointer"] = error["source"]["pointer"].replace(
                "/data", f"/data/attributes/profiles/data/{i}", 1
            )
            error["original_payload"] = item
        elif job.error_shape == "relative":
            error["original_payload"] = attrs
        job.errors.append({"type": "import-error", "id": ids.ulid(), "attributes": error})
    else:
        job.completed_count += 1
        job.profile_ids.append(profile.id)


def _complete(job: ImportJob) -> None:
    job.status = "complete"
    job.completed = time.time()


def _rejected(call: Call, profiles: list[dict[str, Any]]) -> frozenset[int]:
    """The items the injected ``reject_external_ids`` fault refuses (decided when the job is created)."""
    if not call.runtime.faults.config.reject_external_ids:
        return frozenset()
    faults = call.runtime.faults
    return frozenset(
        i
        for i, p in enumerate(profiles)
        if faults.rejects(call.operation, (p.get("attributes") or {}).get("external_id"))
    )


def bulk_import_profiles(call: Call) -> Reply:
    """``POST /api/profile-bulk-import-jobs``: 202 with the queued job."""
    d = data(call)
    profiles = d["attributes"]["profiles"]["data"]
    if len(profiles) > MAX_PROFILES:
        raise invalid(
            f"A bulk import may hold at most {MAX_PROFILES} profiles ({len(profiles)} given).",
            pointer="/data/attributes/profiles/data",
        )
    lists = ((d.get("relationships") or {}).get("lists") or {}).get("data") or []
    job = ImportJob(
        id=ids.ulid(call.now),
        status="queued",
        created=call.now,
        profiles=profiles,
        list_ids=[x["id"] for x in lists],
        rejected=_rejected(call, profiles),
        error_shape=call.runtime.faults.config.import_error_shape,
    )
    call.state.import_jobs[job.id] = job
    state = call.state
    step = call.runtime.config.job_step_s
    # Klaviyo's latency (rate-scaled, with jitter): half of it queued, half processing.
    extra = call.runtime.config.job_latency(random.random()) / 2

    def start() -> None:
        job.status = "processing"
        job.started = time.time()
        # Profiles in order, a turn at a time, so ``completed_count`` grows while the job runs.
        call.runtime.later_in_turns(
            step + extra,
            range(len(job.profiles)),
            lambda i: _apply(state, job, i),
            then=lambda: _complete(job),
        )

    call.later(step + extra, start)
    return Reply(202, document(_resource(job, call.base_url), call.self_url))


def _job(call: Call, name: str = "job_id") -> ImportJob:
    job = call.state.import_jobs.get(call.params[name])
    if job is None:
        raise not_found("profile-bulk-import-job", call.params[name])
    return job


def get_bulk_import_profiles_job(call: Call) -> Reply:
    """``GET /api/profile-bulk-import-jobs/{job_id}``."""
    return Reply(200, document(_resource(_job(call), call.base_url), call.self_url))


def get_bulk_import_profiles_jobs(call: Call) -> Reply:
    """``GET /api/profile-bulk-import-jobs`` with ``filter`` on status, ``sort`` on created_at."""
    conditions = call.filters()
    jobs = [
        j for j in call.state.import_jobs.values() if matches(conditions, functools.partial(_job_field, j))
    ]
    descending = (call.query.get("sort") or "created_at").startswith("-")
    jobs.sort(key=lambda j: (j.created, j.id), reverse=descending)
    chunk, nxt = paging.page(
        jobs, lambda j: (j.created, j.id), call.page_size(20), call.query.get("page[cursor]"), descending
    )
    return Reply(
        200,
        {
            "data": [_resource(j, call.base_url) for j in chunk],
            "links": paging.links(call.self_url, call.query, nxt),
        },
    )


def get_errors_for_bulk_import_profiles_job(call: Call) -> Reply:
    """``GET /api/profile-bulk-import-jobs/{id}/import-errors``."""
    job = _job(call, "id")
    chunk, nxt = paging.page(
        list(range(len(job.errors))), lambda i: i, call.page_size(20), call.query.get("page[cursor]")
    )
    return Reply(
        200,
        {"data": [job.errors[i] for i in chunk], "links": paging.links(call.self_url, call.query, nxt)},
    )


def get_profiles_for_bulk_import_profiles_job(call: Call) -> Reply:
    """``GET /api/profile-bulk-import-jobs/{id}/profiles``."""
    job = _job(call, "id")
    profiles = [call.state.profiles[pid] for pid in job.profile_ids if pid in call.state.profiles]
    chunk, nxt = paging.page(
        list(range(len(profiles))), lambda i: i, call.page_size(20), call.query.get("page[cursor]")
    )
    return Reply(
        200,
        {
            "data": [rules.resource(profiles[i], call.base_url) for i in chunk],
            "links": paging.links(call.self_url, call.query, nxt),
        },
    )
