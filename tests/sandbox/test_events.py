"""Events: 202 with an empty body, dedup rules, profile resolution, field rules, bulk create, reads in time
order, metrics."""

from __future__ import annotations

from typing import Any

import httpx

from klaviyo_sandbox.client import SandboxClient
from klaviyo_sandbox.testing import SandboxServer
from tests.sandbox import payloads
from tests.sandbox.conftest import assert_klaviyo_error, check_response


def _events(sandbox: SandboxClient, external_id: str = "serial-1") -> list[dict[str, Any]]:
    profile = sandbox.profile(external_id)
    assert profile is not None
    return sandbox.events(profile["id"])


def test_without_unique_id_same_profile_metric_and_second_collide(
    api: httpx.Client, sandbox: SandboxClient
) -> None:
    t1 = "2026-07-01T12:00:00.100000+00:00"
    t2 = "2026-07-01T12:00:00.900000+00:00"
    t3 = "2026-07-01T12:00:01+00:00"
    for t in (t1, t2, t3):
        assert api.post("/api/events", json=payloads.event(time=t)).status_code == 202
    api.post("/api/events", json=payloads.event("Pass Updated", time=t1))
    seen = sorted((e["attributes"]["timestamp"] % 60, e["metric_name"]) for e in _events(sandbox))
    assert seen == [(0, "Pass Installed"), (0, "Pass Updated"), (1, "Pass Installed")]


def test_unique_id_dedup_is_per_profile_and_metric(
    api: httpx.Client, sandbox: SandboxClient, sandbox_server: SandboxServer
) -> None:
    api.post("/api/events", json=payloads.event("Pass Installed", unique_id="u"))
    api.post("/api/events", json=payloads.event("Pass Installed", unique_id="u", time="2026-07-02T00:00:00Z"))
    api.post("/api/events", json=payloads.event("Pass Updated", unique_id="u"))
    api.post("/api/events", json=payloads.event("Pass Installed", unique_id="u", external_id="serial-2"))
    assert len(_events(sandbox)) == 2
    assert len(_events(sandbox, "serial-2")) == 1
    # The accepted duplicate is counted (for tests that check duplicate sends).
    assert sandbox_server.app.runtime.states["main"].duplicate_events == 1


def test_event_profile_attributes_create_and_update_the_profile(
    api: httpx.Client, sandbox: SandboxClient
) -> None:
    api.post(
        "/api/events", json=payloads.event(external_id="serial-1", first_name="Ada", email="ada@example.com")
    )
    profile = sandbox.profile("serial-1")
    assert profile is not None
    assert profile["attributes"]["first_name"] == "Ada"
    assert profile["attributes"]["email"] == "ada@example.com"
    api.post("/api/events", json=payloads.event(email="ada@example.com", last_name="L"))
    assert len(sandbox.profiles()) == 1
    assert sandbox.profiles()[0]["attributes"]["last_name"] == "L"


def test_event_field_rules(api: httpx.Client) -> None:
    no_id = payloads.event()
    no_id["data"]["attributes"]["profile"]["data"]["attributes"] = {"first_name": "x"}
    assert_klaviyo_error(
        api.post("/api/events", json=no_id), 400, "invalid", "/data/attributes/profile/data/attributes"
    )
    bad_phone = payloads.event(external_id="s", phone_number="12")
    assert_klaviyo_error(
        api.post("/api/events", json=bad_phone),
        400,
        "invalid",
        "/data/attributes/profile/data/attributes/phone_number",
    )
    old = payloads.event(time="1989-12-31T23:59:59+00:00")
    assert_klaviyo_error(api.post("/api/events", json=old), 400, "invalid", "/data/attributes/time")
    future = payloads.event(time="2099-01-01T00:00:00+00:00")
    assert_klaviyo_error(api.post("/api/events", json=future), 400, "invalid", "/data/attributes/time")
    no_tz = payloads.event(time="2026-07-01 12:00")
    assert_klaviyo_error(api.post("/api/events", json=no_tz), 400, "invalid", "/data/attributes/time")
    long_name = payloads.event("x" * 128)
    assert_klaviyo_error(
        api.post("/api/events", json=long_name),
        400,
        "invalid",
        "/data/attributes/metric/data/attributes/name",
    )
    many = payloads.event(properties={f"k{i}": i for i in range(401)})
    assert_klaviyo_error(api.post("/api/events", json=many), 400, "invalid", "/data/attributes/properties")


def _bulk(entries: list[tuple[dict[str, Any], list[dict[str, Any]]]]) -> dict[str, Any]:
    return {
        "data": {
            "type": "event-bulk-create-job",
            "attributes": {
                "events-bulk-create": {
                    "data": [
                        {
                            "type": "event-bulk-create",
                            "attributes": {
                                "profile": {"data": {"type": "profile", "attributes": profile}},
                                "events": {"data": [{"type": "event", "attributes": e} for e in events]},
                            },
                        }
                        for profile, events in entries
                    ]
                }
            },
        }
    }


def _ev(
    unique_id: str, metric: str = "Pass Updated", time: str = "2026-07-01T12:00:00+00:00"
) -> dict[str, Any]:
    return {
        "properties": {"n": unique_id},
        "time": time,
        "unique_id": unique_id,
        "metric": {"data": {"type": "metric", "attributes": {"name": metric}}},
    }


def test_bulk_create_events(api: httpx.Client, sandbox: SandboxClient) -> None:
    body = _bulk(
        [({"external_id": "serial-1"}, [_ev("a"), _ev("b")]), ({"external_id": "serial-2"}, [_ev("a")])]
    )
    response = api.post("/api/event-bulk-create-jobs", json=body)
    assert response.status_code == 202
    check_response("bulk_create_events", response)
    sandbox.wait_idle()  # a bulk job is applied in the background, as on Klaviyo
    assert len(_events(sandbox)) == 2
    assert len(_events(sandbox, "serial-2")) == 1


def test_backfill_is_recorded_and_shown_by_the_inspection_api(
    api: httpx.Client, sandbox: SandboxClient
) -> None:
    live = payloads.event(unique_id="live")
    old = payloads.event(unique_id="old")
    old["data"]["attributes"]["backfill"] = True
    for body in (live, old):
        assert api.post("/api/events", json=body).status_code == 202
    bulk = _bulk([({"external_id": "serial-2"}, [_ev("bulk-live"), {**_ev("bulk-old"), "backfill": True}])])
    assert api.post("/api/event-bulk-create-jobs", json=bulk).status_code == 202
    sandbox.wait_idle()
    seen = {e["attributes"]["event_properties"]["$event_id"]: e["backfill"] for e in sandbox.all_events()}
    assert seen == {"live": False, "old": True, "bulk-live": False, "bulk-old": True}


def test_bulk_with_a_repeated_key_fails_whole_request(api: httpx.Client, sandbox: SandboxClient) -> None:
    body = _bulk(
        [({"external_id": "serial-1"}, [_ev("a")]), ({"external_id": "serial-2"}, [_ev("x"), _ev("x")])]
    )
    error = assert_klaviyo_error(api.post("/api/event-bulk-create-jobs", json=body), 400, "invalid")
    assert "repeated" in error["detail"]
    assert sandbox.profiles() == []
    # The same unique_id under another metric or profile is fine.
    ok = _bulk(
        [
            ({"external_id": "serial-1"}, [_ev("x"), _ev("x", "Pass Installed")]),
            ({"external_id": "serial-2"}, [_ev("x")]),
        ]
    )
    assert api.post("/api/event-bulk-create-jobs", json=ok).status_code == 202


def test_bulk_is_capped_at_1000_events(api: httpx.Client) -> None:
    body = _bulk([({"external_id": f"s{i}"}, [_ev(f"{i}-{j}") for j in range(100)]) for i in range(11)])
    error = assert_klaviyo_error(api.post("/api/event-bulk-create-jobs", json=body), 400, "invalid")
    assert "1000" in error["detail"]


def test_get_events_in_time_order_with_filters_and_paging(api: httpx.Client, sandbox: SandboxClient) -> None:
    for minute in (5, 1, 3, 2, 4):
        api.post(
            "/api/events", json=payloads.event(unique_id=f"m{minute}", time=f"2026-07-01T12:0{minute}:00Z")
        )
    api.post("/api/events", json=payloads.event(external_id="other"))
    profile = sandbox.profile("serial-1")
    assert profile is not None
    flt = f'equals(profile_id,"{profile["id"]}")'
    body = check_response("get_events", api.get("/api/events", params={"filter": flt, "sort": "datetime"}))
    assert [e["attributes"]["event_properties"]["$event_id"] for e in body["data"]] == [
        "m1",
        "m2",
        "m3",
        "m4",
        "m5",
    ]
    desc = api.get("/api/events", params={"filter": flt, "sort": "-timestamp", "page[size]": "2"}).json()
    assert [e["attributes"]["event_properties"]["$event_id"] for e in desc["data"]] == ["m5", "m4"]
    rest = check_response("get_events", api.get(desc["links"]["next"]))
    assert [e["attributes"]["event_properties"]["$event_id"] for e in rest["data"]] == ["m3", "m2"]
    since = api.get(
        "/api/events", params={"filter": f"{flt},greater-or-equal(datetime,2026-07-01T12:04:00Z)"}
    ).json()
    assert len(since["data"]) == 2
    event_id = body["data"][0]["id"]
    assert len(event_id) == 11
    check_response("get_event", api.get(f"/api/events/{event_id}"))
    assert_klaviyo_error(api.get("/api/events/NOPE0000000"), 404, "not_found")
    assert_klaviyo_error(api.get("/api/events", params={"filter": 'equals(email,"x")'}), 400, "invalid")


def test_metrics(api: httpx.Client) -> None:
    api.post("/api/events", json=payloads.event("Pass Installed"))
    api.post("/api/events", json=payloads.event("Pass Deleted"))
    body = check_response("get_metrics", api.get("/api/metrics"))
    names = {m["attributes"]["name"]: m["id"] for m in body["data"]}
    assert set(names) == {"Pass Installed", "Pass Deleted"}
    assert all(len(i) == 6 for i in names.values())
    one = check_response("get_metric", api.get(f"/api/metrics/{names['Pass Deleted']}"))
    assert one["data"]["attributes"]["name"] == "Pass Deleted"
    assert_klaviyo_error(api.get("/api/metrics/XXXXXX"), 404, "not_found")
