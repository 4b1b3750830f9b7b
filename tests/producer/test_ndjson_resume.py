"""An NDJSON upload refused midway says exactly where to resume."""

from __future__ import annotations

import orjson
import pytest

from passbridge.keys import account_keys
from passbridge.settings import Settings
from tests.factories import event
from tests.producer.conftest import Env

URL = "/v1/accounts/acme/events/ndjson"
AUTH = {"Authorization": "Bearer tok-acme"}


@pytest.fixture
def settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """Room for one 500-event batch, not two; a test's own settings (indirect parameter) on top."""
    return settings.model_copy(update={"backlog_high_water": 600, **getattr(request, "param", {})})


async def test_backlog_full_midway_reports_the_resume_line(env: Env) -> None:
    lines = [orjson.dumps(event(i)) for i in range(1100)]
    lines[99] = b"{broken"  # line 100 is rejected: the first batch spans lines 1..501
    body = b"\n".join(lines) + b"\n"
    r = await env.http.post(URL, content=body, headers=AUTH)
    assert r.status_code == 503, r.text
    doc = r.json()
    assert doc["accepted"] == 500
    assert doc["resume_after_line"] == 501
    assert int(await env.redis.get(account_keys("acme").depth)) == 500

    # resuming after that line (the engine drained meanwhile) loses and repeats nothing
    await env.redis.set(account_keys("acme").depth, 0)
    rest = b"\n".join(lines[501:]) + b"\n"
    r = await env.http.post(URL, content=rest, headers=AUTH)
    assert r.status_code == 200, r.text
    assert (r.json()["accepted"], r.json()["duplicates"]) == (1100 - 501, 0)


async def test_backlog_full_midway_reports_what_before_the_resume_line_was_rejected_or_skipped(
    env: Env,
) -> None:
    await env.update_account(sync_pass_types=["ptk_0x216"])
    lines = [orjson.dumps(event(i)) for i in range(1100)]
    lines[0] = b"garbage"  # rejected before the resume point: the client will not send it again
    for i in (1, 2, 3):
        lines[i] = orjson.dumps(event(i, pass_type="ptk_other"))  # skipped: not synced
    lines[699] = b"{broken"  # rejected after it: comes back with the retry, so not reported now
    r = await env.http.post(URL, content=b"\n".join(lines) + b"\n", headers=AUTH)
    assert r.status_code == 503, r.text
    doc = r.json()
    assert doc["resume_after_line"] == 501  # the first batch is lines 2..501
    assert (doc["accepted"], doc["skipped"], doc["duplicates"]) == (497, 3, 0)
    assert [x["line"] for x in doc["rejected"]] == [1]
    assert doc["rejected"][0]["errors"][0]["pointer"] == ""


@pytest.mark.parametrize("settings", [{"ndjson_rejected_details": 2}], indirect=True)
async def test_backlog_full_midway_lists_the_rejected_lines_as_a_whole_upload_does(env: Env) -> None:
    lines = [orjson.dumps(event(i)) for i in range(1100)]
    for i in (0, 9, 99, 299, 699):  # the last after the resume point: it comes back with the retry
        lines[i] = b"{}" if i % 2 else b"garbage"
    r = await env.http.post(URL, content=b"\n".join(lines) + b"\n", headers=AUTH)
    assert r.status_code == 503, r.text
    doc = r.json()
    assert (doc["resume_after_line"], doc["accepted"]) == (504, 500)
    rejected = doc["rejected"]
    assert [x["line"] for x in rejected] == [1, 10, 100, 300]
    assert rejected[0]["errors"][0]["field"] == "(line)"
    assert {e["pointer"] for e in rejected[1]["errors"]} >= {"/event_id", "/kind"}
    assert rejected[2:] == [{"line": 100}, {"line": 300}]
    assert (doc["rejected_count"], doc["rejected_details_omitted"]) == (4, 2)


async def test_resume_line_counts_an_overlong_line_once(env: Env) -> None:
    lines = [orjson.dumps(event(i)) for i in range(1100)]
    lines[1] = b" " * 2_000_000 + lines[1]  # line 2: too long, reported once; the first batch is lines 1..501
    body = b"\n".join(lines) + b"\n"

    async def chunks():  # type: ignore[no-untyped-def]  # sent chunked, 64 KB at a time
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    r = await env.http.post(URL, content=chunks(), headers=AUTH)
    assert r.status_code == 503, r.text
    doc = r.json()
    assert (doc["accepted"], doc["resume_after_line"]) == (500, 501)
    assert [x["line"] for x in doc["rejected"]] == [2]
