"""POST /v1/accounts/{id}/events and /events/ndjson over real HTTP and real Redis."""

from __future__ import annotations

import tracemalloc
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from passbridge.event import PassEvent
from passbridge.keys import account_keys
from passbridge.settings import Settings
from tests.factories import event
from tests.producer.conftest import Env

URL = "/v1/accounts/acme/events"


@pytest.fixture
def settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """The test settings, with a test's own (indirect parameter) on top."""
    return settings.model_copy(update=getattr(request, "param", {}))


def auth(token: str = "tok-acme") -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def mailbox(env: Env, serial: str) -> list[PassEvent]:
    raw = await env.redis.zrange(account_keys("acme").mailbox(serial), 0, -1)
    return [PassEvent.from_wire(m[12:], "acme") for m in raw]


class TestEventsRoute:
    """The JSON events route: all-or-nothing, deduplicated, validated."""

    async def test_single_event_is_enqueued_normalized(self, env: Env) -> None:
        r = await env.http.post(
            URL, json=event(1, email="Holder1@EXAMPLE.com", phone_number="(415) 555-0001"), headers=auth()
        )
        assert r.status_code == 202, r.text
        assert r.json() == {"event_id": "evt-1", "status": "accepted", "duplicate": False}
        [ev] = await mailbox(env, "SER00000001")
        assert ev.email == "Holder1@example.com"
        assert ev.phone_number == "+14155550001"
        assert ev.pass_url == "https://passninja.com/p/SER00000001"
        assert ev.source == "api"
        assert ev.received_at >= ev.occurred_at
        assert int(await env.redis.get(account_keys("acme").depth)) == 1
        assert await env.redis.zscore(account_keys("acme").ready, "SER00000001") is not None

    async def test_phone_with_non_ascii_digits_is_stored_in_e164(self, env: Env) -> None:
        r = await env.http.post(URL, json=event(1, phone_number="+1415555012\u0660"), headers=auth())
        assert r.status_code == 202, r.text
        [ev] = await mailbox(env, "SER00000001")
        assert ev.phone_number == "+14155550120"

    async def test_duplicate_answers_2xx_and_enqueues_nothing(self, env: Env) -> None:
        assert (await env.http.post(URL, json=event(1), headers=auth())).status_code == 202
        r = await env.http.post(URL, json=event(1), headers=auth())
        assert r.status_code == 202
        assert r.json()["duplicate"] is True
        assert len(await mailbox(env, "SER00000001")) == 1
        assert int(await env.redis.get(account_keys("acme").depth)) == 1

    async def test_out_of_order_events_take_their_place_in_time(self, env: Env) -> None:
        later = event(1, serial="S", kind="updated", occurred_at="2026-11-25T12:00:00Z")
        earlier = event(2, serial="S", kind="created", occurred_at="2026-11-25T11:00:00Z")
        tie = event(3, serial="S", kind="installed", occurred_at="2026-11-25T12:00:00Z")
        for item in (later, earlier, tie):
            assert (await env.http.post(URL, json=item, headers=auth())).status_code == 202
        assert [e.event_id for e in await mailbox(env, "S")] == ["evt-2", "evt-1", "evt-3"]

    async def test_array_is_all_or_nothing(self, env: Env) -> None:
        items = [event(i) for i in range(5)]
        items[3]["email"] = "not-an-email"
        items[4]["kind"] = "exploded"
        r = await env.http.post(URL, json=items, headers=auth())
        assert r.status_code == 422
        assert r.headers["content-type"] == "application/problem+json"
        pointers = {e["pointer"] for e in r.json()["errors"]}
        assert pointers == {"/3/email", "/4/kind"}
        assert await env.redis.get(account_keys("acme").depth) is None

    async def test_array_reports_each_result(self, env: Env) -> None:
        await env.http.post(URL, json=event(0), headers=auth())
        r = await env.http.post(URL, json=[event(i) for i in range(3)], headers=auth())
        assert r.status_code == 202
        body = r.json()
        assert (body["accepted"], body["duplicates"]) == (2, 1)
        assert [x["duplicate"] for x in body["results"]] == [True, False, False]

    async def test_repeated_id_in_one_request_is_422(self, env: Env) -> None:
        r = await env.http.post(URL, json=[event(1), event(2, event_id="evt-1")], headers=auth())
        assert r.status_code == 422
        assert r.json()["errors"][0]["pointer"] == "/1/event_id"

    @pytest.mark.parametrize(
        ("field", "value", "reason"),
        [
            ("event_id", "", "at least 1"),
            ("event_id", "evt-\x1b]0;x\x07-1", "control"),  # an escape sequence for operators' terminals
            ("kind", "exploded", "created"),
            ("serial_number", "x" * 256, "at most 255"),
            ("serial_number", "bad\nserial", "control"),
            ("pass_type", "has space", "pattern"),
            ("platform", "windows", "apple"),
            ("occurred_at", "yesterday", "datetime"),
            ("occurred_at", "2026-11-25T10:00:00", "timezone"),
            ("occurred_at", "1970-01-01T00:00:00Z", "1990"),
            ("occurred_at", "9999-12-31T23:59:59-01:00", "out of range"),  # past year 9999 in UTC
            ("occurred_at", "0001-01-01T00:00:00+01:00", "out of range"),  # before year 1 in UTC
            ("occurred_at", "9999-12-31 23:59:59-01:00", "out of range"),  # a form only pydantic parses
            ("occurred_at", "2031-01-01T00:00:00Z", "more than 24 hours in the future"),
            ("occurred_at", "2031-01-01 00:00:00Z", "more than 24 hours in the future"),
            ("email", "nope@", "email"),
            ("phone_number", "+1555", "phone"),
            ("phone_number", "12", "phone"),
            ("pass_url", "ftp://x", "http"),
            ("properties", {"$reserved": 1}, "reserved"),
            ("properties", {"nested": {"a": 1}}, "JSON scalar"),
            ("properties", {f"k{i}": i for i in range(101)}, "at most 100"),
            ("properties", {"big": "x" * 10_001}, "longer than"),
            ("surprise", 1, "Extra inputs"),
        ],
    )
    async def test_every_invalid_field_is_422_naming_it(
        self, env: Env, field: str, value: object, reason: str
    ) -> None:
        r = await env.http.post(URL, json=event(1, **{field: value}), headers=auth())
        assert r.status_code == 422, r.text
        [err] = r.json()["errors"]
        assert err["pointer"].startswith(f"/{field}")
        assert reason.lower() in err["detail"].lower(), err

    @pytest.mark.parametrize(
        "bad",
        [
            # every kind of check at once: pydantic's, the phone number's and the receive time's
            {"email": "nope@", "pass_url": "ftp://x", "properties": {"a": {"x": 1}}},
            {},  # otherwise the common shape: its fast path stops at the first of the last two checks
        ],
    )
    async def test_one_answer_names_every_bad_field(self, env: Env, bad: dict[str, object]) -> None:
        """An operator fixes an item in one round: the phone number and a far-future occurred_at were only
        checked once every other field was valid (and the phone number masked occurred_at)."""
        item = event(1, phone_number="12", occurred_at="2031-01-01T00:00:00Z", **bad)
        r = await env.http.post(URL, json=item, headers=auth())
        assert r.status_code == 422, r.text
        errors = {e["pointer"]: e["detail"] for e in r.json()["errors"]}
        assert errors.pop("/phone_number") == "not a valid phone number for its region"
        assert errors.pop("/occurred_at") == "must not be more than 24 hours in the future"
        expected = {"/email", "/pass_url", "/properties/a"} if bad else set()
        assert set(errors) == expected
        assert r.json()["detail"] == f"{2 + len(expected)} invalid field(s); nothing was accepted"

    async def test_each_bad_property_gets_its_own_error(self, env: Env) -> None:
        props = {"tier": "gold", "a": {"x": 1}, "$b": 1, "c/d": [1]}
        r = await env.http.post(URL, json=[event(0), event(1, properties=props)], headers=auth())
        assert r.status_code == 422, r.text
        assert [(e["pointer"], e["field"]) for e in r.json()["errors"]] == [
            ("/1/properties/a", "properties.a"),
            ("/1/properties/$b", "properties.$b"),
            ("/1/properties/c~1d", "properties.c/d"),
        ]
        assert "reserved" in r.json()["errors"][1]["detail"]

    async def test_property_names_equal_once_stripped_are_not_merged(self, env: Env) -> None:
        r = await env.http.post(
            URL, json=event(1, properties={" tier": "gold", "tier": "silver"}), headers=auth()
        )
        assert r.status_code == 422, r.text
        [err] = r.json()["errors"]
        assert err["pointer"] == "/properties/tier"
        assert "same name as ' tier'" in err["detail"]
        assert await env.redis.get(account_keys("acme").depth) is None

    async def test_missing_required_field(self, env: Env) -> None:
        item = event(1)
        del item["serial_number"]
        r = await env.http.post(URL, json=item, headers=auth())
        assert r.status_code == 422
        assert r.json()["errors"][0] == {
            "pointer": "/serial_number",
            "field": "serial_number",
            "detail": "Field required",
        }

    async def test_malformed_json_is_400(self, env: Env) -> None:
        r = await env.http.post(URL, content=b"{nope", headers={**auth(), "content-type": "application/json"})
        assert r.status_code == 400
        assert r.json()["type"].endswith("/malformed-json")

    async def test_oversize_body_is_413(self, env: Env) -> None:
        big = orjson.dumps([event(i) for i in range(1001)])
        r = await env.http.post(URL, content=big, headers=auth())
        assert r.status_code == 413
        huge = b"[" + b" " * (env.settings.max_body_bytes + 1) + b"]"
        r = await env.http.post(URL, content=huge, headers=auth())
        assert r.status_code == 413
        assert "limit" in r.json()["detail"]

    async def test_unknown_account_is_404(self, env: Env) -> None:
        r = await env.http.post("/v1/accounts/nobody/events", json=event(1), headers=auth())
        assert r.status_code == 404
        assert r.json()["type"].endswith("/unknown-account")

    async def test_wrong_or_missing_token_is_401(self, env: Env) -> None:
        assert (await env.http.post(URL, json=event(1), headers=auth("wrong"))).status_code == 401
        assert (await env.http.post(URL, json=event(1))).status_code == 401
        assert await env.redis.get(account_keys("acme").depth) is None

    async def test_unsynced_pass_type_is_acknowledged_and_skipped(self, env: Env) -> None:
        await env.update_account(sync_pass_types=["ptk_other"])
        r = await env.http.post(URL, json=event(1), headers=auth())
        assert r.status_code == 202
        assert r.json()["status"] == "skipped"
        assert await env.redis.get(account_keys("acme").depth) is None


class TestNdjsonRoute:
    """Streaming NDJSON backfill: valid lines accepted, rejected ones reported by line number."""

    async def test_mixed_stream(self, env: Env) -> None:
        lines = [orjson.dumps(event(i)) for i in range(1200)]
        lines[10] = b"{broken"
        lines[20] = orjson.dumps(event(20, email="bad"))
        lines[30] = orjson.dumps(event(0))  # duplicate id of line 1
        body = b"\n".join(lines) + b"\n"

        async def chunks():  # type: ignore[no-untyped-def]
            for i in range(0, len(body), 7000):
                yield body[i : i + 7000]

        r = await env.http.post(URL + "/ndjson", content=chunks(), headers=auth())
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["lines"] == 1200
        assert doc["accepted"] == 1197
        assert doc["duplicates"] == 1
        assert [x["line"] for x in doc["rejected"]] == [11, 21]
        assert doc["rejected"][1]["errors"][0]["pointer"] == "/email"
        assert int(await env.redis.get(account_keys("acme").depth)) == 1197

    @pytest.mark.parametrize("head", [b" ", b"x"])
    async def test_overlong_line_is_rejected_once_and_keeps_the_numbering(
        self, env: Env, head: bytes
    ) -> None:
        # 2 MB with no newline in sight: the server has to give up on the line before its end arrives
        overlong = head * 2_000_000 + orjson.dumps(event(1))
        body = b"\n".join([orjson.dumps(event(0)), overlong, orjson.dumps(event(2)), b"{broken"]) + b"\n"

        async def chunks():  # type: ignore[no-untyped-def]  # sent chunked, 64 KB at a time
            for i in range(0, len(body), 65536):
                yield body[i : i + 65536]

        r = await env.http.post(URL + "/ndjson", content=chunks(), headers=auth())
        assert r.status_code == 200, r.text
        doc = r.json()
        assert (doc["lines"], doc["accepted"]) == (4, 2)
        assert [x["line"] for x in doc["rejected"]] == [2, 4]
        assert "line longer than" in doc["rejected"][0]["errors"][0]["detail"]
        assert await mailbox(env, "SER00000001") == []  # the overlong line's tail is not an event
        assert int(await env.redis.get(account_keys("acme").depth)) == 2

    async def test_out_of_range_time_rejects_only_its_line(self, env: Env) -> None:
        lines = [orjson.dumps(event(i)) for i in range(5)]
        lines[1] = orjson.dumps(event(1, occurred_at="9999-12-31T23:59:59-01:00"))
        lines[2] = orjson.dumps(event(2, occurred_at="0001-01-01T00:00:00+01:00"))
        lines[3] = orjson.dumps(event(3, occurred_at="2031-01-01T00:00:00Z"))
        r = await env.http.post(URL + "/ndjson", content=b"\n".join(lines) + b"\n", headers=auth())
        assert r.status_code == 200, r.text
        doc = r.json()
        assert (doc["lines"], doc["accepted"]) == (5, 2)
        assert [(x["line"], x["errors"][0]["pointer"]) for x in doc["rejected"]] == [
            (2, "/occurred_at"),
            (3, "/occurred_at"),
            (4, "/occurred_at"),
        ]
        assert int(await env.redis.get(account_keys("acme").depth)) == 2


def invalid_lines_counted() -> float:
    """``passbridge_rejected_total{reason="invalid-line"}`` as this process (the test producer's) exposes it."""
    return REGISTRY.get_sample_value("passbridge_rejected_total", {"reason": "invalid-line"}) or 0.0


def interleaved(n: int) -> tuple[list[bytes], list[int]]:
    """``n`` lines, two of every three rejected (``{}``, a JSON error, a bad email in turn), the third valid; and
    the numbers of the rejected lines."""
    lines, bad = [], []
    for i in range(n):
        if i % 3 == 0:
            lines.append(orjson.dumps(event(i)))
            continue
        lines.append((b"{}", b"{broken", orjson.dumps(event(i, email="bad")))[i % 9 // 3])
        bad.append(i + 1)
    return lines, bad


class TestNdjsonRejectedDetails:
    """Every rejected line is listed, with its errors for the first PASSBRIDGE_NDJSON_REJECTED_DETAILS only: a
    backfill with a systematic error must not be answered with each line's errors, many times the upload."""

    async def test_errors_for_the_first_thousand_then_line_numbers_only(self, env: Env) -> None:
        lines, bad = interleaved(7500)
        counted = invalid_lines_counted()
        r = await env.http.post(URL + "/ndjson", content=b"\n".join(lines) + b"\n", headers=auth())
        assert r.status_code == 200, r.text[:2000]
        doc = r.json()
        assert (doc["lines"], doc["accepted"], doc["duplicates"], doc["skipped"]) == (7500, 2500, 0, 0)
        assert (doc["rejected_count"], doc["rejected_details_omitted"]) == (5000, 4000)
        assert [x["line"] for x in doc["rejected"]] == bad
        head, tail = doc["rejected"][:1000], doc["rejected"][1000:]
        assert all(x["errors"] for x in head)
        pointers = {i: x["errors"][0]["pointer"] for i, x in enumerate(head[:6])}
        assert (pointers[2], pointers[3], pointers[4], pointers[5]) == ("", "", "/email", "/email")
        assert {p["pointer"] for p in head[0]["errors"]} >= {"/event_id", "/kind", "/serial_number"}
        assert all(x == {"line": x["line"]} for x in tail)
        # Each listed line counts once in the metric, with its details or without.
        assert invalid_lines_counted() - counted == 5000
        # The valid lines, all of them, are in Redis.
        assert int(await env.redis.get(account_keys("acme").depth)) == 2500
        assert [e.event_id for e in await mailbox(env, "SER00007497")] == ["evt-7497"]
        # The thousand detailed entries, then about 17 bytes a line: with every line's errors it is 1.4 MB.
        assert len(r.content) < len(orjson.dumps(head)) + 4000 * 20 + 500, len(r.content)

    @pytest.mark.parametrize("settings", [{"ndjson_rejected_details": 0}], indirect=True)
    async def test_zero_lists_line_numbers_only(self, env: Env) -> None:
        lines, bad = interleaved(300)
        r = await env.http.post(URL + "/ndjson", content=b"\n".join(lines) + b"\n", headers=auth())
        assert r.status_code == 200, r.text[:2000]
        doc = r.json()
        assert doc["rejected"] == [{"line": n} for n in bad]
        assert (doc["accepted"], doc["rejected_count"], doc["rejected_details_omitted"]) == (100, 200, 200)

    @pytest.mark.parametrize("settings", [{"ndjson_rejected_details": 100_000}], indirect=True)
    async def test_a_large_setting_lists_every_lines_errors(self, env: Env) -> None:
        lines, bad = interleaved(7500)
        r = await env.http.post(URL + "/ndjson", content=b"\n".join(lines) + b"\n", headers=auth())
        assert r.status_code == 200, r.text[:2000]
        doc = r.json()
        assert [x["line"] for x in doc["rejected"] if x["errors"]] == bad
        assert (doc["accepted"], doc["rejected_count"], doc["rejected_details_omitted"]) == (2500, 5000, 0)

    async def test_a_line_lists_its_first_hundred_errors(self, env: Env) -> None:
        # 20,000 bad property names: 2.7 MB of errors for this one 210 KB line.
        item = event(1, properties={f"${i}": 1 for i in range(20_000)})
        body = orjson.dumps(event(0)) + b"\n" + orjson.dumps(item) + b"\n"
        r = await env.http.post(URL + "/ndjson", content=body, headers=auth())
        assert r.status_code == 200, r.text[:2000]
        [rejected] = r.json()["rejected"]
        assert rejected["line"] == 2
        errors = rejected["errors"]
        assert len(errors) == 101
        assert errors[0]["pointer"] == "/properties"  # over 100 properties
        assert errors[1]["pointer"] == "/properties/$0"
        assert errors[100] == {
            "pointer": "",
            "field": "(line)",
            "detail": "and 19901 more error(s) in this line",
        }
        assert len(r.content) < 30_000

    async def test_a_file_of_bad_lines_costs_memory_for_its_numbers_only(self, env: Env) -> None:
        body = b"{}\n" * 100_000  # 300 KB; each line's errors about 350 bytes, 35 MB in all
        tracemalloc.start()  # the producer serves from a thread of this process
        tracemalloc.reset_peak()
        try:
            r = await env.http.post(URL + "/ndjson", content=body, headers=auth(), timeout=120)
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert r.status_code == 200, r.text[:2000]
        doc: dict[str, Any] = r.json()
        assert (doc["rejected_count"], doc["rejected_details_omitted"]) == (100_000, 99_000)
        assert len(r.content) < 2_500_000, len(r.content)
        assert peak < 20 * 1024 * 1024, peak  # 11 MB measured; with every line's errors, hundreds
