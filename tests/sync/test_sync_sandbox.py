"""Syncer.sync_event against the sandbox: what each lifecycle event leaves in Klaviyo, read back through the
sandbox's inspection API; stale events; shuffled orders; identity conflicts; redelivery; no set-up."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from passbridge.accounts import Account
from passbridge.event import EventKind, PassEvent, Platform
from tests.sync.conftest import RequestRecorder
from worker.klaviyo.client import KlaviyoClient
from worker.klaviyo.errors import NotProvisionedError, TransientError
from worker.plan import METRIC_NAMES
from worker.setup import load_provisioned, provision
from worker.state import PassState
from worker.sync import PartialSync, Syncer, SyncResult

T0 = datetime(2026, 11, 25, 10, 0, tzinfo=UTC)


def pass_event(
    serial: str,
    n: int,
    kind: EventKind,
    minute: float,
    *,
    email: str | None = "ada@example.com",
    phone: str | None = "+14155550123",
    props: dict[str, Any] | None = None,
    platform: Platform = Platform.apple,
) -> PassEvent:
    when = T0 + timedelta(minutes=minute)
    return PassEvent(
        event_id=f"{serial}-evt-{n}",
        account_id="acme",
        kind=kind,
        serial_number=serial,
        pass_type="ptk_0x216",
        platform=platform,
        occurred_at=when,
        received_at=when,
        source="api",
        email=email,
        phone_number=phone,
        pass_url=f"https://passninja.com/p/{serial}",
        properties={"points": 100, "tier": "gold"} if props is None else props,
    )


@pytest.fixture
async def ready(client: KlaviyoClient, redis: Redis, account: Account, sandbox: Any) -> Syncer:
    """The account provisioned; a Syncer on the recorded client."""
    await provision(client, redis, account)
    return Syncer(client, redis)


def klaviyo_view(sandbox: Any, serial: str) -> dict[str, Any]:
    """What Klaviyo holds for one pass: profile, its events in time order, the WalletPass record."""
    sandbox.wait_idle()
    profile = sandbox.profile(serial)
    events = sandbox.events(profile["id"]) if profile else []
    records = [
        r for r in sandbox.object_records(object_type="WalletPass") if r["id"].endswith(f":::{serial}")
    ]
    return {
        "profile": {
            k: profile["attributes"][k] for k in ("external_id", "email", "phone_number", "properties")
        }
        if profile
        else None,
        "events": [
            (e["metric_name"], e["attributes"]["datetime"], e["attributes"]["event_properties"])
            for e in events
        ],
        "record": records[0]["attributes"]["record_properties"] if records else None,
        "record_profile": (
            next(iter(records[0]["relationships"].values()))["profile_id"] if records else None
        ),
        "profile_id": profile["id"] if profile else None,
    }


def expected_event_properties(e: PassEvent) -> dict[str, Any]:
    return {
        **e.properties,
        "serial_number": e.serial_number,
        "pass_type": e.pass_type,
        "platform": e.platform.value,
        "pass_url": e.pass_url,
        "$event_id": e.event_id,
    }


async def test_each_lifecycle_event_writes_exactly_this(
    ready: Syncer, account: Account, sandbox: Any
) -> None:
    serial = "838b8cf60dac2bfad9"
    steps = [
        (EventKind.created, 0, {"points": 0, "tier": "silver"}, "active"),
        (EventKind.installed, 1, {"points": 0, "tier": "silver"}, "active"),
        (EventKind.updated, 2, {"points": 120, "tier": "gold"}, "active"),
        (EventKind.uninstalled, 3, {"points": 120, "tier": "gold"}, "uninstalled"),
        (EventKind.deleted, 4, {"points": 120, "tier": "gold"}, "deleted"),
    ]
    state: PassState | None = None
    seen_events: list[tuple[str, str, dict[str, Any]]] = []
    for n, (kind, minute, props, status) in enumerate(steps):
        e = pass_event(serial, n, kind, minute, props=props)
        result = await ready.sync_event(account, state, e)
        assert isinstance(result, SyncResult)
        assert result.state is not None
        state = result.state
        view = klaviyo_view(sandbox, serial)
        assert view["profile"] == {
            "external_id": serial,
            "email": "ada@example.com",
            "phone_number": "+14155550123",
            "properties": {
                **props,
                "wallet_pass_status": status,
                "wallet_pass_platform": "apple",
                "wallet_pass_type": "ptk_0x216",
                "wallet_pass_url": f"https://passninja.com/p/{serial}",
            },
        }
        seen_events.append((METRIC_NAMES[kind], e.occurred_at.isoformat(), expected_event_properties(e)))
        assert view["events"] == seen_events
        assert view["record"] == {
            "serial_number": serial,
            "pass_url": f"https://passninja.com/p/{serial}",
            "pass_type": "ptk_0x216",
            "platform": "apple",
            "status": status,
            "created_at": "2026-11-25T10:00:00Z",
            "updated_at": e.occurred_at.isoformat().replace("+00:00", "Z"),
        }
        assert view["record_profile"] == view["profile_id"]
    assert [e[0] for e in seen_events] == [
        "Pass Created",
        "Pass Installed",
        "Pass Updated",
        "Pass Uninstalled",
        "Pass Deleted",
    ]


@pytest.mark.parametrize("kind", list(EventKind))
async def test_a_first_event_of_any_kind(
    ready: Syncer, account: Account, sandbox: Any, kind: EventKind
) -> None:
    e = pass_event("SOLO", 1, kind, 0, email=None, phone=None, props={})
    result = await ready.sync_event(account, None, e)
    view = klaviyo_view(sandbox, "SOLO")
    status = {"uninstalled": "uninstalled", "deleted": "deleted"}.get(kind.value, "active")
    assert result.state is not None
    assert result.state.status.value == status
    assert view["profile"]["email"] is None
    assert view["profile"]["properties"]["wallet_pass_status"] == status
    assert view["events"] == [(METRIC_NAMES[kind], "2026-11-25T10:00:00+00:00", expected_event_properties(e))]
    assert view["record"]["status"] == status


async def test_stale_event_sends_only_its_metric(
    ready: Syncer, account: Account, sandbox: Any, recorder: RequestRecorder
) -> None:
    installed = pass_event("S1", 1, EventKind.installed, 10)
    uninstalled = pass_event("S1", 2, EventKind.uninstalled, 20)
    s1 = (await ready.sync_event(account, None, installed)).state
    s2 = (await ready.sync_event(account, s1, uninstalled)).state
    before = klaviyo_view(sandbox, "S1")
    sent = len(recorder.api_requests())
    late = pass_event("S1", 3, EventKind.updated, 15, props={"points": 100, "tier": "gold"})
    result = await ready.sync_event(account, s2, late)
    assert result.state is None
    assert "stale" in result.notes[0]
    paths = [r.url.rsplit("/api/", 1)[1] for r in recorder.api_requests()[sent:]]
    assert paths == ["events"]  # no profile-import, no record job
    after = klaviyo_view(sandbox, "S1")
    assert after["profile"] == before["profile"]
    assert after["record"] == before["record"]
    assert after["record"]["status"] == "uninstalled"
    # The metric is there with its true time, in time order between the other two.
    assert [name for name, *_ in after["events"]] == ["Pass Installed", "Pass Updated", "Pass Uninstalled"]
    assert after["events"][1][1] == "2026-11-25T10:15:00+00:00"


async def test_stale_deletion_still_deletes(ready: Syncer, account: Account, sandbox: Any) -> None:
    s1 = (await ready.sync_event(account, None, pass_event("S2", 1, EventKind.installed, 10))).state
    result = await ready.sync_event(account, s1, pass_event("S2", 2, EventKind.deleted, 5))
    assert result.state is not None
    assert result.state.status.value == "deleted"
    view = klaviyo_view(sandbox, "S2")
    assert view["record"]["status"] == "deleted"
    assert view["profile"]["properties"]["wallet_pass_status"] == "deleted"
    after = await ready.sync_event(account, result.state, pass_event("S2", 3, EventKind.installed, 30))
    assert after.state is not None
    assert after.state.status.value == "deleted"
    assert klaviyo_view(sandbox, "S2")["record"]["status"] == "deleted"


async def test_redelivery_is_idempotent(ready: Syncer, account: Account, sandbox: Any) -> None:
    e = pass_event("S3", 1, EventKind.installed, 0)
    first = await ready.sync_event(account, None, e)
    view = klaviyo_view(sandbox, "S3")
    # The engine crashed before committing: the same event again, on the same (old) state.
    again = await ready.sync_event(account, None, e)
    assert again.state == first.state
    assert klaviyo_view(sandbox, "S3") == view
    assert len(view["events"]) == 1  # unique_id = event_id: Klaviyo kept one


async def test_shuffled_orders_end_where_sorted_order_ends(
    ready: Syncer, account: Account, sandbox: Any
) -> None:
    rnd = random.Random(20261125)
    kinds = list(EventKind)
    for trial in range(6):
        history = []
        for n in range(rnd.randint(2, 6)):
            kind = rnd.choice(kinds)
            props = {"points": rnd.randint(0, 500), "tier": rnd.choice(["silver", "gold"])}
            history.append((n, kind, n * 7 + rnd.random(), props, rnd.choice([False, True])))
        views = []
        for label, order in (("sorted", history), ("shuffled", rnd.sample(history, len(history)))):
            serial = f"T{trial}-{label}"
            state: PassState | None = None
            for n, kind, minute, props, has_email in order:
                # Each pass its own holder (one email per pass: no identity conflict between the two runs).
                email = f"{serial.lower()}@example.com" if has_email else None
                e = pass_event(serial, n, kind, minute, email=email, props=props, phone=None)
                result = await ready.sync_event(account, state, e)
                state = result.state or state
            view = klaviyo_view(sandbox, serial)
            views.append(view)
        a, b = views

        def neutral(v: Any) -> Any:  # the serial (and what derives from it) is the only intended difference
            return orjson.loads(orjson.dumps(v).replace(b"shuffled", b"X").replace(b"sorted", b"X"))

        assert neutral(a["record"]) == neutral(b["record"])
        assert neutral(a["profile"]) == neutral(b["profile"])
        assert neutral(a["events"]) == neutral(b["events"])
        assert a["record"]["status"] in ("active", "uninstalled", "deleted")


async def test_identity_conflict_is_written_around(ready: Syncer, account: Account, sandbox: Any) -> None:
    """Two passes, one holder: the second pass's email belongs to the first pass's profile."""
    first = await ready.sync_event(account, None, pass_event("P1", 1, EventKind.installed, 0, phone=None))
    e2 = pass_event("P2", 1, EventKind.installed, 1, phone="+14155550199")
    result = await ready.sync_event(account, None, e2)
    assert first.state is not None
    assert result.state is not None
    assert result.state.withheld == {"email": "ada@example.com"}
    assert any("identity conflict" in n and "email a***@example.com" in n for n in result.notes)
    p2 = klaviyo_view(sandbox, "P2")
    assert p2["profile"]["email"] is None
    assert p2["profile"]["phone_number"] == "+14155550199"  # the phone did not clash and was kept
    assert p2["profile"]["properties"]["wallet_pass_email"] == "ada@example.com"
    assert p2["record"]["status"] == "active"
    assert [name for name, *_ in p2["events"]] == ["Pass Installed"]
    assert klaviyo_view(sandbox, "P1")["profile"]["email"] == "ada@example.com"
    conflicts = sandbox.count("create_or_update_profile", 409)
    assert conflicts >= 1
    # The next event of P2 already knows: no new 409.
    later = await ready.sync_event(
        account,
        result.state,
        pass_event("P2", 2, EventKind.updated, 2, phone="+14155550199", props={"points": 7}),
    )
    assert later.state is not None
    assert later.state.withheld == {"email": "ada@example.com"}
    assert sandbox.count("create_or_update_profile", 409) == conflicts
    assert klaviyo_view(sandbox, "P2")["profile"]["properties"]["points"] == 7


async def test_both_identifiers_conflicting(ready: Syncer, account: Account, sandbox: Any) -> None:
    await ready.sync_event(
        account, None, pass_event("Q1", 1, EventKind.installed, 0, email="ada@example.com", phone=None)
    )
    await ready.sync_event(
        account, None, pass_event("Q2", 1, EventKind.installed, 0, email=None, phone="+14155550123")
    )
    result = await ready.sync_event(account, None, pass_event("Q3", 1, EventKind.installed, 1))
    assert result.state is not None
    assert result.state.withheld == {"email": "ada@example.com", "phone_number": "+14155550123"}
    q3 = klaviyo_view(sandbox, "Q3")
    assert (q3["profile"]["email"], q3["profile"]["phone_number"]) == (None, None)
    assert q3["profile"]["properties"]["wallet_pass_email"] == "ada@example.com"
    assert q3["profile"]["properties"]["wallet_pass_phone_number"] == "+14155550123"


async def test_not_set_up_account_is_refused_before_any_write(
    client: KlaviyoClient, redis: Redis, account: Account, sandbox: Any
) -> None:
    assert await load_provisioned(redis, "acme") is None
    syncer = Syncer(client, redis)
    with pytest.raises(NotProvisionedError) as info:
        await syncer.sync_event(account, None, pass_event("S9", 1, EventKind.created, 0))
    assert "passbridge klaviyo setup --account acme" in str(info.value)
    assert sandbox.requests()["total"] == 0


async def test_a_failed_write_raises_and_a_retry_completes(
    ready: Syncer, account: Account, sandbox: Any
) -> None:
    e = pass_event("S4", 1, EventKind.installed, 0)
    sandbox.set_faults(error_rates={503: 1.0}, operations=["create_event"])
    with pytest.raises(PartialSync) as partial:
        await ready.sync_event(account, None, e)
    # Only the metric event failed: the error says which state the profile and record writes carried.
    assert isinstance(partial.value.cause, TransientError)
    assert partial.value.state.status == "active"
    assert klaviyo_view(sandbox, "S4")["events"] == []
    sandbox.clear_faults()
    result = await ready.sync_event(account, None, e)
    assert result.state is not None
    view = klaviyo_view(sandbox, "S4")
    assert [name for name, *_ in view["events"]] == ["Pass Installed"]
    assert view["record"]["status"] == "active"
