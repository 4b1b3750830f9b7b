"""``/metrics`` of the producer (two processes, multiprocess mode) and of the worker after the scenario's run."""

from __future__ import annotations

import os

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .scenario import ACME_API, ACME_NDJSON, INITECH, Known

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, (
        f"{name}{labels} not exposed; have {sorted(k for k, _ in samples if k.startswith(name))}"
    )
    return samples[key]


def test_producer_counts_across_its_processes(known: Known) -> None:
    url = f"{known.stack.producer_url}/metrics"
    # The scenario made sure both producer processes counted some of the refused requests.
    assert len(known.stack.producer_pids_counting("passbridge_rejected_total")) == 2
    for _ in range(6):  # each scrape lands on either process; every one must see the sum of both
        s = scrape(url)
        assert value(s, "passbridge_ingested_events_total", account="acme", source="api") == len(ACME_API)
        assert value(s, "passbridge_ingested_events_total", account="acme", source="ndjson") == len(
            ACME_NDJSON
        )
        assert value(s, "passbridge_duplicate_events_total", account="acme", source="api") == 1
        assert value(s, "passbridge_ingested_events_total", account="initech", source="api") == len(INITECH)
        assert value(s, "passbridge_rejected_total", reason="unauthorized") == known.unauthorized
        assert value(s, "passbridge_rejected_total", reason="invalid-line") == 1


def test_gauges_read_from_redis_at_scrape_time(known: Known) -> None:
    for url in (f"{known.stack.producer_url}/metrics", known.stack.worker_metrics_url):
        s = scrape(url)
        assert value(s, "passbridge_redis_up") == 1
        assert value(s, "passbridge_queue_depth", account="initech") == len(INITECH)
        assert value(s, "passbridge_queue_depth", account="acme") == 0
        assert value(s, "passbridge_serials", account="initech", state="ready") == 1
        assert value(s, "passbridge_serials", account="hooli", state="parked") == 1
        assert value(s, "passbridge_dlq_size", account="globex") == 1
        assert value(s, "passbridge_account_paused", account="initech") == 1
        assert value(s, "passbridge_account_paused", account="acme") == 0
        assert value(s, "passbridge_account_state", account="initech", state="paused") == 1
        assert value(s, "passbridge_oldest_event_age_seconds", account="initech") > 0
        assert value(s, "passbridge_oldest_event_age_seconds", account="acme") == 0
        assert value(s, "passbridge_workers_alive") == 2  # the worker and its express lane


def test_worker_counts_what_it_did(known: Known) -> None:
    s = scrape(known.stack.worker_metrics_url)
    acme = len(ACME_API) + len(ACME_NDJSON)
    assert value(s, "passbridge_delivered_events_total", account="acme") == acme
    assert value(s, "passbridge_delivered_events_total", account="globex") == 1
    assert value(s, "passbridge_dead_lettered_events_total", account="globex") == 1
    assert value(s, "passbridge_retries_total", account="hooli", kind="transient") >= 1
    # Klaviyo's answers as the sandbox itself counted them (create_event is only called by this worker).
    answered = {
        status: sum(
            v
            for (name, labels), v in s.items()
            if name == "passbridge_klaviyo_requests_total"
            and ("endpoint", "create_event") in labels
            and ("status", status) in labels
        )
        for status in known.create_event
    }
    assert answered == {k: float(v) for k, v in known.create_event.items()}
    assert (
        value(s, "passbridge_klaviyo_requests_total", account="hooli", endpoint="create_event", status="503")
        >= 1
    )
    assert value(
        s, "passbridge_klaviyo_throttled_total", account="umbrella", endpoint="create_event"
    ) == float(known.create_event["429"])
    assert value(s, "passbridge_end_to_end_latency_seconds_count", account="acme") == acme
    assert 0 < value(s, "passbridge_end_to_end_latency_seconds_sum", account="acme") < 60 * acme
    assert value(s, "passbridge_lease_takeovers_total") == 0


def test_worker_metrics_endpoint_answers_only_metrics(known: Known) -> None:
    base = known.stack.worker_metrics_url.rsplit("/", 1)[0]
    assert httpx.get(f"{base}/healthz", timeout=5).text == "ok\n"
    assert httpx.get(f"{base}/nope", timeout=5).status_code == 404
    assert httpx.post(f"{base}/metrics", timeout=5).status_code == 405
    assert os.environ.get("PROMETHEUS_MULTIPROC_DIR") is None  # the test process itself is not in that mode
