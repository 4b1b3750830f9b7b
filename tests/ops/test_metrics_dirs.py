"""One ``PROMETHEUS_MULTIPROC_DIR`` set for the producer and the workers alike (one env file for every unit):
each process tree counts in a subdirectory of its own, so no scrape adds up another's counts and a producer
restart leaves the workers' counts alone. Real ``passbridge producer`` and ``passbridge worker`` processes."""

from __future__ import annotations

from pathlib import Path

from passbridge.demo.stack import stop_process

from .harness import Stack, item, wait_until
from .test_metrics import Samples, scrape, value


def _names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def _subdirs(base: Path) -> list[str]:
    return sorted(d.name.split("-", 1)[0] for d in base.iterdir() if d.is_dir())


def test_producer_and_workers_sharing_one_multiproc_dir(fresh_stack: Stack) -> None:
    stack = fresh_stack
    base = stack.tmp / "prom"
    stack.env["PROMETHEUS_MULTIPROC_DIR"] = str(
        base
    )  # the worker's too (the producer's is set by the harness)
    stack.start_producer()
    stack.start_worker()
    stack.add_account("acme")
    items = [item(f"e{i}", f"S{i % 3}", "created", minute=i) for i in range(6)]
    assert stack.post("acme", items).status_code == 202
    wait_until(lambda: stack.drained("acme"), 30, "delivery")
    worker_url = stack.worker_metrics_url
    producer_url = f"{stack.producer_url}/metrics"

    producer = scrape(producer_url)
    worker = scrape(worker_url)
    assert value(producer, "passbridge_ingested_events_total", account="acme", source="api") == 6
    assert value(worker, "passbridge_delivered_events_total", account="acme") == 6
    # Each counts only its own processes: nothing of the other's, so no sum over scrapes counts twice.
    assert "passbridge_delivered_events_total" not in _names(producer)
    assert "passbridge_ingested_events_total" not in _names(worker)
    assert _subdirs(base) == ["producer", "worker"]
    assert not list(base.glob("*.db"))

    first = next(base.glob("producer-*"))
    assert stack.producer is not None
    stop_process(stack.producer, timeout=15)
    assert not first.exists()  # a producer removes its own directory when it stops ...
    stack.start_producer()
    # ... and a new one empties only its own: the worker's counts are still all there.
    assert value(scrape(worker_url), "passbridge_delivered_events_total", account="acme") == 6
    assert "passbridge_ingested_events_total" not in _names(scrape(producer_url))
    assert _subdirs(base) == ["producer", "worker"]
