"""A realistic day of pass events, as deliveries from all four sources, with what they must produce.

Pure and seeded: :func:`build_scenario` returns the deliveries in the order a player sends them (each pass's
deliveries in its own order, passes interleaved by the player) and the expectations the verification checks.

Per pass: ``created`` (a signed webhook, or a line of the NDJSON backfill for passes issued before the day),
``installed`` (an Apple register — sometimes from a second device too, which must not fire again — or a Google
``save`` callback), 0–3 ``updated`` webhooks, sometimes ``uninstalled`` (Apple unregister of every device or a
Google ``del``) and sometimes ``deleted``. Mixed in: redeliveries (same webhook-id or Google nonce), late
``updated`` webhooks carrying an old timestamp (stale: a metric event, no state change), webhooks with a bad
signature or an invalid payload, forged Google callbacks, and invalid NDJSON lines.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

STATUS_AFTER = {
    "created": "active",
    "installed": "active",
    "updated": "active",
    "uninstalled": "uninstalled",
    "deleted": "deleted",
}


@dataclass(frozen=True)
class DemoAccount:
    """A demo merchant: its id, the pass types it issues on each platform and its Klaviyo key."""

    account_id: str
    klaviyo_api_key: str = field(repr=False)  # a real private key in the real-Klaviyo mode: never in a repr
    apple_pass_type_id: str
    google_class_id: str
    google_issuer_id: str
    pass_type: str


@dataclass
class Delivery:
    """One thing the player sends.

    ``kind`` selects the source; ``expect`` is what the producer must answer: ``accepted`` (a new event),
    ``duplicate``, ``no_event`` (accepted, but fires nothing: a second Apple device), or a rejection reason
    (``bad_signature``, ``invalid``, ``forged``).
    """

    account_id: str
    serial: str
    kind: Literal["webhook", "apple_register", "apple_unregister", "google"]
    expect: str
    event_kind: str | None = None  # the lifecycle step it carries
    msg_id: str | None = None  # webhook-id or Google nonce (redeliveries reuse it)
    body: dict[str, Any] | None = None  # webhook payload (timestamp filled in by the player unless stale)
    stale_of: int | None = None  # for late webhooks: seconds after the pass's creation the timestamp claims
    device: str | None = None
    google_event: str | None = None  # save | del
    tamper: bool = False  # bad signature / forged Google message


@dataclass
class PassPlan:
    """One pass's expected outcome."""

    account_id: str
    serial: str
    platform: str
    email: str
    phone: str
    events: list[str] = field(default_factory=list)  # accepted lifecycle events, in occurrence order
    stale: int = 0  # accepted late events that must not change state

    @property
    def final_status(self) -> str:
        status = "active"
        for kind in self.events:
            if status == "deleted":
                break
            status = STATUS_AFTER[kind]
        return status


@dataclass
class Scenario:
    """Everything the demo sends and what it must find in Klaviyo afterwards."""

    accounts: list[DemoAccount]
    backfill: dict[str, list[dict[str, Any]]]  # account id → NDJSON items (some invalid)
    backfill_invalid: dict[str, int]
    lanes: list[list[Delivery]]  # each pass's deliveries, in order; the player interleaves passes
    passes: dict[tuple[str, str], PassPlan]

    @property
    def expected_events(self) -> int:
        """Metric events Klaviyo must end up with: one per accepted event, stale ones included."""
        return sum(len(p.events) + p.stale for p in self.passes.values())

    def expected_answers(self) -> Counter[str]:
        c: Counter[str] = Counter(d.expect for lane in self.lanes for d in lane)
        c["accepted"] += sum(len(v) for v in self.backfill.values()) - sum(self.backfill_invalid.values())
        c["invalid"] += sum(self.backfill_invalid.values())
        return c

    @property
    def deliveries(self) -> int:
        return sum(len(lane) for lane in self.lanes) + sum(len(v) for v in self.backfill.values())


def demo_accounts(n: int = 3, klaviyo_api_keys: list[str] | None = None) -> list[DemoAccount]:
    """``n`` demo merchants with distinct pass types; their Klaviyo keys are the sandbox's made-up ones, or
    ``klaviyo_api_keys`` handed out in turn (one real key may serve them all)."""
    names = ["acme-coffee", "globex-fitness", "initech-cinemas", "umbrella-air", "hooli-market"]
    return [
        DemoAccount(
            account_id=names[i % len(names)] + ("" if i < len(names) else f"-{i}"),
            klaviyo_api_key=klaviyo_api_keys[i % len(klaviyo_api_keys)]
            if klaviyo_api_keys
            else f"pk_demo_{i}_{'x' * 24}",
            apple_pass_type_id=f"pass.com.{names[i % len(names)].replace('-', '')}.loyalty",
            google_class_id=f"338800000002270{i:04d}.loyalty",
            google_issuer_id=f"338800000002270{i:04d}",
            pass_type=f"ptk_0x2{i:02x}",
        )
        for i in range(n)
    ]


def build_scenario(
    n_passes: int = 5000,
    *,
    accounts: int = 3,
    seed: int = 7,
    tag: str = "",
    klaviyo_api_keys: list[str] | None = None,
) -> Scenario:
    """About four accepted events per pass plus redeliveries and invalid items (20,000+ for 5,000 passes).

    ``tag`` makes every identity (serial, email, phone) unique to one run while the shape of the day stays
    that of ``seed``: a real Klaviyo account keeps the profiles of earlier runs, which must not be matched.
    """
    rng = random.Random(seed)
    # Phones come from their own generator so that a tag changes them without changing the day's shape.
    phones = random.Random(f"{seed}:{tag}")
    accts = demo_accounts(accounts, klaviyo_api_keys)
    lanes: list[list[Delivery]] = []
    passes: dict[tuple[str, str], PassPlan] = {}
    backfill: dict[str, list[dict[str, Any]]] = {a.account_id: [] for a in accts}
    backfill_invalid = dict.fromkeys(backfill, 0)
    shared_emails: dict[str, str] = {}
    msg = 0

    def next_id(prefix: str) -> str:
        nonlocal msg
        msg += 1
        return f"{prefix}_{seed}_{msg:07d}"

    for n in range(n_passes):
        acct = accts[n % len(accts)]
        serial = f"{tag}{rng.getrandbits(72):018x}"
        platform = "apple" if rng.random() < 0.55 else "google"
        email = f"holder{n}{'.' + tag if tag else ''}@example.com"
        # A few customers hold two passes of one merchant: the second pass's email belongs to another profile.
        if n >= len(accts) * 10 and rng.random() < 0.01:
            email = shared_emails.get(acct.account_id, email)
        shared_emails.setdefault(acct.account_id, email)
        phone = f"+1415{phones.randrange(2000000, 9999999):07d}"
        plan = PassPlan(acct.account_id, serial, platform, email, phone)
        passes[(acct.account_id, serial)] = plan
        fields = {
            "points": rng.randrange(0, 5000),
            "tier": rng.choice(["bronze", "silver", "gold"]),
            "member_since": f"20{rng.randrange(18, 26)}-0{rng.randrange(1, 10)}-1{rng.randrange(0, 10)}",
            "store": f"ST-{rng.randrange(1, 40):02d}",
            "opt_in": rng.random() < 0.7,
        }
        data = {
            "serialNumber": serial,
            "passType": acct.pass_type,
            "platform": platform,
            "customer": {"email": email, "phone": phone},
            "fields": fields,
        }
        lane: list[Delivery] = []

        def webhook(
            kind: str,
            expect: str = "accepted",
            *,
            data: dict[str, Any] = data,
            fields: dict[str, Any] = fields,
            acct: DemoAccount = acct,
            serial: str = serial,
            **kw: Any,
        ) -> Delivery:
            body = {
                "type": f"pass.{kind}",
                "data": {**data, "fields": {**fields, "points": rng.randrange(5000)}},
            }
            return Delivery(acct.account_id, serial, "webhook", expect, kind, next_id("msg"), body, **kw)

        if rng.random() < 0.2:  # issued before today: arrives in the NDJSON backfill
            backfill[acct.account_id].append(
                {
                    "event_id": next_id("bf"),
                    "kind": "created",
                    "serial_number": serial,
                    "pass_type": acct.pass_type,
                    "platform": platform,
                    "occurred_at": f"2026-11-{rng.randrange(1, 20):02d}T09:00:00Z",
                    "email": email,
                    "phone_number": phone,
                    "properties": fields,
                }
            )
        else:
            lane.append(webhook("created"))
        plan.events.append("created")
        if rng.random() < 0.01:  # a sender bug: unsigned or mis-signed webhook
            lane.append(webhook("updated", "bad_signature", tamper=True))
        if rng.random() < 0.01:  # an invalid payload: rejected with 422, nothing enqueued
            bad = webhook("updated", "invalid")
            assert bad.body is not None
            bad.body["data"] = {**bad.body["data"], "customer": {"email": "not-an-email"}}
            lane.append(bad)

        installed = rng.random() < 0.85
        devices: list[str] = []
        if installed:
            if platform == "apple":
                devices = [f"dev{rng.getrandbits(64):016x}" for _ in range(2 if rng.random() < 0.15 else 1)]
                lane.append(
                    Delivery(
                        acct.account_id, serial, "apple_register", "accepted", "installed", device=devices[0]
                    )
                )
                for d in devices[1:]:
                    lane.append(Delivery(acct.account_id, serial, "apple_register", "no_event", device=d))
            else:
                nonce = next_id("nonce")
                lane.append(
                    Delivery(
                        acct.account_id, serial, "google", "accepted", "installed", nonce, google_event="save"
                    )
                )
                if rng.random() < 0.05:  # Google redelivers
                    lane.append(
                        Delivery(
                            acct.account_id,
                            serial,
                            "google",
                            "duplicate",
                            "installed",
                            nonce,
                            google_event="save",
                        )
                    )
                if rng.random() < 0.01:
                    lane.append(
                        Delivery(
                            acct.account_id,
                            serial,
                            "google",
                            "forged",
                            "installed",
                            next_id("nonce"),
                            google_event="save",
                            tamper=True,
                        )
                    )
            plan.events.append("installed")

        for _ in range(rng.choice([0, 1, 1, 2, 2, 3, 4])):
            upd = webhook("updated")
            lane.append(upd)
            plan.events.append("updated")
            if rng.random() < 0.05:  # the platform redelivers the same webhook
                lane.append(
                    Delivery(upd.account_id, serial, "webhook", "duplicate", "updated", upd.msg_id, upd.body)
                )

        if installed and rng.random() < 0.3:
            if platform == "apple":
                for i, d in enumerate(reversed(devices)):
                    last = i == len(devices) - 1
                    lane.append(
                        Delivery(
                            acct.account_id,
                            serial,
                            "apple_unregister",
                            "accepted" if last else "no_event",
                            "uninstalled" if last else None,
                            device=d,
                        )
                    )
            else:
                lane.append(
                    Delivery(
                        acct.account_id,
                        serial,
                        "google",
                        "accepted",
                        "uninstalled",
                        next_id("nonce"),
                        google_event="del",
                    )
                )
            plan.events.append("uninstalled")

        if rng.random() < 0.03:  # a late webhook: claims to have happened just after creation
            lane.append(webhook("updated", stale_of=1))
            plan.stale += 1
        if rng.random() < 0.1:
            lane.append(webhook("deleted"))
            plan.events.append("deleted")
        if lane:
            lanes.append(lane)

    for acct_id, items in backfill.items():
        for i in range(0, len(items), 97):  # about 1 % invalid lines
            bad_line = dict(items[i])
            bad_line["event_id"] = f"bad_line-{acct_id}-{i}"
            bad_line["email"] = "broken@"
            items.insert(i + 1, bad_line)
            backfill_invalid[acct_id] += 1
    return Scenario(accts, backfill, backfill_invalid, lanes, passes)
