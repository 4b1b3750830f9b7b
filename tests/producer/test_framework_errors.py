"""Answers the routes do not write themselves (no such path, wrong method, a crash) are problems too."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from passbridge.crypto import load_cipher
from passbridge.keys import account_keys
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
