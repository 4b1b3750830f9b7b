"""Content-Encoding on the ingest routes: gzip on the events and NDJSON routes, 415 for what a route does not take."""

from __future__ import annotations

import gzip
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator
from functools import cache
from typing import Any

import httpx
import orjson
import pytest
from pydantic import ValidationError

from passbridge.keys import account_keys
from passbridge.settings import Settings, SettingsError, get_settings
from producer.coding import PIECE, RATIO_FLOOR
from producer.sources.apple import pass_token
from tests.factories import event
from tests.producer.conftest import Env
from tests.producer.test_webhooks import payload, signed

URL = "/v1/accounts/acme/events"
NDJSON = URL + "/ndjson"
AUTH = {"Authorization": "Bearer tok-acme"}
GZ = {**AUTH, "Content-Encoding": "gzip"}
LIMIT = 1024 * 1024


@pytest.fixture
def settings(settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """A 1 MB body limit, so a bomb is cut off quickly; a test's own settings (indirect parameter) on top."""
    return settings.model_copy(update={"max_body_bytes": LIMIT, **getattr(request, "param", {})})


@cache
def bomb(byte: bytes = b"\0") -> bytes:
    """50 MB of one byte (zeros: one over-long line; newlines: 50 million blank ones), gzip-compressed to about
    50 KB."""
    return gzip.compress(byte * 50_000_000, compresslevel=9)


def ndjson(lines: list[bytes]) -> bytes:
    return b"\n".join(lines) + b"\n"


def wordy_lines(n: int) -> list[bytes]:
    """Events that all carry the same 1,000-character property: valid, and about 55:1 gzipped."""
    terms = ("Terms and conditions apply. " * 40)[:1000]
    return [orjson.dumps(event(i, properties={"terms": terms, "points": i})) for i in range(n)]


async def chunked(body: bytes, size: int) -> AsyncIterator[bytes]:
    """The body sent with chunked transfer encoding, ``size`` bytes at a time."""
    for i in range(0, len(body), size):
        yield body[i : i + size]


async def depth(env: Env) -> int:
    return int(await env.redis.get(account_keys("acme").depth) or 0)


def peak_during_start() -> None:
    tracemalloc.start()
    tracemalloc.reset_peak()


def peak_bytes() -> int:
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


class TestEventsRoute:
    @pytest.mark.parametrize("coding", ["gzip", "x-gzip", "GZip", "identity, gzip"])
    async def test_gzip_body_answers_as_the_plain_one(self, env: Env, coding: str) -> None:
        items = [event(i) for i in range(3)]
        r = await env.http.post(
            URL, content=gzip.compress(orjson.dumps(items)), headers={**AUTH, "Content-Encoding": coding}
        )
        assert r.status_code == 202, r.text
        assert (r.json()["accepted"], r.json()["duplicates"]) == (3, 0)
        plain = await env.http.post(URL, json=items, headers=AUTH)
        again = await env.http.post(URL, content=gzip.compress(orjson.dumps(items)), headers=GZ)
        assert plain.status_code == again.status_code == 202
        assert again.json() == plain.json()
        assert again.json()["duplicates"] == 3
        assert await depth(env) == 3

    async def test_gzip_body_is_validated_as_the_plain_one(self, env: Env) -> None:
        items = [event(0), event(1, email="not-an-email")]
        r = await env.http.post(URL, content=gzip.compress(orjson.dumps(items)), headers=GZ)
        plain = await env.http.post(URL, json=items, headers=AUTH)
        assert r.status_code == plain.status_code == 422
        assert r.json()["errors"] == plain.json()["errors"]

    async def test_identity_is_no_coding(self, env: Env) -> None:
        r = await env.http.post(
            URL, content=orjson.dumps(event(1)), headers={**AUTH, "Content-Encoding": "identity"}
        )
        assert r.status_code == 202, r.text

    async def test_concatenated_members_decode_as_one_body(self, env: Env) -> None:
        raw = orjson.dumps([event(i) for i in range(4)])
        cut = len(raw) // 2  # mid-item: the members only make sense together
        body = gzip.compress(raw[:cut]) + gzip.compress(raw[cut:]) + b"\0" * 16  # gzip's zero padding too
        r = await env.http.post(URL, content=chunked(body, 50), headers=GZ)
        assert r.status_code == 202, r.text
        assert r.json()["accepted"] == 4

    async def test_bomb_is_cut_off_at_the_body_limit(self, env: Env) -> None:
        body = bomb()
        assert len(body) < LIMIT  # the compressed length passes; the decompressed bytes do not
        peak_during_start()
        try:
            r = await env.http.post(URL, content=body, headers=GZ)
        finally:
            peak = peak_bytes()
        assert r.status_code == 413, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["type"].endswith("/body-too-large")
        assert "decompressed" in r.json()["detail"]
        assert peak < 4 * LIMIT  # the 50 MB never inflated in memory
        assert await depth(env) == 0

    async def test_declared_compressed_length_over_the_limit_is_413(self, env: Env) -> None:
        r = await env.http.post(URL, content=gzip.compress(b" " * 10) + b"\0" * (LIMIT + 1), headers=GZ)
        assert r.status_code == 413

    @pytest.mark.parametrize(
        ("body", "reason"),
        [
            (gzip.compress(orjson.dumps(event(1)))[:-6], "truncated"),
            (gzip.compress(orjson.dumps(event(1))) + b"trailing garbage", "incorrect header check"),
            (orjson.dumps(event(1)), "incorrect header check"),  # not compressed at all
            (b"", "empty"),
        ],
    )
    async def test_corrupt_gzip_is_400_naming_the_body(self, env: Env, body: bytes, reason: str) -> None:
        r = await env.http.post(URL, content=body, headers=GZ)
        assert r.status_code == 400, r.text
        assert r.headers["content-type"] == "application/problem+json"
        doc = r.json()
        assert doc["type"].endswith("/malformed-gzip")
        [error] = doc["errors"]
        assert (error["pointer"], error["field"]) == ("", "(body)")
        assert "gzip data is invalid" in error["detail"]
        assert reason in error["detail"]
        assert await depth(env) == 0


class TestNdjsonRoute:
    async def test_gzip_stream_answers_as_the_plain_one(self, env: Env) -> None:
        lines = [orjson.dumps(event(i)) for i in range(1200)]
        lines[10] = b"{broken"
        lines[20] = orjson.dumps(event(20, email="bad"))
        lines[30] = b" " * 300_000  # over the line limit
        body = ndjson(lines)
        r = await env.http.post(NDJSON, content=chunked(gzip.compress(body), 997), headers=GZ)
        assert r.status_code == 200, r.text
        doc = r.json()
        assert (doc["lines"], doc["accepted"], doc["duplicates"]) == (1200, 1197, 0)
        assert [x["line"] for x in doc["rejected"]] == [11, 21, 31]
        assert await depth(env) == 1197

        plain = (await env.http.post(NDJSON, content=body, headers=AUTH)).json()
        again = (await env.http.post(NDJSON, content=gzip.compress(body), headers=GZ)).json()
        assert again == plain
        assert (again["accepted"], again["duplicates"]) == (0, 1197)

    async def test_concatenated_members_continue_the_lines(self, env: Env) -> None:
        body = ndjson([orjson.dumps(event(i)) for i in range(6)])
        cut = len(body) // 2 + 3  # mid-line
        r = await env.http.post(
            NDJSON,
            content=gzip.compress(body[:cut]) + b"\0\0" + gzip.compress(body[cut:]),
            headers={**AUTH, "Content-Encoding": "x-gzip"},
        )
        assert r.status_code == 200, r.text
        assert (r.json()["lines"], r.json()["accepted"], r.json()["rejected"]) == (6, 6, [])

    @pytest.mark.parametrize("settings", [{"gzip_max_ratio": 1032}], indirect=True)  # no ratio guard
    async def test_bomb_is_one_overlong_line_and_never_inflates_in_memory(self, env: Env) -> None:
        peak_during_start()
        try:
            r = await env.http.post(NDJSON, content=bomb(), headers=GZ)
        finally:
            peak = peak_bytes()
        assert r.status_code == 200, r.text
        doc = r.json()
        assert (doc["lines"], doc["accepted"]) == (1, 0)
        assert "line longer than" in doc["rejected"][0]["errors"][0]["detail"]
        assert peak < 8 * 1024 * 1024  # a line's worth and a piece, not 50 MB

    async def test_corrupt_data_keeps_the_lines_before_and_says_where(self, env: Env) -> None:
        lines = [orjson.dumps(event(i)) for i in range(1200)]
        lines[9] = b"{broken"
        body = ndjson(lines)
        cut = sum(len(x) + 1 for x in lines[:700]) + 20  # 700 whole lines and the head of line 701
        first = gzip.compress(body[:cut])
        r = await env.http.post(
            NDJSON, content=chunked(first + b"NOT GZIP" + gzip.compress(body[cut:]), 4096), headers=GZ
        )
        assert r.status_code == 400, r.text
        assert r.headers["content-type"] == "application/problem+json"
        doc = r.json()
        assert doc["type"].endswith("/malformed-gzip")
        assert (doc["gzip_offset"], doc["line"]) == (len(first), 701)
        assert f"byte {len(first)}" in doc["detail"]
        assert "line 701" in doc["detail"]
        assert doc["errors"][0]["field"] == "(body)"
        # the first batch (500 lines) was in Redis before the bad bytes arrived; nothing of it is lost
        assert (doc["lines_read"], doc["resume_after_line"], doc["accepted"]) == (700, 700, 699)
        assert [x["line"] for x in doc["rejected"]] == [10]
        assert await depth(env) == 699

    async def test_truncated_stream_keeps_the_whole_lines_received(self, env: Env) -> None:
        body = ndjson([orjson.dumps(event(i)) for i in range(800)])
        packed = gzip.compress(body)
        cut = packed[: len(packed) * 3 // 5]
        whole = zlib.decompressobj(31).decompress(cut).count(b"\n")
        assert 0 < whole < 800
        r = await env.http.post(NDJSON, content=cut, headers=GZ)
        assert r.status_code == 400, r.text
        doc = r.json()
        assert "truncated" in doc["detail"]
        assert (doc["resume_after_line"], doc["accepted"], doc["line"]) == (whole, whole, whole + 1)
        assert await depth(env) == whole


@pytest.mark.parametrize("settings", [{"ndjson_rejected_details": 2}], indirect=True)
class TestPartWayRejectedDetails:
    """An upload ended part-way lists the rejected lines up to resume_after_line as a whole one does: each by
    number, the first PASSBRIDGE_NDJSON_REJECTED_DETAILS with their errors, and counts that match the list."""

    @staticmethod
    def lines() -> list[bytes]:
        lines = [orjson.dumps(event(i)) for i in range(1200)]
        for i in (4, 9, 99, 599, 699):
            lines[i] = b"{}" if i % 2 else orjson.dumps(event(i, email="bad"))
        return lines

    @staticmethod
    def check(doc: dict[str, Any]) -> None:
        rejected = doc["rejected"]
        assert [x["line"] for x in rejected] == [5, 10, 100, 600, 700]
        assert [bool(x.get("errors")) for x in rejected] == [True, True, False, False, False]
        assert rejected[0]["errors"][0]["pointer"] == "/email"
        assert all(x == {"line": x["line"]} for x in rejected[2:])
        assert (doc["rejected_count"], doc["rejected_details_omitted"]) == (5, 3)

    async def test_corrupt_gzip(self, env: Env) -> None:
        body = ndjson(self.lines())
        cut = sum(len(x) + 1 for x in self.lines()[:1000])  # 1000 whole lines, then bad data
        r = await env.http.post(NDJSON, content=gzip.compress(body[:cut]) + b"NOT GZIP", headers=GZ)
        assert r.status_code == 400, r.text
        doc = r.json()
        assert (doc["resume_after_line"], doc["accepted"]) == (1000, 995)
        self.check(doc)

    async def test_gzip_ratio_exceeded(self, env: Env) -> None:
        body = gzip.compress(ndjson(self.lines())) + bomb(b"\n")
        r = await env.http.post(NDJSON, content=chunked(body, 4096), headers=GZ)
        assert r.status_code == 413, r.text
        doc = r.json()
        assert doc["type"].endswith("/gzip-ratio-exceeded")
        assert doc["accepted"] == 1195
        self.check(doc)


class TestNdjsonRatioGuard:
    """gzip NDJSON has no total limit, so what it inflates to is bounded per compressed byte instead."""

    async def test_bomb_stops_soon_and_keeps_the_lines_before(self, env: Env) -> None:
        lines = [orjson.dumps(event(i)) for i in range(1200)]
        lines[9] = b"{broken"
        head = gzip.compress(ndjson(lines))
        body = head + bomb(b"\n")  # then 50 million blank lines: many seconds of CPU to read
        start = time.monotonic()
        r = await env.http.post(NDJSON, content=chunked(body, 4096), headers=GZ)
        took = time.monotonic() - start
        assert r.status_code == 413, r.text
        assert r.headers["content-type"] == "application/problem+json"
        doc = r.json()
        assert doc["type"].endswith("/gzip-ratio-exceeded")
        assert doc["errors"] == [{"pointer": "", "field": "(body)", "detail": doc["detail"]}]
        assert "PASSBRIDGE_GZIP_MAX_RATIO" in doc["detail"]
        assert "more than 100 times" in doc["detail"]
        assert doc["max_ratio"] == 100
        # Stopped by the first piece over 100:1 past the floor: the piece before was within the limit.
        inflated, offset = doc["decompressed_bytes"], doc["gzip_offset"]
        assert inflated > max(RATIO_FLOOR, 100 * offset)
        assert inflated - PIECE <= max(RATIO_FLOOR, 100 * offset)
        assert inflated < 4 * 1024 * 1024  # of over 50 MB
        assert offset < len(head) + len(bomb(b"\n")) // 10
        # The real lines and the blank ones read before the stop were taken; nothing after.
        assert 1200 < doc["lines_read"] < inflated
        assert doc["resume_after_line"] == doc["lines_read"] == doc["line"] - 1
        assert (doc["accepted"], [x["line"] for x in doc["rejected"]]) == (1199, [10])
        assert await depth(env) == 1199
        assert took < 30, took  # generous for a loaded machine; without the guard it reads all 50 million

    async def test_bomb_of_one_long_line_stops_in_that_line(self, env: Env) -> None:
        r = await env.http.post(NDJSON, content=bomb(), headers=GZ)
        assert r.status_code == 413, r.text
        doc = r.json()
        assert doc["type"].endswith("/gzip-ratio-exceeded")
        assert (doc["lines_read"], doc["line"], doc["resume_after_line"], doc["accepted"]) == (1, 1, 1, 0)
        assert "line longer than" in doc["rejected"][0]["errors"][0]["detail"]
        assert doc["decompressed_bytes"] <= RATIO_FLOOR + PIECE

    async def test_dense_body_under_the_floor_is_read_whole(self, env: Env) -> None:
        body = ndjson([orjson.dumps(event(1))] * 3000)
        packed = gzip.compress(body)
        assert len(body) < RATIO_FLOOR
        assert len(body) > 200 * len(packed)
        r = await env.http.post(NDJSON, content=packed, headers=GZ)
        assert r.status_code == 200, r.text
        assert (r.json()["lines"], r.json()["accepted"], r.json()["duplicates"]) == (3000, 1, 2999)

    async def test_large_realistic_upload_is_read_whole(self, env: Env) -> None:
        body = ndjson([orjson.dumps(event(i)) for i in range(20_000)])
        packed = gzip.compress(body, compresslevel=9)
        assert len(body) > 5 * RATIO_FLOOR
        assert len(body) > 15 * len(packed)  # as dense as pass events get
        r = await env.http.post(NDJSON, content=chunked(packed, 16384), headers=GZ)
        assert r.status_code == 200, r.text
        assert (r.json()["lines"], r.json()["accepted"], r.json()["rejected"]) == (20_000, 20_000, [])
        assert await depth(env) == 20_000

    @pytest.mark.parametrize("settings", [{"gzip_max_ratio": 40}], indirect=True)
    async def test_denser_than_the_setting_is_stopped_and_resumes(self, env: Env) -> None:
        lines = wordy_lines(5000)
        body = ndjson(lines)
        packed = gzip.compress(body)
        assert 50 < len(body) / len(packed) < 60
        r = await env.http.post(NDJSON, content=chunked(packed, 16384), headers=GZ)
        assert r.status_code == 413, r.text
        doc = r.json()
        assert doc["max_ratio"] == 40
        assert "more than 40 times" in doc["detail"]
        after = doc["resume_after_line"]
        assert 0 < after < 5000
        assert (doc["accepted"], doc["rejected"], doc["line"]) == (after, [], after + 1)
        assert await depth(env) == after

        # The rest, sent uncompressed, completes the upload: nothing lost, nothing twice.
        r = await env.http.post(NDJSON, content=ndjson(lines[after:]), headers=AUTH)
        assert r.status_code == 200, r.text
        assert (r.json()["accepted"], r.json()["duplicates"]) == (5000 - after, 0)
        assert await depth(env) == 5000

    @pytest.mark.parametrize("settings", [{"gzip_max_ratio": 70}], indirect=True)
    async def test_less_dense_than_the_setting_is_read_whole(self, env: Env) -> None:
        packed = gzip.compress(ndjson(wordy_lines(5000)))
        r = await env.http.post(NDJSON, content=chunked(packed, 16384), headers=GZ)
        assert r.status_code == 200, r.text
        assert (r.json()["lines"], r.json()["accepted"]) == (5000, 5000)


class TestRatioSetting:
    @pytest.mark.parametrize("value", [20, 100, 1032])
    def test_bounds_are_taken(self, value: int) -> None:
        assert Settings(gzip_max_ratio=value).gzip_max_ratio == value

    def test_default_is_100(self) -> None:
        assert Settings.model_fields["gzip_max_ratio"].default == 100

    @pytest.mark.parametrize("value", ["19", "1033", "0", "-5", "lots", "50.5"])
    def test_out_of_bounds_stops_naming_the_variable(
        self, monkeypatch: pytest.MonkeyPatch, value: str
    ) -> None:
        monkeypatch.setenv("PASSBRIDGE_GZIP_MAX_RATIO", value)
        get_settings.cache_clear()
        try:
            with pytest.raises(SettingsError, match="PASSBRIDGE_GZIP_MAX_RATIO"):
                get_settings()
        finally:
            get_settings.cache_clear()
        with pytest.raises(ValidationError):
            Settings(gzip_max_ratio=value)


BR = ["br", "deflate", "zstd", "compress", "gzip, gzip", "gzip, br", "x-unknown"]


def assert_415(r: httpx.Response, accepts: str) -> None:
    assert r.status_code == 415, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["accept-encoding"] == accepts
    doc = r.json()
    assert doc["type"].endswith("/unsupported-content-encoding")
    assert doc["errors"][0]["field"] == "Content-Encoding"
    assert "Content-Encoding" in doc["detail"]


class TestUnsupportedCodings:
    @pytest.mark.parametrize("coding", BR)
    async def test_events_routes_take_gzip_only(self, env: Env, coding: str) -> None:
        body = orjson.dumps(event(1))
        for url in (URL, NDJSON):
            r = await env.http.post(url, content=body, headers={**AUTH, "Content-Encoding": coding})
            assert_415(r, "gzip")
            assert r.json()["accepted_encodings"] == ["gzip", "x-gzip", "identity"]
        assert await depth(env) == 0

    async def test_several_header_lines_are_several_codings(self, env: Env) -> None:
        headers = [*AUTH.items(), ("Content-Encoding", "gzip"), ("Content-Encoding", "br")]
        r = await env.http.post(URL, content=gzip.compress(orjson.dumps(event(1))), headers=headers)
        assert_415(r, "gzip")

    @pytest.mark.parametrize("coding", ["gzip", *BR])
    async def test_signed_routes_take_identity_only(self, env: Env, coding: str) -> None:
        raw, headers = signed(env.secret, "msg_1", payload())
        r = await env.http.post(
            "/webhooks/acme", content=raw, headers={**headers, "Content-Encoding": coding}
        )
        assert_415(r, "identity")
        assert r.json()["accepted_encodings"] == ["identity"]

        ptid, serial = "pass.com.acme.loyalty", "SER1"
        r = await env.http.post(
            f"/apple/acme/v1/devices/dev1/registrations/{ptid}/{serial}",
            content=b'{"pushToken": "push-dev1"}',
            headers={
                "Authorization": f"ApplePass {pass_token('apple-secret-acme', ptid, serial)}",
                "Content-Encoding": coding,
            },
        )
        assert_415(r, "identity")
        r = await env.http.post(
            "/apple/acme/v1/log", content=b'{"logs": ["x"]}', headers={"Content-Encoding": coding}
        )
        assert_415(r, "identity")
        r = await env.http.post("/google/acme/callback", content=b"{}", headers={"Content-Encoding": coding})
        assert_415(r, "identity")
        assert await depth(env) == 0

    async def test_signed_webhook_with_identity_coding_is_accepted(self, env: Env) -> None:
        raw, headers = signed(env.secret, "msg_1", payload())
        r = await env.http.post(
            "/webhooks/acme", content=raw, headers={**headers, "Content-Encoding": "identity"}
        )
        assert r.status_code == 202, r.text
