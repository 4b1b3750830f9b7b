"""The demo's real-Klaviyo mode: PASSBRIDGE_KLAVIYO_BASE_URL points at a Klaviyo the demo does not start (here
the sandbox, run as a separate server standing in for Klaviyo), and a sample of passes is read back through
Klaviyo's own documented GET endpoints only.

The demo runs as the CLI would (a subprocess, configured by environment variables only). Every request the
verification sends is checked against Klaviyo's published OpenAPI spec: operation, revision header, query
parameters and filter fields/operators as the spec's filter documentation lists them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from cryptography.fernet import Fernet, MultiFernet
from redis.asyncio import Redis

from klaviyo_sandbox.config import SandboxConfig
from klaviyo_sandbox.testing import SandboxServer, start_sandbox
from passbridge.accounts import Account, AccountSecrets, AccountStore
from passbridge.demo.sample_check import PassExpectation, PassFound, compare, expected_metrics, sample_passes
from passbridge.demo.scenario import build_scenario
from passbridge.demo.verify_klaviyo import READ_OPERATIONS, READ_SCOPES, verify_sample
from tests.sync.spec import shared_dir
from worker.klaviyo.client import KlaviyoClient

KEY = "pk_realmode_" + "0f1e2d3c4b5a69788796"  # one private key for all three demo accounts
PASSES = 90
RATE_SCALE = 20.0
REVISION = re.compile(r"^\d{4}-\d{2}-\d{2}(\.[a-z0-9]+)?$")
READ_NAMES = {op.name for op in READ_OPERATIONS}


# -- Klaviyo's published spec (the full stable.json), independent of the sandbox --------------------------------


@dataclass(frozen=True)
class SpecOp:
    name: str
    method: str
    path: str
    pattern: re.Pattern[str]
    query: frozenset[str]
    filters: dict[str, set[str]]  # field → operators, from the filter parameter's documentation
    ratelimit: dict[str, str]
    scopes: tuple[str, ...]


@cache
def _spec() -> dict[str, SpecOp]:
    root = shared_dir()
    if root is None or not (root / "klaviyo" / "stable.json").is_file():
        pytest.skip("Klaviyo's OpenAPI spec (../shared/klaviyo/stable.json) is not present")
    doc = json.loads((root / "klaviyo" / "stable.json").read_text())
    ops = {}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if not isinstance(op, dict) or "operationId" not in op:
                continue
            params = op.get("parameters", [])
            filters: dict[str, set[str]] = {}
            for p in params:
                if p["name"] == "filter":
                    text = p.get("description", "").split("Allowed field(s)/operator(s):", 1)[-1]
                    for fld, operators in re.findall(r"`([^`]+)`: ((?:`[^`]+`(?:, )?)+)", text):
                        filters[fld] = set(re.findall(r"`([^`]+)`", operators))
            ops[op["operationId"]] = SpecOp(
                op["operationId"],
                method.upper(),
                path,
                re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "/?$"),
                frozenset(p["name"] for p in params if p["in"] == "query"),
                filters,
                op.get("x-klaviyo-ratelimit", {}),
                tuple(op.get("x-klaviyo-scopes", ())),
            )
    return ops


def spec_problems(request: httpx.Request) -> list[str]:
    """Every way a request is not a read the spec defines (empty when it is one)."""
    url = urlsplit(str(request.url))
    hits = [op for op in _spec().values() if op.method == request.method and op.pattern.match(url.path)]
    hits.sort(key=lambda op: op.path.count("{"))
    if not hits:
        return [f"{request.method} {url.path}: not an operation of the spec"]
    op = hits[0]
    problems = []
    if op.method != "GET":
        problems.append(f"{op.name}: not a read")
    if not REVISION.match(request.headers.get("revision", "")):
        problems.append(f"{op.name}: revision header {request.headers.get('revision')!r}")
    for name, value in parse_qsl(url.query, keep_blank_values=True):
        if name not in op.query:
            problems.append(f"{op.name}: query parameter {name!r} is not in the spec")
        if name == "filter":
            m = re.fullmatch(r'([a-z-]+)\(([a-z_.]+),"([^"\\]|\\.)*"\)', value)
            if not m:
                problems.append(f'{op.name}: filter {value!r} is not one operator(field,"value")')
            elif m.group(1) not in op.filters.get(m.group(2), set()):
                problems.append(f"{op.name}: filter field/operator {m.group(2)}/{m.group(1)} not allowed")
    return problems


def test_read_operations_are_the_specs() -> None:
    """The verification's operations: method, path, rate tier and scopes exactly as the spec has them."""
    for op in READ_OPERATIONS:
        found = _spec().get(op.name)
        assert found is not None, op.name
        assert (found.method, found.path) == ("GET", op.path), op.name
        assert found.ratelimit == {"burst": f"{op.tier.burst}/s", "steady": f"{op.tier.steady}/m"}, op.name
        assert set(found.scopes) == set(op.scopes), op.name
    assert set(READ_SCOPES) == {"custom-objects:read", "events:read", "metrics:read", "profiles:read"}


def test_the_spec_checker_flags_bad_reads() -> None:
    """The checker used below can fail, for each reason it checks."""
    ok = httpx.Request(
        "GET", 'http://k/api/profiles?filter=equals(external_id,"s1")', headers={"revision": "2026-10-15"}
    )
    assert spec_problems(ok) == []
    bad = [
        httpx.Request("GET", "http://k/api/profiles", headers={}),
        httpx.Request(
            "GET", 'http://k/api/profiles?filter=equals(first_name,"a")', headers={"revision": "2026-10-15"}
        ),
        httpx.Request(
            "GET",
            'http://k/api/events?filter=greater-than(profile_id,"a")',
            headers={"revision": "2026-10-15"},
        ),
        httpx.Request("GET", "http://k/api/profiles?bogus=1", headers={"revision": "2026-10-15"}),
        httpx.Request("POST", "http://k/api/profile-import", headers={"revision": "2026-10-15"}),
        httpx.Request("GET", "http://k/_sandbox/accounts", headers={"revision": "2026-10-15"}),
    ]
    assert all(spec_problems(r) for r in bad)


# -- pure: sample and comparison ----------------------------------------------------------------------------------


def test_sample_is_deterministic_and_spread_over_accounts() -> None:
    scenario = build_scenario(300, seed=3)
    a, b = sample_passes(scenario, 50, seed=3), sample_passes(scenario, 50, seed=3)
    assert a == b
    assert len(a) == 50
    assert len({s.serial for s in a}) == 50
    assert {s.account_id for s in a} == {acct.account_id for acct in scenario.accounts}
    assert sample_passes(scenario, 50, seed=4) != a
    assert len(sample_passes(build_scenario(20, seed=3), 50)) == 20  # fewer passes than the sample: all
    for s in a:
        plan = scenario.passes[(s.account_id, s.serial)]
        assert s.final_status == plan.final_status
        assert s.events == len(plan.events) + plan.stale == sum(expected_metrics(plan).values())


def test_tag_makes_identities_unique_and_keeps_the_day() -> None:
    plain, tagged = (
        build_scenario(200, seed=5),
        build_scenario(200, seed=5, tag="pbrun1", klaviyo_api_keys=[KEY]),
    )
    assert plain.expected_events == tagged.expected_events
    assert plain.deliveries == tagged.deliveries
    assert all(serial.startswith("pbrun1") for _, serial in tagged.passes)
    plain_ids = {(p.email, p.phone) for p in plain.passes.values()}
    assert not plain_ids & {(p.email, p.phone) for p in tagged.passes.values()}
    assert {a.klaviyo_api_key for a in tagged.accounts} == {KEY}
    assert KEY not in repr(tagged.accounts)  # a real key never shows in a repr


def test_compare_names_every_difference() -> None:
    want = PassExpectation("acme", "s1", "uninstalled", {"Pass Created": 1, "Pass Uninstalled": 1})
    assert compare(want, PassFound()) == ["acme/s1: no profile with external_id 's1'"]
    good = PassFound("P1", record_found=True, record_status="uninstalled")
    good.metrics.update({"Pass Created": 1, "Pass Uninstalled": 1})
    assert compare(want, good) == []
    extra = PassFound("P1", record_found=True, record_status="active")
    extra.metrics.update({"Pass Created": 2, "Pass Uninstalled": 1})
    problems = compare(want, extra)
    assert len(problems) == 2
    assert "metric events" in problems[0]
    assert "'Pass Created': 2" in problems[0]
    assert "status 'active'" in problems[1]
    assert "no WalletPass record" in compare(want, PassFound("P1", metrics=good.metrics))[0]


# -- end to end ---------------------------------------------------------------------------------------------------


@dataclass
class RealModeRun:
    sandbox: SandboxServer
    doc: dict[str, Any]
    state_dir: Path
    counts: dict[tuple[str, int], int]


def _run_demo(env_extra: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PASSBRIDGE_")}
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "-m", "passbridge", "demo", "--json", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )


@pytest.fixture(scope="module")
def real_mode_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealModeRun]:
    """The sandbox started on its own (standing in for Klaviyo), then the demo pointed at it."""
    sandbox = start_sandbox(SandboxConfig.with_api_keys(KEY, rate_scale=RATE_SCALE))
    work = tmp_path_factory.mktemp("realmode")
    try:
        proc = _run_demo(
            {"PASSBRIDGE_KLAVIYO_BASE_URL": sandbox.url, "PASSBRIDGE_DEMO_KLAVIYO_API_KEYS": KEY},
            work,
            "--passes",
            str(PASSES),
            "--rate-scale",
            str(RATE_SCALE),
            "--keep",
            "--state-dir",
            str(work / "state"),
        )
        assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
        counts = dict(sandbox.app.runtime.requests.counts)
        yield RealModeRun(sandbox, json.loads(proc.stdout), work / "state", counts)
    finally:
        sandbox.stop()


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_demo_against_a_klaviyo_it_did_not_start(real_mode_run: RealModeRun) -> None:
    doc, counts = real_mode_run.doc, real_mode_run.counts
    assert doc["ok"]
    assert doc["mode"] == "klaviyo"
    # No sandbox of its own: none in its process list, no sandbox log; the external one got the writes.
    assert doc["sandbox_started"] is False
    assert not (real_mode_run.state_dir / "logs" / "sandbox.log").exists()
    by_op: dict[str, int] = {}
    for (op, _status), n in counts.items():
        by_op[op] = by_op.get(op, 0) + n
    # Every expected metric event was stored (sent one by one or in bulk, as the workers chose).
    assert by_op.get("create_event", 0) + by_op.get("bulk_create_events", 0) > 0
    stored = sum(len(state.events) for state in real_mode_run.sandbox.app.runtime.states.values())
    assert stored >= doc["expected_events"]
    # No fault injection, said plainly; the tiers are not compressed unless asked (here: --rate-scale 20).
    assert not real_mode_run.sandbox.app.runtime.faults.active
    assert doc["options"]["injected_5xx_rate"] == doc["options"]["injected_429_rate"] == 0
    assert doc["retries_after_5xx"] is None
    assert doc["klaviyo_requests"] is None
    assert "20× faster than Klaviyo's real tiers" in doc["rate_scale_note"]
    # The sample: 50 of the 90 passes, every check passed.
    assert doc["sample"] == 50
    assert doc["sample_expected_events"] == doc["delivered"] > 50
    assert [c for c in doc["checks"] if not c["ok"]] == []
    assert {c["name"] for c in doc["checks"]} >= {
        "sample: profiles found by external_id",
        "sample: passes with exactly the expected metric events",
        "sample: WalletPass records with the final status",
    }
    # Verification used only the spec's read operations; the sandbox saw exactly those reads (the workers
    # and set-up never call them, except get_object_types which the set-up uses as well).
    reads = doc["verification_reads"]
    assert set(reads) <= READ_NAMES
    assert {"get_profiles", "get_events", "get_object_record"} <= set(reads)
    for op, by_status in reads.items():
        # 429: the three demo merchants share one Klaviyo key (one account's budget); the client waits those out.
        assert all(
            s.startswith("2") or s == "429" or (op, s) == ("get_object_record", "404") for s in by_status
        )
        sent = sum(by_status.values())
        assert (by_op[op] >= sent) if op == "get_object_types" else (by_op[op] == sent), (op, by_op, reads)
    assert reads["get_profiles"]["200"] >= 50


def _accounts(keys: list[str]) -> dict[str, Account]:
    scenario = build_scenario(3, klaviyo_api_keys=keys)
    return {
        a.account_id: Account(
            account_id=a.account_id,
            secrets=AccountSecrets.model_validate({"klaviyo_api_key": a.klaviyo_api_key}),
        )
        for a in scenario.accounts
    }


async def _verify_recorded(
    redis: Redis, base_url: str, sample: list[PassExpectation], settle_s: float = 0.0
) -> tuple[Any, list[httpx.Request]]:
    sent: list[httpx.Request] = []

    async def record(request: httpx.Request) -> None:
        sent.append(request)

    store = AccountStore(redis, MultiFernet([Fernet(Fernet.generate_key())]))
    async with KlaviyoClient(
        redis,
        store,
        base_url=base_url,
        revision="2026-10-15",
        rate_scale=RATE_SCALE,
        event_hooks={"request": [record]},
    ) as client:
        v = await verify_sample(client, _accounts([KEY]), sample, settle_s=settle_s, poll_s=0.2)
    return v, sent


@pytest.mark.slow
@pytest.mark.timeout(200)
async def test_verification_reads_are_the_specs_and_catch_a_wrong_state(
    real_mode_run: RealModeRun, redis: Redis
) -> None:
    opts = real_mode_run.doc["options"]
    scenario = build_scenario(PASSES, seed=opts["seed"], tag=opts["run_tag"], klaviyo_api_keys=[KEY])
    sample = sample_passes(scenario, 50, opts["seed"])
    url = real_mode_run.sandbox.url

    # The same verification, in process, every request recorded: all spec-defined reads, and it passes.
    v, sent = await _verify_recorded(redis, url, sample, settle_s=10.0)  # returns at once when all match
    assert v.ok, v.problems
    assert sent
    assert [(str(r.url), spec_problems(r)) for r in sent if spec_problems(r)] == []

    # Make the state wrong through Klaviyo's own API: one more event on a sampled pass's profile.
    victim = sample[7]
    async with httpx.AsyncClient() as http:
        r = await http.post(
            f"{url}/api/events",
            headers={"authorization": f"Klaviyo-API-Key {KEY}", "revision": "2026-10-15"},
            json={
                "data": {
                    "type": "event",
                    "attributes": {
                        "properties": {"serial_number": victim.serial},
                        "metric": {"data": {"type": "metric", "attributes": {"name": "Pass Updated"}}},
                        "profile": {
                            "data": {"type": "profile", "attributes": {"external_id": victim.serial}}
                        },
                        "unique_id": "an-event-the-scenario-never-had",
                    },
                }
            },
        )
    assert r.status_code == 202, r.text
    v, _ = await _verify_recorded(redis, url, sample, settle_s=0.5)
    assert not v.ok
    failed = {c.name for c in v.checks if not c.ok}
    assert failed >= {"sample: metric events", "sample: passes with exactly the expected metric events"}
    assert "sample: WalletPass records with the final status" not in failed
    assert any(victim.serial in p and "metric events" in p for p in v.problems), v.problems


@pytest.mark.slow
async def test_verification_fails_clearly_against_a_klaviyo_that_received_nothing(redis: Redis) -> None:
    empty = start_sandbox(SandboxConfig.with_api_keys(KEY, rate_scale=RATE_SCALE))
    try:
        sample = sample_passes(build_scenario(30, tag="pbnothing"), 5)
        v, sent = await _verify_recorded(redis, empty.url, sample, settle_s=0.5)
    finally:
        empty.stop()
    assert not v.ok
    assert next(c for c in v.checks if c.name == "sample: profiles found by external_id").got == 0
    assert all("no profile with external_id" in p for p in v.problems)
    assert len(v.problems) == 5
    assert all(spec_problems(r) == [] for r in sent)


def test_real_mode_without_a_key_says_what_to_set(tmp_path: Path) -> None:
    proc = _run_demo({"PASSBRIDGE_KLAVIYO_BASE_URL": "http://127.0.0.1:9"}, tmp_path, "--passes", "10")
    assert proc.returncode == 2
    assert "PASSBRIDGE_DEMO_KLAVIYO_API_KEYS" in proc.stderr
    assert "private API key" in proc.stderr
