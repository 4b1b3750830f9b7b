"""The demo's verification, small: the whole product as real processes (embedded Redis, the Klaviyo sandbox with
injected 5xx and 429 answers, the producer, two workers), fed from all four sources, checked against Klaviyo."""

from __future__ import annotations

from pathlib import Path

import pytest

from passbridge.demo.run import DemoOptions, run_demo


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_small_demo_verifies(tmp_path: Path) -> None:
    report = run_demo(DemoOptions(passes=400, state_dir=tmp_path / "demo", quiet=True, keep=True))
    doc = report.as_dict()
    failed = [c for c in doc["checks"] if not c["ok"]]
    assert not failed, (failed, doc["problems"])
    assert doc["answers_not_as_expected"] == []
    assert doc["expected_events"] <= 2000
    assert doc["delivered"] == doc["expected_events"]
    assert doc["duplicates"] > 0
    assert set(doc["rejected"]) >= {"bad_signature", "invalid"}
    assert doc["retries_after_5xx"] > 0
    assert doc["throttled_429"] > 0
    assert doc["dead_lettered"] == 0
    # It says how much Klaviyo's tiers are compressed, and where its time went.
    assert doc["mode"] == "sandbox"
    assert doc["sandbox_started"] is True
    assert "compressed 20×" in doc["rate_scale_note"]
    assert list(doc["phases_s"]) == ["start", "setup", "ingest", "drain", "verify"]
    assert {"sandbox", "producer", "worker-1", "worker-2", "demo"} <= set(doc["cpu_s"])
    assert report.ok
