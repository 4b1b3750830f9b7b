"""The collector settings every long-running process applies once its start-up is done."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import structlog
from structlog.testing import capture_logs

from passbridge import gc_tuning
from passbridge.gc_tuning import GC_THRESHOLDS, tune_gc
from passbridge.settings import Settings
from producer.app import create_app
from tests.conftest import serve


@pytest.fixture
def default_gc() -> Iterator[None]:
    """Python's own collector settings for the test, and what the process had before it afterwards."""
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield
    gc.set_threshold(*before)


def test_tune_gc_freezes_start_up_and_raises_thresholds(default_gc: None) -> None:
    frozen = gc.get_freeze_count()
    leftover = [object()]  # a tracked container allocated since any earlier freeze, as at start-up
    tune_gc()
    tune_gc()  # idempotent: one watcher, however often a process calls it
    assert gc.get_threshold() == GC_THRESHOLDS
    assert gc.get_freeze_count() > frozen
    assert gc.callbacks.count(gc_tuning._gc_watch) == 1
    del leftover


def test_producer_start_tunes_the_collector(default_gc: None, settings: Settings, redis_url: str) -> None:
    # Concurrent webhooks keep more young objects alive than the default threshold (700), which set off a
    # collection every ten or so requests: about 60 µs of CPU per webhook under bench/ingest.py.
    server = serve(create_app(settings, redis_url))
    try:
        assert gc.get_threshold() == GC_THRESHOLDS
    finally:
        server.stop()


def test_long_collections_are_logged(monkeypatch: pytest.MonkeyPatch, default_gc: None) -> None:
    tune_gc()
    monkeypatch.setattr(gc_tuning, "GC_PAUSE_LOG_MS", 0.0)
    # A fresh logger: the module's own may already be cached with the processors of an earlier test's set-up
    # (cache_logger_on_first_use), which capture_logs cannot reach.
    monkeypatch.setattr(gc_tuning, "log", structlog.get_logger(gc_tuning.__name__))
    with capture_logs() as logs:
        gc.collect()
    pauses = [e for e in logs if e["event"] == "gc_pause"]
    assert pauses
    assert pauses[-1]["generation"] == 2
