"""Answers the routes do not write themselves (no such path, wrong method, a crash) are problems too."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx
import orjson
import pytest
from cryptography.fernet import Fernet
from redis.asyncio import Redis

from passbridge.crypto import load_cipher
from passbridge.demo.stack import spawn_cli, stop_process
from passbridge.keys import account_keys
from passbridge.redis_server import free_port
from tests.factories import event, make_account
from tests.producer.conftest import Env

PROBLEM = "application/problem+json"


async def test_unknown_path_is_a_404_problem(env: Env) -> None:
    r = await env.http.get("/v1/nothing-here")
    assert r.status_code == 404
    assert r.headers["content-type"] == PROBLEM
    assert r.json() == {
        "type": "https://passbridge.dev/problems/not-found",
        "title": "Not Found",
        "status": 404,
        "detail": "no endpoint at /v1/nothing-here",
        "instance": "/v1/nothing-here",
    }


async def test_wrong_method_is_a_405_problem_naming_the_allowed_ones(env: Env) -> None:
    r = await env.http.get("/v1/accounts/acme/events", headers={"Authorization": "Bearer tok-acme"})
    assert r.status_code == 405
    assert r.headers["content-type"] == PROBLEM
    assert r.headers["allow"] == "POST"
    doc = r.json()
    assert (doc["type"], doc["title"], doc["status"]) == (
        "https://passbridge.dev/problems/method-not-allowed",
        "Method Not Allowed",
        405,
    )
    assert doc["detail"] == "GET is not allowed here; allowed: POST"


async def test_dashboard_keeps_its_own_answers(env: Env) -> None:
    r = await env.http.get("/dashboard/no-such-page")
    assert r.status_code == 404
    assert r.headers["content-type"] != PROBLEM


@pytest.mark.parametrize("route", ["events", "webhook"])
async def test_unhandled_exception_is_a_500_problem_that_keeps_its_text_to_the_log(
    env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str], route: str
) -> None:
    # A registry entry damaged outside passbridge (its config is not JSON): reading it raises, and no route
    # handles that.
    await make_account(
        env.redis, load_cipher(Fernet.generate_key().decode(), tmp_path), "sealed", token="tok-sealed"
    )
    await env.redis.hset(account_keys("sealed").config, "config", "{not json")
    if route == "events":
        r = await env.http.post(
            "/v1/accounts/sealed/events", json=event(1), headers={"Authorization": "Bearer tok-sealed"}
        )
    else:
        r = await env.http.post("/webhooks/sealed", content=b"{}")
    assert r.status_code == 500
    assert r.headers["content-type"] == PROBLEM
    doc = r.json()
    assert (doc["type"], doc["title"], doc["status"]) == (
        "https://passbridge.dev/problems/internal",
        "Internal server error",
        500,
    )
    assert "not json" not in r.text  # nothing of the exception's text
    assert "Error" not in r.text
    logged = capsys.readouterr()
    assert "unhandled exception" in logged.out + logged.err
    assert "JSONDecodeError" in logged.out + logged.err


def test_the_servers_own_traceback_of_a_crash_is_redacted(redis_url: str, tmp_path: Path) -> None:
    """uvicorn logs each unhandled exception with its traceback. A registry entry damaged so that its
    validation error quotes a key-shaped value must not put that value in the producer's output."""
    key = Fernet.generate_key().decode()
    leaked = "pk_0123456789abcdef0123456789abcdef01"  # the shape of a Klaviyo private key
    asyncio.run(_damaged_account(redis_url, key, leaked))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PASSBRIDGE_") and k != "REDIS_URL"}
    env.update(
        {"REDIS_URL": redis_url, "PASSBRIDGE_SECRET_KEY": key, "PASSBRIDGE_STATE_DIR": str(tmp_path / "s")}
    )
    log = tmp_path / "producer.log"
    proc = spawn_cli(["producer", "--host", "127.0.0.1", "--port", str(port)], env, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/accounts/damaged/events",
            json=event(1),
            headers={"Authorization": "Bearer tok-damaged"},
        )
        assert r.status_code == 500
    finally:
        stop_process(proc, timeout=15)
    output = log.read_text()
    assert "ValidationError" in output  # the crash was logged, traceback included
    assert leaked not in output
    assert "{'note': '***'}" in output  # masked where it was quoted


async def _damaged_account(redis_url: str, key: str, leaked: str) -> None:
    redis = Redis.from_url(redis_url)
    try:
        await make_account(redis, load_cipher(key, Path("/nonexistent")), "damaged", token="tok-damaged")
        config = orjson.loads(await redis.hget(account_keys("damaged").config, "config"))
        config["name"] = {"note": leaked}  # not a string: the validation error quotes the value
        await redis.hset(account_keys("damaged").config, "config", orjson.dumps(config))
    finally:
        await redis.aclose()
