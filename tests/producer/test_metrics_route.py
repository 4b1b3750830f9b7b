"""The producer's ``GET /metrics`` on its public listener: an optional bearer token, and queue gauges read
from Redis at most once per few seconds however often it is scraped."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from redis.asyncio import Redis

from passbridge.keys import account_keys
from passbridge.settings import Settings
from producer.app import create_app
from tests.conftest import LiveServer, serve
from tests.factories import event, make_account
from tests.producer.conftest import cipher

TOKEN = "mt-" + "3" * 24


@pytest.fixture
def guarded(settings: Settings, redis_url: str) -> Iterator[LiveServer]:
    server = serve(create_app(settings.model_copy(update={"metrics_token": SecretStr(TOKEN)}), redis_url))
    yield server
    server.stop()


async def test_metrics_token_is_required_when_set(guarded: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=guarded.url, timeout=10) as http:
        for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": TOKEN}):
            r = await http.get("/metrics", headers=headers)
            assert r.status_code == 401, headers
            assert r.headers["content-type"] == "application/problem+json"
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert r.json() == {
                "type": "https://passbridge.dev/problems/unauthorized",
                "title": "Missing or wrong metrics token",
                "status": 401,
                "detail": "send `Authorization: Bearer <PASSBRIDGE_METRICS_TOKEN>` to read /metrics",
                "instance": "/metrics",
            }
        r = await http.get("/metrics", headers={"authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200
        assert "passbridge_redis_up 1.0" in r.text
        # The refusals are counted like any other: the scrape shows them.
        assert 'passbridge_rejected_total{reason="unauthorized"}' in r.text
        assert (await http.get("/readyz")).status_code == 200  # probes need no token


async def test_metrics_is_open_without_a_token(producer: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=producer.url, timeout=10) as http:
        r = await http.get("/metrics")
        assert r.status_code == 200
        assert "passbridge_redis_up 1.0" in r.text


def _sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


async def test_scrapes_reuse_the_queue_gauges_for_a_few_seconds(
    producer: LiveServer, redis: Redis, settings: Settings
) -> None:
    await make_account(redis, cipher(settings))
    auth = {"authorization": "Bearer tok-acme"}
    ingested = "passbridge_ingested_events_total"
    async with httpx.AsyncClient(base_url=producer.url, timeout=10) as http:
        assert (await http.post("/v1/accounts/acme/events", json=[event(1)], headers=auth)).status_code == 202
        first = (await http.get("/metrics")).text
        assert _sample(first, "passbridge_queue_depth", account="acme") == 1
        assert (await http.post("/v1/accounts/acme/events", json=[event(2)], headers=auth)).status_code == 202
        assert int(await redis.get(account_keys("acme").depth) or 0) == 2
        # Read moments ago: the scrape does not go to Redis again ...
        second = (await http.get("/metrics")).text
        assert _sample(second, "passbridge_queue_depth", account="acme") == 1
        # ... while the counters are always current (this process's: other tests may have counted before).
        before = _sample(first, ingested, account="acme", source="api")
        after = _sample(second, ingested, account="acme", source="api")
        assert before is not None
        assert after == before + 1
