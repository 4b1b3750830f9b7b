"""The test scheduler's lists (tests/conftest.py) name files that exist: a renamed file would silently lose its
place (an order and a shared scenario only, never whether a test runs)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import LONG_FILES_FIRST, SCENARIO_FILES

ROOT = Path(__file__).resolve().parents[1]


def test_the_scheduler_names_existing_files() -> None:
    named = set(SCENARIO_FILES) | {f for f in LONG_FILES_FIRST if f != "tests/ops (scenario)"}
    assert sorted(f for f in named if not (ROOT / f).is_file()) == []
