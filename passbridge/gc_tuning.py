"""Garbage-collector settings shared by the long-running processes (producer, workers, express lanes).

Python's default thresholds (700, 10, 10) start a young collection whenever the tracked containers allocated
and still alive since the last one exceed 700. Both sides of passbridge keep more than that alive as a matter
of course, so with the defaults the collector ran far more often than it found garbage:

- a worker draining a backlog holds thousands of serials with their events in flight, and a full collection
  walked all of them every few seconds, holding the event loop for up to 0.6 s (``bench/drain.py``), which
  delayed requests past their rate-limit slots;
- a producer process serving a few dozen concurrent webhooks holds their bodies, items and events while they
  wait for the shared Redis call, and the young collections that working set set off cost about 60 µs of
  CPU per webhook under ``bench/ingest.py``'s load (about 15 % of the request; measured side by side, see
  BENCHMARKS.md "Ingest → Session 13").

With 5,000, young collections stay cheap and become rare, and full ones rarer still. Almost everything these
processes allocate dies by reference counting, so the higher thresholds hold little garbage back.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import structlog

log = structlog.get_logger(__name__)

#: Collector thresholds of a producer or worker process (see the module docstring).
GC_THRESHOLDS = (5_000, 10, 100)

#: A collection that holds the event loop longer than this is logged (``gc_pause``).
GC_PAUSE_LOG_MS = 50.0
_gc_started = 0.0


def _gc_watch(phase: str, info: dict[str, Any]) -> None:
    global _gc_started
    if phase == "start":
        _gc_started = time.perf_counter()
        return
    ms = (time.perf_counter() - _gc_started) * 1000
    if ms >= GC_PAUSE_LOG_MS:
        log.warning(
            "gc_pause", generation=info.get("generation"), ms=round(ms, 1), collected=info.get("collected")
        )


def tune_gc() -> None:
    """Freeze what start-up allocated (never collected again), raise the thresholds, and log the long pauses
    that remain (every request and lease of the process waits during one). Call it once start-up is done."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    if _gc_watch not in gc.callbacks:
        gc.callbacks.append(_gc_watch)
