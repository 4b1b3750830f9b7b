"""Check what Klaviyo (the sandbox, or a real account through its read API) holds against a scenario."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from passbridge.demo.sample_check import METRIC
from passbridge.demo.scenario import Scenario


@dataclass
class Check:
    """One verified fact."""

    name: str
    expected: Any
    got: Any

    @property
    def ok(self) -> bool:
        return bool(self.expected == self.got)


@dataclass
class Verification:
    """Every check, and a few examples of what went wrong."""

    checks: list[Check] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, expected: Any, got: Any) -> None:
        self.checks.append(Check(name, expected, got))


def verify_sandbox(sandbox_url: str, scenario: Scenario) -> Verification:
    """Read every account back through the sandbox's inspection API and compare with ``scenario``."""
    from klaviyo_sandbox.client import SandboxClient
    from klaviyo_sandbox.config import account_id_for_key

    result = Verification()
    with SandboxClient(sandbox_url) as sandbox:
        sandbox.wait_idle(timeout=60)
        for acct in scenario.accounts:
            a = acct.account_id
            plans = {s: p for (acc, s), p in scenario.passes.items() if acc == a}
            k = account_id_for_key(acct.klaviyo_api_key)  # the sandbox account behind this merchant's key
            profiles = sandbox.profiles(k)
            by_external = {p["attributes"].get("external_id"): p for p in profiles}
            external_of = {p["id"]: p["attributes"].get("external_id") for p in profiles}
            events = sandbox.all_events(k)
            ids = Counter(e["attributes"]["event_properties"].get("$event_id") for e in events)
            per_pass: Counter[str] = Counter()
            metrics: Counter[str] = Counter()
            for e in events:
                per_pass[external_of.get(e["relationships"]["profile"]["data"]["id"], "?")] += 1
                metrics[e["metric_name"]] += 1
            records = {
                r["attributes"]["record_properties"].get("serial_number"): r["attributes"][
                    "record_properties"
                ]
                for r in sandbox.object_records(k, object_type="WalletPass")
            }

            result.add(f"{a}: profiles, one per pass", len(plans), sum(1 for s in plans if s in by_external))
            expected_metrics: Counter[str] = Counter()
            for p in plans.values():
                for kind in p.events:
                    expected_metrics[METRIC[kind]] += 1
                expected_metrics["Pass Updated"] += p.stale
            result.add(f"{a}: metric events", sum(expected_metrics.values()), len(events))
            result.add(
                f"{a}: metric events by name",
                dict(sorted(expected_metrics.items())),
                dict(sorted(metrics.items())),
            )
            result.add(f"{a}: unique_id stored twice", 0, sum(1 for n in ids.values() if n > 1))
            wrong_count = [s for s, p in plans.items() if per_pass[s] != len(p.events) + p.stale]
            result.add(f"{a}: passes with the wrong number of events", 0, len(wrong_count))
            wrong_status = [
                s for s, p in plans.items() if (records.get(s) or {}).get("status") != p.final_status
            ]
            result.add(
                f"{a}: WalletPass records with the final status", len(plans), len(plans) - len(wrong_status)
            )
            for s in (wrong_count + wrong_status)[:5]:
                p = plans[s]
                result.problems.append(
                    f"{a}/{s}: events {per_pass[s]} (want {len(p.events) + p.stale}), "
                    f"status {(records.get(s) or {}).get('status')} (want {p.final_status})"
                )
    return result
