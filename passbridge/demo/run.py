"""``passbridge demo``: start the whole stack, play a realistic day through it, verify Klaviyo, summarize.

The steps: start embedded Redis, the Klaviyo sandbox (real tiers on a clock ``rate_scale`` times faster, with
injected 5xx and 429 answers), the producer and two worker processes; register three merchant accounts and run
their Klaviyo set-up; send the scenario from all four sources; wait for the queues to drain; read everything
back from the sandbox and compare it with what the events imply.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, MultiFernet
from redis.asyncio import Redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from passbridge.accounts import Account, AccountSecrets, AccountStore, hash_token, new_token
from passbridge.demo.play import Credentials, Player, PlayResult
from passbridge.demo.scenario import Scenario, build_scenario
from passbridge.demo.stack import Stack, StackConfig, run_stack
from passbridge.demo.verify import Verification, verify_sandbox
from passbridge.keys import account_keys
from passbridge.settings import Settings
from producer.sources.google_sign import GoogleSigner


@dataclass
class DemoOptions:
    """Size and shape of the demo run."""

    passes: int = 3000
    accounts: int = 3
    rate_scale: float = 20.0
    workers: int = 2
    error_rate: float = 0.02  # each of 500/502/503 at a third of this
    throttle_rate: float = 0.01  # injected 429s
    seed: int = 7
    state_dir: Path | None = None
    keep: bool = False
    drain_timeout_s: float = 240.0
    quiet: bool = False


@dataclass
class DemoReport:
    """Everything the summary shows, and whether the verification passed."""

    options: dict[str, Any]
    deliveries: int = 0
    answers: Counter[str] = field(default_factory=Counter)
    rejected_by_reason: Counter[str] = field(default_factory=Counter)
    mismatched_answers: list[str] = field(default_factory=list)
    expected_events: int = 0
    delivered_events: int = 0
    dead_lettered: int = 0
    klaviyo_requests: int = 0
    klaviyo_5xx: int = 0
    klaviyo_429: int = 0
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
    from worker.setup import provision

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
                await provision(client, redis, account)
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


def run_demo(opts: DemoOptions, console: Console | None = None) -> DemoReport:
    """Run the demo end to end and return its report (``report.ok`` tells whether verification passed)."""
    console = console or Console(stderr=True, quiet=opts.quiet)
    scenario = build_scenario(opts.passes, accounts=opts.accounts, seed=opts.seed)
    report = DemoReport(
        options={
            "passes": opts.passes,
            "accounts": opts.accounts,
            "rate_scale": opts.rate_scale,
            "workers": opts.workers,
            "injected_5xx_rate": opts.error_rate,
            "injected_429_rate": opts.throttle_rate,
        }
    )
    report.deliveries = scenario.deliveries
    report.expected_events = scenario.expected_events
    state_dir = opts.state_dir or Path(".passbridge") / f"demo-{int(time.time())}"
    if state_dir.exists():
        shutil.rmtree(state_dir)
    secret_key = Fernet.generate_key().decode()
    cipher = MultiFernet([Fernet(secret_key.encode())])
    cfg = StackConfig(
        state_dir=state_dir,
        workers=opts.workers,
        rate_scale=opts.rate_scale,
        sandbox_api_keys=[a.klaviyo_api_key for a in scenario.accounts],
        secret_key=secret_key,
        admin_token=new_token("adm_"),
    )
    console.print(
        f"[bold]passbridge demo[/]: {opts.passes} passes, {scenario.deliveries} deliveries over "
        f"{opts.accounts} accounts; Klaviyo's real rate tiers on a clock {opts.rate_scale:g}× faster"
    )
    try:
        with run_stack(cfg) as stack:
            report.dashboard_url = f"{stack.producer_url}/dashboard"
            creds = asyncio.run(_register_accounts(stack, scenario, cipher, state_dir))
            _inject_faults(stack, opts)
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
                played: PlayResult = asyncio.run(player.play(scenario, lambda n: bar.advance(ingest, n)))
                report.answers = played.outcomes
                report.rejected_by_reason = played.rejected_by_reason
                report.mismatched_answers = played.mismatches
                report.ingest_s = played.seconds
                drain = bar.add_task("drain", total=scenario.expected_events)
                report.drain_s = asyncio.run(
                    _drain(
                        stack,
                        scenario,
                        opts,
                        lambda left: bar.update(drain, completed=max(0, scenario.expected_events - left)),
                    )
                )
            report.verification = verify_sandbox(stack.klaviyo_url, scenario)
            _sandbox_counts(stack, report)
            report.dead_lettered = asyncio.run(_count_dlq(stack, scenario))
            report.delivered_events = sum(
                c.got for c in report.verification.checks if c.name.endswith(": metric events")
            )
    finally:
        if not opts.keep and state_dir.exists():
            shutil.rmtree(state_dir, ignore_errors=True)
    return report


async def _drain(stack: Stack, scenario: Scenario, opts: DemoOptions, progress: Any) -> float:
    started = time.monotonic()
    ids = [a.account_id for a in scenario.accounts]
    redis = Redis.from_url(stack.redis_url)
    try:
        while time.monotonic() - started < opts.drain_timeout_s:
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
    for by_status in counts.values():
        for status, n in by_status.items():
            report.klaviyo_requests += int(n)
            if status.startswith("5"):
                report.klaviyo_5xx += int(n)
            if status == "429":
                report.klaviyo_429 += int(n)


def summary_table(report: DemoReport) -> Table:
    """The human summary."""
    d = report.as_dict()
    t = Table(title="passbridge demo", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    rows: list[tuple[str, Any]] = [
        ("events in (deliveries)", d["events_in"]),
        ("accepted", d["accepted"]),
        ("duplicates", d["duplicates"]),
        ("accepted, no event (2nd Apple device)", d["no_event"]),
        *[(f"rejected: {k}", v) for k, v in sorted(d["rejected"].items())],
        ("delivered to Klaviyo (metric events)", f"{d['delivered']} of {d['expected_events']}"),
        ("dead-lettered", d["dead_lettered"]),
        ("Klaviyo requests", d["klaviyo_requests"]),
        ("retries after injected 5xx", d["retries_after_5xx"]),
        ("429 answers", d["throttled_429"]),
        ("ingest time", f"{d['ingest_s']} s"),
        ("drain time", f"{d['drain_s']} s"),
        ("throughput", f"{d['events_per_s']} events/s"),
        ("dashboard", d["dashboard_url"]),
        ("verification", "[green]passed[/]" if report.ok else "[red]FAILED[/]"),
    ]
    for name, value in rows:
        t.add_row(name, str(value))
    return t
