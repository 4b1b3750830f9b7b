"""PURE: which passes the real-Klaviyo verification samples, what each must look like, and how to compare.

The demo cannot read a real Klaviyo account in bulk (its read endpoints are rate-limited per account, object
records at 3/s), so it checks a deterministic sample of passes one by one: the same scenario and seed always
give the same sample. :class:`PassExpectation` is what the scenario implies for one pass; :func:`compare`
lists every way what Klaviyo answered differs from it.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from passbridge.demo.scenario import PassPlan, Scenario

METRIC = {
    "created": "Pass Created",
    "installed": "Pass Installed",
    "updated": "Pass Updated",
    "uninstalled": "Pass Uninstalled",
    "deleted": "Pass Deleted",
}


def expected_metrics(plan: PassPlan) -> Counter[str]:
    """Metric events by name that one pass must end up with: one per accepted event, stale ones included."""
    c: Counter[str] = Counter(METRIC[kind] for kind in plan.events)
    if plan.stale:
        c["Pass Updated"] += plan.stale
    return c


@dataclass(frozen=True)
class PassExpectation:
    """What Klaviyo must hold for one sampled pass."""

    account_id: str
    serial: str
    final_status: str
    metrics: dict[str, int]

    @property
    def events(self) -> int:
        return sum(self.metrics.values())


@dataclass
class PassFound:
    """What Klaviyo answered for one pass (``None``: not there)."""

    profile_id: str | None = None
    metrics: Counter[str] = field(default_factory=Counter)
    unnamed_metrics: int = 0  # events whose metric id is not among the account's metrics
    record_status: str | None = None
    record_found: bool = False


def sample_passes(scenario: Scenario, n: int = 50, seed: int = 7) -> list[PassExpectation]:
    """``n`` passes chosen by ``seed`` (every pass when there are fewer), spread over all accounts."""
    keys = sorted(scenario.passes)
    chosen = keys if len(keys) <= n else sorted(random.Random(f"sample:{seed}").sample(keys, n))
    out = []
    for key in chosen:
        plan = scenario.passes[key]
        out.append(
            PassExpectation(
                plan.account_id, plan.serial, plan.final_status, dict(sorted(expected_metrics(plan).items()))
            )
        )
    return out


def compare(want: PassExpectation, got: PassFound) -> list[str]:
    """Every difference between what the pass must look like and what Klaviyo holds (empty: it matches)."""
    where = f"{want.account_id}/{want.serial}"
    if got.profile_id is None:
        return [f"{where}: no profile with external_id {want.serial!r}"]
    problems = []
    have = dict(sorted(got.metrics.items()))
    if have != want.metrics or got.unnamed_metrics:
        extra = f" and {got.unnamed_metrics} of unknown metrics" if got.unnamed_metrics else ""
        problems.append(
            f"{where}: metric events {have}{extra} (want {want.metrics}) on profile {got.profile_id}"
        )
    if not got.record_found:
        problems.append(f"{where}: no WalletPass record (want status {want.final_status!r})")
    elif got.record_status != want.final_status:
        problems.append(f"{where}: WalletPass status {got.record_status!r} (want {want.final_status!r})")
    return problems
