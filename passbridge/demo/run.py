"""``passbridge demo``: start the whole stack, play a realistic day through it, verify Klaviyo, summarize.

The steps: start embedded Redis, the Klaviyo sandbox (real tiers on a clock ``rate_scale`` times faster, with
injected 5xx and 429 answers), the producer and two worker processes; register three merchant accounts and run
their Klaviyo set-up; send the scenario from all four sources; wait for the queues to drain; read everything
back from the sandbox and compare it with what the events imply.

With ``klaviyo_base_url`` set (``PASSBRIDGE_KLAVIYO_BASE_URL``), no sandbox is started and no fault is
injected: the workers write to that Klaviyo with the given private keys, at its real rate tiers, and a sample
of passes is read back through Klaviyo's own read API (:mod:`passbridge.demo.verify_klaviyo`).

Every phase is timed (``report.phases``): start, setup, ingest, drain, verify.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cryptography.fernet import Fernet, MultiFernet
from redis.asyncio import Redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from passbridge.accounts import Account, AccountSecrets, AccountStore, hash_token, new_token
from passbridge.demo.defaults import (
    DEMO_DRAIN_TIMEOUT_S,
    DEMO_PASSES,
    DEMO_RATE_SCALE,
    DEMO_SAMPLE,
    DEMO_SETTLE_S,
    KLAVIYO_DRAIN_TIMEOUT_S,
)
from passbridge.demo.play import Credentials, Player, PlayResult
from passbridge.demo.sample_check import sample_passes
from passbridge.demo.scenario import Scenario, build_scenario
from passbridge.demo.stack import Stack, StackConfig, run_stack
from passbridge.demo.verify import Verification, verify_sandbox
from passbridge.keys import account_keys
from passbridge.settings import Settings
from producer.sources.google_sign import GoogleSigner


class DemoError(RuntimeError):
    """The demo cannot run as configured (the message says what to change)."""


T = TypeVar("T")


@dataclass
class DemoOptions:
    """Size and shape of the demo run (defaults in :mod:`passbridge.demo.defaults`)."""

    passes: int = DEMO_PASSES
    accounts: int = 3
    #: ``None``: DEMO_RATE_SCALE against the sandbox, 1 (real speed) against a real Klaviyo.
    rate_scale: float | None = None
    workers: int = 2
    error_rate: float = 0.02  # each of 500/502/503 at a third of this (sandbox only)
    throttle_rate: float = 0.01  # injected 429s (sandbox only)
    seed: int = 7
    state_dir: Path | None = None
    keep: bool = False
    drain_timeout_s: float | None = None
    quiet: bool = False
    #: Use this Klaviyo instead of starting a sandbox (the real-Klaviyo mode).
    klaviyo_base_url: str | None = None
    #: Private API keys for the demo accounts in that mode, handed out in turn (one key may serve all).
    klaviyo_api_keys: list[str] = field(default_factory=list, repr=False)
    #: Passes read back through Klaviyo's API in that mode.
    sample: int = DEMO_SAMPLE
    #: How long sampled passes may take to show up in Klaviyo (it processes writes asynchronously).
    settle_s: float = DEMO_SETTLE_S

    @property
    def real_klaviyo(self) -> bool:
        return self.klaviyo_base_url is not None

    @property
    def scale(self) -> float:
        if self.rate_scale is not None:
            return self.rate_scale
        return 1.0 if self.real_klaviyo else DEMO_RATE_SCALE


@dataclass
class DemoReport:
    """Everything the summary shows, and whether the verification passed."""

    options: dict[str, Any]
    mode: str = "sandbox"  # sandbox | klaviyo
    sandbox_started: bool = False
    rate_note: str = ""
    phases: dict[str, float] = field(default_factory=dict)
    #: CPU seconds per process of the stack, and of the demo process itself (player, verification).
    cpu_s: dict[str, float] = field(default_factory=dict)
    deliveries: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    rejected_by_reason: Counter[str] = field(default_factory=Counter)
    mismatched_answers: list[str] = field(default_factory=list)
    expected_events: int = 0
    delivered_events: int = 0
    dead_lettered: int = 0
    #: Sandbox request counts; ``None`` against a real Klaviyo (nothing to read them from).
    klaviyo_requests: int | None = 0
    klaviyo_5xx: int | None = 0
    klaviyo_429: int | None = 0
    sample_size: int = 0
    sample_expected_events: int = 0
    #: Requests the real-Klaviyo verification sent, by operation and status.
    verification_reads: dict[str, dict[str, int]] = field(default_factory=dict)
    ingest_s: float = 0.0
    drain_s: float = 0.0
    verification: Verification | None = None
    dashboard_url: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.verification and self.verification.ok and not self.mismatched_answers)

    def as_dict(self) -> dict[str, Any]:
        v = self.verification
        total_s = self.ingest_s + self.drain_s
        return {
            "ok": self.ok,
            "mode": self.mode,
            "sandbox_started": self.sandbox_started,
            "rate_scale_note": self.rate_note,
            "options": self.options,
            "events_in": self.deliveries,
            "accepted": self.answers["accepted"],
            "duplicates": self.answers["duplicate"],
            "no_event": self.answers["no_event"],
            "rejected": dict(self.rejected_by_reason),
            "answers_not_as_expected": self.mismatched_answers[:20],
            "expected_events": self.expected_events,
            "delivered": self.delivered_events,
            "dead_lettered": self.dead_lettered,
            "klaviyo_requests": self.klaviyo_requests,
            "retries_after_5xx": self.klaviyo_5xx,
            "throttled_429": self.klaviyo_429,
            "ingest_s": round(self.ingest_s, 2),
            "drain_s": round(self.drain_s, 2),
            "phases_s": {k: round(v, 2) for k, v in self.phases.items()},
            "cpu_s": {k: round(v, 1) for k, v in self.cpu_s.items()},
            "sample": self.sample_size,
            "sample_expected_events": self.sample_expected_events,
            "verification_reads": self.verification_reads,
            "events_per_s": round(self.answers["accepted"] / total_s, 1) if total_s else 0.0,
            "checks": [{"name": c.name, "expected": c.expected, "got": c.got, "ok": c.ok} for c in v.checks]
            if v
            else [],
            "problems": v.problems if v else [],
            "dashboard_url": self.dashboard_url,
        }


def _inject_faults(stack: Stack, opts: DemoOptions) -> None:
    """Turn the sandbox's faults on once the set-up is done: injected 5xx and 429 answers on the sync path."""
    from klaviyo_sandbox.client import SandboxClient

    rates: dict[int, float] = {}
    if opts.error_rate:
        rates.update({status: opts.error_rate / 3 for status in (500, 502, 503)})
    if opts.throttle_rate:
        rates[429] = opts.throttle_rate
    if rates:
        with SandboxClient(stack.klaviyo_url) as sandbox:
            sandbox.set_faults(error_rates=rates, seed=opts.seed)


async def _register_accounts(
    stack: Stack, scenario: Scenario, cipher: MultiFernet, keys_dir: Path
) -> dict[str, Credentials]:
    """Create the demo merchants in the registry and run their Klaviyo set-up."""
    from worker.klaviyo.client import KlaviyoClient
    from worker.klaviyo.errors import KlaviyoError
    from worker.setup import SetupError, provision

    creds: dict[str, Credentials] = {}
    redis = Redis.from_url(stack.redis_url)
    try:
        store = AccountStore(redis, cipher)
        settings = Settings(
            redis_url=stack.redis_url,
            klaviyo_base_url=stack.klaviyo_url,
            klaviyo_rate_scale=float(stack.env["PASSBRIDGE_KLAVIYO_RATE_SCALE"]),
        )
        async with KlaviyoClient.from_settings(settings, redis, store) as client:
            for acct in scenario.accounts:
                token = new_token("pbi_")
                secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
                apple_secret = new_token("")
                signer = GoogleSigner(acct.google_issuer_id)
                keys_file = signer.write_keys_file(keys_dir / f"{acct.account_id}-google-keys.json")
                account = Account(
                    account_id=acct.account_id,
                    name=acct.account_id.replace("-", " ").title(),
                    ingest_token_sha256=hash_token(token),
                    apple_pass_types={acct.apple_pass_type_id: acct.pass_type},
                    google_issuer_id=acct.google_issuer_id,
                    google_keys_file=str(keys_file),
                    google_classes={acct.google_class_id: acct.pass_type},
                    secrets=AccountSecrets.model_validate(
                        {
                            "webhook_secrets": [secret],
                            "apple_token_secret": apple_secret,
                            "klaviyo_api_key": acct.klaviyo_api_key,
                        }
                    ),
                )
                await store.put(account)
                try:
                    await provision(client, redis, account)
                except (SetupError, KlaviyoError) as exc:
                    raise DemoError(
                        f"Klaviyo set-up of demo account {acct.account_id} at {stack.klaviyo_url} failed: {exc}"
                    ) from None
                creds[acct.account_id] = Credentials(token, secret, apple_secret, signer)
    finally:
        await redis.aclose()
    return creds


async def _queue_left(redis: Redis, account_ids: list[str]) -> int:
    total = 0
    for a in account_ids:
        total += int(await redis.get(account_keys(a).depth) or 0)
    return total


async def _dlq_size(redis: Redis, account_ids: list[str]) -> int:
    from worker import dlq

    return sum([await dlq.count(redis, a) for a in account_ids])


def _arun(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop where it is installed (the player's HTTP is CPU-bound on the event loop, and
    the demo shares the machine's cores with every process of the stack)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _rate_note(opts: DemoOptions) -> str:
    """What the demo says about speed: how much Klaviyo's tiers are compressed, or that they are not."""
    x = opts.scale
    if not opts.real_klaviyo:
        return (
            f"Klaviyo's real rate tiers compressed {x:g}×: the sandbox and the workers both run their rate "
            f"clock {x:g} times faster (a 750/min tier acts as {750 * x:,.0f}/min)"
        )
    if x == 1:
        return "Klaviyo's rate tiers at their real speed (not compressed)"
    return (
        f"the workers' rate limiter runs {x:g}× faster than Klaviyo's real tiers: expect 429 answers, "
        "which the workers wait out"
    )


def _scenario_for(opts: DemoOptions, tag: str) -> Scenario:
    if not opts.real_klaviyo:
        return build_scenario(opts.passes, accounts=opts.accounts, seed=opts.seed)
    if not opts.klaviyo_api_keys:
        raise DemoError(
            f"PASSBRIDGE_KLAVIYO_BASE_URL is set ({opts.klaviyo_base_url}), so the demo writes to that Klaviyo "
            "instead of a sandbox; set PASSBRIDGE_DEMO_KLAVIYO_API_KEYS to a private API key (pk_...) with "
            "full access to profiles, events, metrics and custom objects (one key serves all demo accounts), "
            "or unset PASSBRIDGE_KLAVIYO_BASE_URL to use the sandbox"
        )
    return build_scenario(
        opts.passes, accounts=opts.accounts, seed=opts.seed, tag=tag, klaviyo_api_keys=opts.klaviyo_api_keys
    )


def run_demo(opts: DemoOptions, console: Console | None = None) -> DemoReport:
    """Run the demo end to end and return its report (``report.ok`` tells whether verification passed).

    Raises :class:`DemoError` when it cannot run as configured (no key for a real Klaviyo, a failed set-up).
    """
    console = console or Console(stderr=True, quiet=opts.quiet)
    real = opts.real_klaviyo
    # A real account keeps earlier runs' profiles: this run's identities carry a tag of their own.
    tag = f"pb{int(time.time()):x}" if real else ""
    state_dir = opts.state_dir or Path(".passbridge") / f"demo-{int(time.time())}"
    _check_state_dir(state_dir)
    scenario = _scenario_for(opts, tag)
    report = DemoReport(
        options={
            "passes": opts.passes,
            "accounts": opts.accounts,
            "rate_scale": opts.scale,
            "workers": opts.workers,
            "injected_5xx_rate": 0.0 if real else opts.error_rate,
            "injected_429_rate": 0.0 if real else opts.throttle_rate,
            "seed": opts.seed,
            "run_tag": tag,
        },
        mode="klaviyo" if real else "sandbox",
        rate_note=_rate_note(opts),
    )
    report.deliveries = scenario.deliveries
    report.expected_events = scenario.expected_events
    secret_key = Fernet.generate_key().decode()
    cipher = MultiFernet([Fernet(secret_key.encode())])
    cfg = StackConfig(
        state_dir=state_dir,
        workers=opts.workers,
        rate_scale=opts.scale,
        sandbox=not real,
        klaviyo_base_url=opts.klaviyo_base_url,
        sandbox_api_keys=[] if real else [a.klaviyo_api_key for a in scenario.accounts],
        secret_key=secret_key,
        admin_token=new_token("adm_"),
    )
    where = f"Klaviyo at {opts.klaviyo_base_url} (no sandbox, no injected faults)" if real else "the sandbox"
    console.print(
        f"[bold]passbridge demo[/]: {opts.passes} passes, {scenario.deliveries} deliveries over "
        f"{opts.accounts} accounts into {where}\n{report.rate_note}"
    )
    drain_timeout = opts.drain_timeout_s or (KLAVIYO_DRAIN_TIMEOUT_S if real else DEMO_DRAIN_TIMEOUT_S)
    clock = time.monotonic()
    own_cpu = time.process_time()

    def phase(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        report.phases[name] = now - clock
        clock = now

    created = not state_dir.exists()
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        with run_stack(cfg) as stack:
            report.sandbox_started = "sandbox" in stack.procs
            report.dashboard_url = f"{stack.producer_url}/dashboard"
            phase("start")
            creds = _arun(_register_accounts(stack, scenario, cipher, state_dir))
            if not real:
                _inject_faults(stack, opts)
            phase("setup")
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                disable=opts.quiet,
            ) as bar:
                ingest = bar.add_task("ingest", total=scenario.deliveries)
                player = Player(stack.producer_url, creds, scenario.accounts)
                played: PlayResult = _arun(player.play(scenario, lambda n: bar.advance(ingest, n)))
                report.answers = played.outcomes
                report.rejected_by_reason = played.rejected_by_reason
                report.mismatched_answers = played.mismatches
                report.ingest_s = played.seconds
                phase("ingest")
                drain = bar.add_task("drain", total=scenario.expected_events)
                report.drain_s = _arun(
                    _drain(
                        stack,
                        scenario,
                        drain_timeout,
                        lambda left: bar.update(drain, completed=max(0, scenario.expected_events - left)),
                    )
                )
                phase("drain")
                if real:
                    sample = sample_passes(scenario, opts.sample, opts.seed)
                    report.sample_size = len(sample)
                    report.sample_expected_events = sum(s.events for s in sample)
                    check = bar.add_task("verify (read back)", total=len(sample))
                    report.verification, report.verification_reads = _arun(
                        _verify_klaviyo(
                            stack, opts, scenario, cipher, sample, lambda n: bar.update(check, completed=n)
                        )
                    )
            if real:
                report.klaviyo_requests = report.klaviyo_5xx = report.klaviyo_429 = None
                checks = report.verification.checks if report.verification else []
                report.delivered_events = next(c.got for c in checks if c.name == "sample: metric events")
            else:
                report.verification = verify_sandbox(stack.klaviyo_url, scenario)
                _sandbox_counts(stack, report)
                report.delivered_events = sum(
                    c.got for c in report.verification.checks if c.name.endswith(": metric events")
                )
            report.dead_lettered = _arun(_count_dlq(stack, scenario))
            phase("verify")
            report.cpu_s = {**stack.cpu_seconds(), "demo": time.process_time() - own_cpu}
    finally:
        if not opts.keep:
            _release_state_dir(state_dir, created)
    return report


def _check_state_dir(state_dir: Path) -> None:
    """Refuse a ``state_dir`` the demo could not remove without losing someone else's files.

    The demo deletes its state dir when it ends, so it must never adopt one holding anything else: a natural
    ``--state-dir .passbridge`` would otherwise wipe the embedded Redis's data and ``secret.key``.
    """
    if state_dir.exists():
        if not state_dir.is_dir():
            raise DemoError(f"--state-dir {state_dir} exists and is not a directory")
        if any(state_dir.iterdir()):
            raise DemoError(
                f"--state-dir {state_dir} already exists and is not empty; the demo removes its state dir when "
                "it ends, so give it a new or empty directory"
            )


def _release_state_dir(state_dir: Path, created: bool) -> None:
    """Remove what the demo put in ``state_dir``: the whole dir if the demo made it, else only its contents."""
    if created:
        shutil.rmtree(state_dir, ignore_errors=True)
        return
    # It was empty when the demo started: everything in it now is the demo's own.
    for child in state_dir.iterdir() if state_dir.is_dir() else ():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


async def _verify_klaviyo(
    stack: Stack,
    opts: DemoOptions,
    scenario: Scenario,
    cipher: MultiFernet,
    sample: list[Any],
    progress: Any,
) -> tuple[Verification, dict[str, dict[str, int]]]:
    """The real-Klaviyo verification, with the accounts' own credentials from the registry."""
    from passbridge.demo.verify_klaviyo import verify_sample
    from worker.klaviyo.client import KlaviyoClient

    redis = Redis.from_url(stack.redis_url)
    try:
        store = AccountStore(redis, cipher)
        accounts = {a.account_id: await store.get(a.account_id) for a in scenario.accounts}
        settings = Settings(klaviyo_base_url=stack.klaviyo_url, klaviyo_rate_scale=opts.scale)
        async with KlaviyoClient.from_settings(settings, redis, store) as client:
            verification = await verify_sample(
                client, accounts, sample, settle_s=opts.settle_s, progress=progress
            )
            reads: dict[str, dict[str, int]] = {}
            for (op, status), n in sorted(client.calls.items()):
                reads.setdefault(op, {})[status] = n
        return verification, reads
    finally:
        await redis.aclose()


async def _drain(stack: Stack, scenario: Scenario, timeout_s: float, progress: Any) -> float:
    started = time.monotonic()
    ids = [a.account_id for a in scenario.accounts]
    redis = Redis.from_url(stack.redis_url)
    try:
        while time.monotonic() - started < timeout_s:
            left = await _queue_left(redis, ids)
            progress(left)
            if left == 0:
                break
            await asyncio.sleep(0.2)
    finally:
        await redis.aclose()
    return time.monotonic() - started


async def _count_dlq(stack: Stack, scenario: Scenario) -> int:
    redis = Redis.from_url(stack.redis_url)
    try:
        return await _dlq_size(redis, [a.account_id for a in scenario.accounts])
    finally:
        await redis.aclose()


def _sandbox_counts(stack: Stack, report: DemoReport) -> None:
    from klaviyo_sandbox.client import SandboxClient

    with SandboxClient(stack.klaviyo_url) as sandbox:
        counts = sandbox.requests(limit=0)["counts"]
    total = fivexx = throttled = 0
    for by_status in counts.values():
        for status, n in by_status.items():
            total += int(n)
            if status.startswith("5"):
                fivexx += int(n)
            if status == "429":
                throttled += int(n)
    report.klaviyo_requests, report.klaviyo_5xx, report.klaviyo_429 = total, fivexx, throttled


def summary_table(report: DemoReport) -> Table:
    """The human summary (the same figures as ``--json``)."""
    d = report.as_dict()
    real = report.mode == "klaviyo"
    t = Table(title=f"passbridge demo ({'real Klaviyo' if real else 'Klaviyo sandbox'})", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    na = "n/a (real Klaviyo)"
    delivered = (
        (
            f"metric events of the {d['sample']} sampled passes",
            f"{d['delivered']} of {d['sample_expected_events']}",
        )
        if real
        else ("delivered to Klaviyo (metric events)", f"{d['delivered']} of {d['expected_events']}")
    )
    rows: list[tuple[str, Any]] = [
        ("events in (deliveries)", d["events_in"]),
        ("accepted", d["accepted"]),
        ("duplicates", d["duplicates"]),
        ("accepted, no event (2nd Apple device)", d["no_event"]),
        *[(f"rejected: {k}", v) for k, v in sorted(d["rejected"].items())],
        ("metric events expected (all passes)", d["expected_events"]),
        delivered,
        ("dead-lettered", d["dead_lettered"]),
        ("Klaviyo requests", na if real else d["klaviyo_requests"]),
        ("retries after injected 5xx", "none injected" if real else d["retries_after_5xx"]),
        ("429 answers", na if real else d["throttled_429"]),
        ("rate tiers", report.rate_note),
        ("ingest time", f"{d['ingest_s']} s"),
        ("drain time", f"{d['drain_s']} s"),
        ("throughput", f"{d['events_per_s']} events/s"),
        ("phases", ", ".join(f"{k} {v} s" for k, v in d["phases_s"].items())),
        ("dashboard", d["dashboard_url"]),
        ("verification", "[green]passed[/]" if report.ok else "[red]FAILED[/]"),
    ]
    for name, value in rows:
        t.add_row(name, str(value))
    return t
