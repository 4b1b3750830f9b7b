"""The Apple PassKit web service over real HTTP and real Redis."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from passbridge import metrics
from passbridge.event import PassEvent
from passbridge.keys import account_keys
from producer.registrations import MAX_DEVICES_PER_PASS
from producer.sources.apple import pass_token
from tests.producer.conftest import Env
from worker.inspect import report_rows

PTID = "pass.com.acme.loyalty"
BASE = "/apple/acme/v1"


def reg_url(device: str, serial: str, ptid: str = PTID, account: str = "acme") -> str:
    return f"/apple/{account}/v1/devices/{device}/registrations/{ptid}/{serial}"


def apple_auth(serial: str, ptid: str = PTID, secret: str = "apple-secret-acme") -> dict[str, str]:
    return {"Authorization": f"ApplePass {pass_token(secret, ptid, serial)}"}


async def register(env: Env, device: str, serial: str, **kw: str) -> httpx.Response:
    return await env.http.post(
        reg_url(device, serial), json={"pushToken": f"push-{device}"}, headers=apple_auth(serial, **kw)
    )


async def unregister(env: Env, device: str, serial: str) -> httpx.Response:
    return await env.http.delete(reg_url(device, serial), headers=apple_auth(serial))


async def mailbox(env: Env, serial: str) -> list[PassEvent]:
    raw = await env.redis.zrange(account_keys("acme").mailbox(serial), 0, -1)
    return [PassEvent.from_wire(m[12:], "acme") for m in raw]


class TestRegistration:
    """Register/unregister: 201/200/401 and pass-level installed/uninstalled on 0↔1 device transitions."""

    async def test_first_device_installs_the_pass(self, env: Env) -> None:
        r = await register(env, "dev1", "SER1")
        assert r.status_code == 201, r.text
        event_id = r.json()["event_id"]
        [ev] = await mailbox(env, "SER1")
        assert ev.event_id == event_id
        assert (ev.kind, ev.platform, ev.source, ev.device_id) == ("installed", "apple", "apple", "dev1")
        assert ev.pass_type == "ptk_0x216"
        assert ev.pass_url == "https://passninja.com/p/SER1"
        regs = await env.redis.hgetall(account_keys("acme").apple_regs(PTID, "SER1"))
        assert regs == {b"dev1": b"push-dev1"}

    async def test_repeated_registration_is_200_and_fires_nothing(self, env: Env) -> None:
        assert (await register(env, "dev1", "SER1")).status_code == 201
        r = await env.http.post(
            reg_url("dev1", "SER1"), json={"pushToken": "new-token"}, headers=apple_auth("SER1")
        )
        assert r.status_code == 200
        assert r.json() == {"status": "already_registered", "event_id": None}
        assert len(await mailbox(env, "SER1")) == 1
        regs = await env.redis.hgetall(account_keys("acme").apple_regs(PTID, "SER1"))
        assert regs == {b"dev1": b"new-token"}  # the push token is refreshed

    async def test_second_device_fires_no_event_and_last_unregister_uninstalls(self, env: Env) -> None:
        assert (await register(env, "dev1", "SER1")).status_code == 201
        r = await register(env, "watch1", "SER1")
        assert r.status_code == 201
        assert r.json()["event_id"] is None
        assert len(await mailbox(env, "SER1")) == 1

        r = await unregister(env, "dev1", "SER1")
        assert r.status_code == 200
        assert r.json() == {"status": "unregistered", "event_id": None}  # watch1 still holds it
        r = await unregister(env, "watch1", "SER1")
        assert r.status_code == 200
        uninstall_id = r.json()["event_id"]
        kinds = [(e.kind, e.device_id, e.event_id) for e in await mailbox(env, "SER1")]
        assert [k[:2] for k in kinds] == [("installed", "dev1"), ("uninstalled", "watch1")]
        assert kinds[1][2] == uninstall_id
        assert await env.redis.exists(account_keys("acme").apple_regs(PTID, "SER1")) == 0

    async def test_fired_events_are_counted_like_every_source(self, env: Env) -> None:
        """An install and an uninstall count in /metrics' ingested total and in the report (the save rate's
        installs come from here); a second device and a repeated call, which fire nothing, count nothing."""

        async def apple_ingested() -> float:
            text = (await env.http.get("/metrics")).text
            labels = {"account": "acme", "source": "apple"}
            return sum(
                s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
                if s.name == "passbridge_ingested_events_total" and s.labels == labels
            )

        before = await apple_ingested()  # the counters are the process's, shared with earlier tests
        assert (await register(env, "dev1", "SER1")).status_code == 201
        assert (await register(env, "watch1", "SER1")).status_code == 201
        assert (await register(env, "dev1", "SER1")).status_code == 200
        assert (await unregister(env, "watch1", "SER1")).status_code == 200
        assert (await unregister(env, "dev1", "SER1")).status_code == 200
        assert (await unregister(env, "dev1", "SER1")).status_code == 200
        assert await apple_ingested() - before == 2
        await metrics.RECORDER.flush(env.redis)
        now_ms = int(time.time() * 1000)
        rows = await report_rows(env.redis, "acme", now_ms - 3_600_000, now_ms + 3_600_000)
        assert [(r.kind, r.platform, r.pass_type, r.count) for r in rows] == [
            ("installed", "apple", "ptk_0x216", 1),
            ("uninstalled", "apple", "ptk_0x216", 1),
        ]

    async def test_unregistering_an_unknown_device_is_200_and_fires_nothing(self, env: Env) -> None:
        r = await unregister(env, "ghost", "SER1")
        assert r.status_code == 200
        assert r.json() == {"status": "not_registered", "event_id": None}
        assert await mailbox(env, "SER1") == []

    async def test_a_pass_takes_at_most_its_device_bound(self, env: Env) -> None:
        # The pass's token is in the pass file: whoever holds it must not be able to register device ids
        # (a hash field and a key each, kept until unregistered) without end.
        for n in range(MAX_DEVICES_PER_PASS):
            assert (await register(env, f"dev{n}", "SER1")).status_code in (200, 201)
        r = await register(env, "one-too-many", "SER1")
        assert r.status_code == 409
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["errors"][0]["field"] == "deviceLibraryIdentifier"
        keys = account_keys("acme")
        assert await env.redis.hlen(keys.apple_regs(PTID, "SER1")) == MAX_DEVICES_PER_PASS
        assert not await env.redis.exists(keys.apple_device("one-too-many", PTID))
        # A registered device still refreshes its push token, and a freed place can be taken again.
        assert (await register(env, "dev0", "SER1")).status_code == 200
        assert (await unregister(env, "dev1", "SER1")).status_code == 200
        assert (await register(env, "one-too-many", "SER1")).status_code == 201
        assert len(await mailbox(env, "SER1")) == 1  # the pass's one installed event

    async def test_reinstall_gets_new_event_ids(self, env: Env) -> None:
        first_install = (await register(env, "dev1", "SER1")).json()["event_id"]
        first_uninstall = (await unregister(env, "dev1", "SER1")).json()["event_id"]
        second_install = (await register(env, "dev1", "SER1")).json()["event_id"]
        second_uninstall = (await unregister(env, "dev1", "SER1")).json()["event_id"]
        ids = [first_install, first_uninstall, second_install, second_uninstall]
        assert len(set(ids)) == 4, ids
        assert first_install.endswith(":1")
        assert second_install.endswith(":2")
        assert [e.event_id for e in await mailbox(env, "SER1")] == ids
        assert int(await env.redis.get(account_keys("acme").depth)) == 4

    async def test_event_ids_are_deterministic(self, env: Env) -> None:
        """The same pass and generation give the same id in any process (a retry can never double-fire)."""
        first = (await register(env, "dev1", "SER1")).json()["event_id"]
        await env.redis.delete(account_keys("acme").apple_regs(PTID, "SER1"))
        await env.redis.set(account_keys("acme").apple_gen(PTID, "SER1"), 0)
        again = await register(env, "dev1", "SER1")
        assert again.json()["event_id"] == first
        assert len(await mailbox(env, "SER1")) == 1  # deduplicated, not enqueued twice

    @pytest.mark.parametrize(
        "headers",
        [
            {},
            {"Authorization": "ApplePass wrong-token-0123456789"},
            {"Authorization": "Bearer " + pass_token("apple-secret-acme", PTID, "SER1")},
            # the token of another pass of the same account
            {"Authorization": "ApplePass " + pass_token("apple-secret-acme", PTID, "SER2")},
        ],
    )
    async def test_wrong_token_is_401_and_writes_nothing(self, env: Env, headers: dict[str, str]) -> None:
        r = await env.http.post(reg_url("dev1", "SER1"), json={"pushToken": "t"}, headers=headers)
        assert r.status_code == 401
        assert r.headers["content-type"] == "application/problem+json"
        r = await env.http.delete(reg_url("dev1", "SER1"), headers=headers)
        assert r.status_code == 401
        assert await env.redis.keys("pb:a:acme:apple*") == []
        assert await mailbox(env, "SER1") == []

    async def test_unknown_pass_type_is_401(self, env: Env) -> None:
        r = await env.http.post(
            reg_url("dev1", "SER1", ptid="pass.com.other.card"),
            json={"pushToken": "t"},
            headers=apple_auth("SER1", ptid="pass.com.other.card"),
        )
        assert r.status_code == 401

    async def test_unknown_account_is_404(self, env: Env) -> None:
        r = await env.http.post(
            reg_url("dev1", "SER1", account="nobody"), json={"pushToken": "t"}, headers=apple_auth("SER1")
        )
        assert r.status_code == 404

    async def test_missing_push_token_is_422(self, env: Env) -> None:
        r = await env.http.post(reg_url("dev1", "SER1"), json={}, headers=apple_auth("SER1"))
        assert r.status_code == 422
        assert r.json()["errors"][0]["pointer"] == "/pushToken"
        r = await env.http.post(reg_url("dev1", "SER1"), content=b"{no", headers=apple_auth("SER1"))
        assert r.status_code == 400

    @pytest.mark.parametrize("device_id", ["dev:1", "dev1%0A"])  # %0A: a final newline is no exception
    async def test_bad_device_id_is_422(self, env: Env, device_id: str) -> None:
        r = await env.http.post(
            reg_url(device_id, "SER1"), json={"pushToken": "t"}, headers=apple_auth("SER1")
        )
        assert r.status_code == 422
        assert r.json()["errors"][0]["field"] == "deviceLibraryIdentifier"
        assert await env.redis.hlen(account_keys("acme").apple_regs(PTID, "SER1")) == 0

    async def test_serial_with_slash_and_spaces(self, env: Env) -> None:
        serial = "A/B C"
        url = f"/apple/acme/v1/devices/dev1/registrations/{PTID}/A%2FB%20C"
        r = await env.http.post(url, json={"pushToken": "t"}, headers=apple_auth(serial))
        assert r.status_code == 201, r.text
        assert [e.serial_number for e in await mailbox(env, serial)] == [serial]

    async def test_unsynced_pass_type_registers_without_event(self, env: Env) -> None:
        await env.update_account(sync_pass_types=["ptk_other"])
        r = await register(env, "dev1", "SER1")
        assert r.status_code == 201
        assert r.json()["event_id"] is None
        assert await mailbox(env, "SER1") == []
        assert await env.redis.hlen(account_keys("acme").apple_regs(PTID, "SER1")) == 1

    async def test_unsynced_pass_types_events_are_counted_as_skipped(self, env: Env) -> None:
        """The installed/uninstalled an unsynced pass type would have fired counts in the account's skipped
        counters, as a webhook or an NDJSON line of that pass type does; calls that would fire nothing (a second
        device, a repeat, an unknown device) count nothing."""
        await env.update_account(sync_pass_types=["ptk_other"])
        stats = account_keys("acme").stats

        async def skipped() -> tuple[bytes | None, bytes | None]:
            return await env.redis.hget(stats, "skipped"), await env.redis.hget(stats, "skipped:ptk_0x216")

        assert (await register(env, "dev1", "SER1")).status_code == 201
        assert await skipped() == (b"1", b"1")
        assert (await register(env, "watch1", "SER1")).status_code == 201
        assert (await register(env, "dev1", "SER1")).status_code == 200
        assert (await unregister(env, "watch1", "SER1")).status_code == 200
        assert (await unregister(env, "ghost", "SER1")).status_code == 200
        assert await skipped() == (b"1", b"1")
        assert (await unregister(env, "dev1", "SER1")).status_code == 200  # the last device: uninstalled
        assert await skipped() == (b"2", b"2")
        assert (await unregister(env, "dev1", "SER1")).status_code == 200
        assert await skipped() == (b"2", b"2")
        assert await mailbox(env, "SER1") == []


class TestDeviceQueries:
    """The device's list of passes and the log endpoint."""

    async def test_registrations_list_and_updated_since(self, env: Env) -> None:
        url = f"{BASE}/devices/dev1/registrations/{PTID}"
        assert (await env.http.get(url)).status_code == 204
        await register(env, "dev1", "SER1")
        await register(env, "dev1", "SER2")
        await register(env, "dev2", "SER3")
        r = await env.http.get(url)
        assert r.status_code == 200
        doc = r.json()
        assert sorted(doc["serialNumbers"]) == ["SER1", "SER2"]
        tag = doc["lastUpdated"]
        assert tag.isdigit()
        assert (await env.http.get(url, params={"passesUpdatedSince": tag})).status_code == 204
        await register(env, "dev1", "SER4")
        r = await env.http.get(url, params={"passesUpdatedSince": tag})
        assert r.json()["serialNumbers"] == ["SER4"]
        await unregister(env, "dev1", "SER4")
        assert (await env.http.get(url, params={"passesUpdatedSince": tag})).status_code == 204
        # An unreadable tag counts as absent (every serial), also one of digits int() refuses: never a 500.
        for unreadable in ("\u00b2", "12a", ""):
            r = await env.http.get(url, params={"passesUpdatedSince": unreadable})
            assert sorted(r.json()["serialNumbers"]) == ["SER1", "SER2"], unreadable

    async def test_registrations_list_of_unknown_pass_type_is_404(self, env: Env) -> None:
        r = await env.http.get(f"{BASE}/devices/dev1/registrations/pass.com.other")
        assert r.status_code == 404

    async def test_log_endpoint(self, env: Env) -> None:
        r = await env.http.post(f"{BASE}/log", json={"logs": ["Web service error for pass.com.acme: 500"]})
        assert r.status_code == 200
        assert r.json() == {"logged": 1}
        r = await env.http.post(f"{BASE}/log", json={"logs": "nope"})
        assert r.status_code == 422
