"""Verify a sample of passes through Klaviyo's own read API (the demo's real-Klaviyo mode).

Only documented GET operations of Klaviyo's OpenAPI spec (revision 2026-07-15), sent through the worker's
:class:`~worker.klaviyo.client.KlaviyoClient` (so the ``revision`` header, auth and the rate limiter are the
production ones):

- ``GET /api/profiles?filter=equals(external_id,"<serial>")`` — the pass's profile;
- ``GET /api/events?filter=equals(profile_id,"<id>")`` — its metric events, named through
  ``GET /api/metrics`` (each event's ``relationships.metric`` is an id);
- ``GET /api/object-types`` — the WalletPass type's id, then
  ``GET /api/object-records/<type id>:::<serial>`` — the pass's record and its status.

Klaviyo processes events and record jobs asynchronously (202/204 first, visible later), so passes that do not
match yet are read again until ``settle_s`` has passed; only then is a difference a failure.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

from passbridge.accounts import Account
from passbridge.demo.sample_check import PassExpectation, PassFound, compare
from passbridge.demo.verify import Verification
from worker.klaviyo.client import KlaviyoClient
from worker.klaviyo.endpoints import GET_OBJECT_TYPES, XL, L, M, Operation, S
from worker.klaviyo.errors import AuthError, KlaviyoError, PermanentError
from worker.setup import OBJECT_TYPE_TITLE

# The read operations, as the spec defines them (tests/test_demo_klaviyo.py checks them against the spec).
GET_PROFILES = Operation("get_profiles", "GET", "/api/profiles", L, ("profiles:read",))
GET_EVENTS = Operation("get_events", "GET", "/api/events", XL, ("events:read",))
GET_METRICS = Operation("get_metrics", "GET", "/api/metrics", M, ("metrics:read",))
GET_OBJECT_RECORD = Operation(
    "get_object_record", "GET", "/api/object-records/{id}", S, ("custom-objects:read",)
)

#: Every operation the verification may send; all are GETs.
READ_OPERATIONS: tuple[Operation, ...] = (
    GET_PROFILES,
    GET_EVENTS,
    GET_METRICS,
    GET_OBJECT_TYPES,
    GET_OBJECT_RECORD,
)
#: Scopes the demo's private key needs for this verification (the sync itself needs the write scopes too).
READ_SCOPES: tuple[str, ...] = tuple(sorted({s for op in READ_OPERATIONS for s in op.scopes}))


def _filter_value(value: str) -> str:
    """A filter string literal (Klaviyo's filter syntax: double-quoted, backslash escapes)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class AccountReader:
    """Reads one demo account's passes back from Klaviyo."""

    def __init__(self, client: KlaviyoClient, account: Account) -> None:
        self.client = client
        self.account = account
        self._metric_names: dict[str, str] = {}
        self._type_id: str | None = None

    async def _pages(self, op: Operation, params: Mapping[str, str]) -> AsyncIterator[dict[str, Any]]:
        query = dict(params)
        while True:
            doc = (await self.client.call(self.account, op, params=query)).body or {}
            for item in doc.get("data") or []:
                yield item
            nxt = (doc.get("links") or {}).get("next")
            cursor = parse_qs(urlsplit(nxt).query).get("page[cursor]") if nxt else None
            if not cursor:
                return
            query["page[cursor]"] = cursor[0]

    async def refresh_metrics(self) -> None:
        """Metric id → name (a metric appears with its first event, so this is read again while settling)."""
        async for m in self._pages(GET_METRICS, {"fields[metric]": "name"}):
            self._metric_names[str(m["id"])] = str(m["attributes"]["name"])

    async def object_type_id(self) -> str | None:
        """The WalletPass object type's id (``None`` while the set-up has not made it)."""
        if self._type_id is None:
            async for t in self._pages(GET_OBJECT_TYPES, {}):
                if t["attributes"].get("title") == OBJECT_TYPE_TITLE:
                    self._type_id = str(t["id"])
        return self._type_id

    async def read_pass(self, serial: str) -> PassFound:
        """Profile, metric events and WalletPass record of one pass."""
        found = PassFound()
        profiles = await self.client.call(
            self.account,
            GET_PROFILES,
            params={
                "filter": f"equals(external_id,{_filter_value(serial)})",
                "fields[profile]": "external_id",
            },
        )
        data = (profiles.body or {}).get("data") or []
        if not data:
            return found
        found.profile_id = str(data[0]["id"])
        events = [
            e
            async for e in self._pages(
                GET_EVENTS,
                {"filter": f"equals(profile_id,{_filter_value(found.profile_id)})", "page[size]": "200"},
            )
        ]
        metric_ids = [
            ((e.get("relationships") or {}).get("metric") or {}).get("data", {}).get("id") for e in events
        ]
        if any(m not in self._metric_names for m in metric_ids):
            await self.refresh_metrics()
        for m in metric_ids:
            name = self._metric_names.get(str(m))
            if name is None:
                found.unnamed_metrics += 1
            else:
                found.metrics[name] += 1
        type_id = await self.object_type_id()
        if type_id is not None:
            try:
                record = await self.client.call(
                    self.account,
                    GET_OBJECT_RECORD,
                    path_params={"id": f"{type_id}:::{serial}"},
                    params={"fields[object-record]": "record_properties"},
                )
            except PermanentError as exc:
                if exc.status != 404:
                    raise
            else:
                found.record_found = True
                props = ((record.body or {}).get("data") or {}).get("attributes", {}).get(
                    "record_properties"
                ) or {}
                found.record_status = props.get("status")
        return found


async def verify_sample(
    client: KlaviyoClient,
    accounts: Mapping[str, Account],
    sample: list[PassExpectation],
    *,
    settle_s: float = 120.0,
    poll_s: float = 2.0,
    progress: Callable[[int], None] | None = None,
) -> Verification:
    """Read every sampled pass back from Klaviyo and compare; passes that differ are read again until they
    match or ``settle_s`` has passed. ``progress`` gets the number of passes matching so far."""
    readers = {a: AccountReader(client, accounts[a]) for a in {s.account_id for s in sample}}
    results: dict[tuple[str, str], tuple[PassFound, list[str]]] = {}
    pending = list(sample)
    deadline = time.monotonic() + settle_s
    fatal: str | None = None
    while pending:
        still: list[PassExpectation] = []
        for want in pending:
            try:
                got = await readers[want.account_id].read_pass(want.serial)
                problems = compare(want, got)
            except AuthError as exc:
                fatal = f"{want.account_id}: Klaviyo refused the read ({exc}); the key needs {', '.join(READ_SCOPES)}"
                break
            except KlaviyoError as exc:  # throttled, 5xx, network: read it again on the next round
                got, problems = PassFound(), [f"{want.account_id}/{want.serial}: could not read ({exc})"]
            results[(want.account_id, want.serial)] = (got, problems)
            if problems:
                still.append(want)
        pending = still
        if progress:
            progress(len(sample) - len(pending))
        if fatal or not pending or time.monotonic() >= deadline:
            break
        await asyncio.sleep(poll_s)
    return _summarize(sample, results, fatal)


def _summarize(
    sample: list[PassExpectation],
    results: dict[tuple[str, str], tuple[PassFound, list[str]]],
    fatal: str | None,
) -> Verification:
    v = Verification()
    n = len(sample)
    got = [results.get((s.account_id, s.serial), (PassFound(), ["not read"])) for s in sample]
    v.add("sample: passes checked", n, sum(1 for s in sample if (s.account_id, s.serial) in results))
    v.add("sample: profiles found by external_id", n, sum(1 for f, _ in got if f.profile_id is not None))
    v.add(
        "sample: metric events",
        sum(s.events for s in sample),
        sum(sum(f.metrics.values()) + f.unnamed_metrics for f, _ in got),
    )
    v.add(
        "sample: passes with exactly the expected metric events",
        n,
        sum(1 for s, (f, _) in zip(sample, got, strict=True) if dict(sorted(f.metrics.items())) == s.metrics),
    )
    v.add(
        "sample: WalletPass records with the final status",
        n,
        sum(
            1
            for s, (f, _) in zip(sample, got, strict=True)
            if f.record_found and f.record_status == s.final_status
        ),
    )
    if fatal:
        v.add("sample: Klaviyo answered the reads", "yes", "no")
        v.problems.append(fatal)
    for _, problems in got:
        v.problems.extend(problems)
    v.problems = v.problems[:20]
    return v
