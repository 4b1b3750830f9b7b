"""The canonical event's pure rules: normalization, limits, the wire form."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from pydantic import TypeAdapter, ValidationError

from passbridge.event import (
    EventIn,
    EventKind,
    FieldError,
    PassEvent,
    Platform,
    build_event,
    build_event_from,
    fast_event_in,
    fast_fields,
    normalize_email,
    normalize_phone,
    property_errors,
)
from tests.factories import event


def build(**over: object) -> PassEvent:
    item = EventIn.model_validate(event(1, **over))
    return build_event(
        item,
        account_id="acme",
        source="api",
        received_at=datetime(2026, 11, 25, tzinfo=UTC),
        default_region="US",
        pass_url_template="https://passninja.com/p/{serial_number}",
    )


class TestNormalization:
    """Emails and phones are normalized the same way on the fast and the slow path."""

    @pytest.mark.parametrize(
        ("raw", "want"),
        [
            ("A.B@Example.COM", "A.B@example.com"),
            ("o'neil+tag@sub.example.org", "o'neil+tag@sub.example.org"),
        ],
    )
    def test_email(self, raw: str, want: str) -> None:
        assert normalize_email(raw) == want

    @pytest.mark.parametrize("raw", ["plain", "a@b", "a@@b.com", "a@-b.com", ".a@b.com"])
    def test_bad_email(self, raw: str) -> None:
        with pytest.raises(ValueError, match="email"):
            normalize_email(raw)

    @pytest.mark.parametrize(
        ("raw", "region", "want"),
        [
            ("+14155550123", "US", "+14155550123"),
            ("(415) 555-0123", "US", "+14155550123"),
            ("020 7946 0018", "GB", "+442079460018"),
            ("+44 20 7946 0018", "US", "+442079460018"),
        ],
    )
    def test_phone(self, raw: str, region: str, want: str) -> None:
        assert normalize_phone(raw, region) == want

    @pytest.mark.parametrize("raw", ["+15555555555", "+999123", "12", "call me"])
    def test_bad_phone(self, raw: str) -> None:
        with pytest.raises(ValueError, match=r"phone|country"):
            normalize_phone(raw, "US")

    def test_bad_phone_names_the_field(self) -> None:
        with pytest.raises(FieldError) as info:
            build(phone_number="+15555555555")
        assert info.value.field == "phone_number"


class TestLimits:
    """Values no Klaviyo payload can carry are refused, never dropped."""

    @pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
    def test_non_finite_numbers(self, value: float) -> None:
        with pytest.raises(ValidationError, match="finite"):
            EventIn.model_validate(event(1, properties={"points": value}))

    def test_properties_size(self) -> None:
        with pytest.raises(ValidationError, match="bytes"):
            EventIn.model_validate(event(1, properties={f"k{i}": "x" * 9000 for i in range(8)}))

    def test_property_names_equal_once_stripped_are_refused(self) -> None:
        with pytest.raises(ValidationError, match="differ once surrounding whitespace is removed"):
            EventIn.model_validate(event(1, properties={" tier": "gold", "tier": "silver"}))
        assert EventIn.model_validate(event(1, properties={" tier ": "gold"})).properties == {"tier": "gold"}
        assert property_errors({"tier": "gold", "tier ": "silver", " $x": 1, "ok": [1]}) == [
            ("tier ", "property 'tier ' has the same name as 'tier' once surrounding whitespace is removed"),
            (" $x", "property names starting with '$' are reserved by Klaviyo: '$x'"),
            ("ok", "property 'ok' must be a string, number, boolean or null (JSON scalar)"),
        ]
        assert property_errors({"tier": "gold"}) == []

    def test_occurred_at_at_most_24_hours_after_receipt(self) -> None:
        """``build`` receives at 2026-11-25T00:00Z: clock skew up to a day is taken, anything later is not."""
        assert build(occurred_at="2026-11-26T00:00:00Z").occurred_at == datetime(2026, 11, 26, tzinfo=UTC)
        assert build(occurred_at="2026-11-25T20:00:00-04:00").occurred_at == datetime(
            2026, 11, 26, tzinfo=UTC
        )
        for later in ("2026-11-26T00:00:01Z", "2026-11-26T00:00:00.000001Z", "2031-01-01T00:00:00Z"):
            with pytest.raises(FieldError) as info:
                build(occurred_at=later)
            assert (info.value.field, info.value.reason) == (
                "occurred_at",
                "must not be more than 24 hours in the future",
            )
        # the fast path, which builds no model, is held to the same bound
        fields = fast_fields(event(1, occurred_at="2026-11-26T00:00:01Z"))
        assert fields is not None
        with pytest.raises(FieldError, match="24 hours"):
            build_event_from(
                fields,
                account_id="acme",
                source="ndjson",
                received_at=datetime(2026, 11, 25, tzinfo=UTC),
                default_region="US",
                pass_url_template="https://passninja.com/p/{serial_number}",
            )


class TestWire:
    """What goes into Redis comes back equal."""

    def test_round_trip(self) -> None:
        ev = build()
        back = PassEvent.from_wire(ev.to_wire(), "acme")
        assert back == ev
        assert len(ev.to_wire()) < 400

    @pytest.mark.parametrize("kind", list(EventKind))
    @pytest.mark.parametrize("platform", list(Platform))
    def test_kind_and_platform_are_plain_values(self, kind: EventKind, platform: Platform) -> None:
        """to_wire hands the enum members to orjson, which must write exactly their values."""
        wire = build().model_copy(update={"kind": kind, "platform": platform}).to_wire()
        assert f'"k":"{kind.value}"'.encode() in wire
        assert f'"p":"{platform.value}"'.encode() in wire
        doc = orjson.loads(wire)
        assert (type(doc["k"]), doc["k"]) == (str, kind.value)
        assert (type(doc["p"]), doc["p"]) == (str, platform.value)

    @pytest.mark.parametrize("seed", range(3))
    def test_timestamps_are_isoformat_with_z(self, seed: int) -> None:
        """orjson writes the timestamps; the text is what isoformat() gives, "+00:00" written "Z" — also for a
        read-back event (pydantic's own UTC tzinfo) and for whole seconds (no fraction)."""
        rng = random.Random(seed)
        base = build()
        for _ in range(500):
            at = datetime(1990, 1, 1, tzinfo=UTC) + timedelta(
                seconds=rng.randrange(2_000_000_000), microseconds=rng.choice([0, rng.randrange(1_000_000)])
            )
            ev = PassEvent.from_wire(base.model_copy(update={"occurred_at": at}).to_wire(), "acme")
            for e in (ev, ev.model_copy(update={"received_at": at})):
                wire = orjson.loads(e.to_wire())
                assert wire["o"] == e.occurred_at.isoformat().replace("+00:00", "Z")
                assert wire["r"] == e.received_at.isoformat().replace("+00:00", "Z")


class TestFastPath:
    """fast_event_in accepts only what pydantic accepts, and gives the same EventIn; the rest falls through."""

    @staticmethod
    def _mutations(rng: random.Random, base: dict[str, Any]) -> dict[str, Any]:
        doc: dict[str, Any] = dict(base)
        doc["properties"] = dict(base["properties"])
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            field = rng.choice(
                [*base, "occurred_at", "pass_url", "device_id", "email", "extra", "properties"]
            )
            value = rng.choice(
                [
                    None,
                    "",
                    " padded ",
                    "x" * rng.choice([200, 201, 254, 255, 256, 2049]),
                    "line\n",
                    "ctl\x01",
                    "\x1f",
                    "\u00a0nbsp",
                    "\u200b",
                    "2026-11-25T10:00:00Z",
                    "2026-11-25T10:00:00.5Z",
                    "2026-11-25T10:00:00.1234567Z",
                    "2026-11-25T10:00:00+02:00",
                    "2026-11-25T10:00:00",
                    "2026-11-25 10:00:00Z",
                    "2026-13-25T10:00:00Z",
                    "2026-11-25T24:00:00Z",
                    "1989-12-31T23:59:59Z",
                    "1990-01-01T00:00:00+01:00",
                    "9999-12-31T23:59:59-01:00",
                    "0001-01-01T00:00:00+01:00",
                    "2026-11-25T10:00:00z",
                    "ada@example.com",
                    "Ada@Example.COM",
                    "bad@",
                    "ünï@exämple.com",
                    "https://x.example/p/1",
                    "ftp://x",
                    "+14155550123",
                    "created",
                    "CREATED",
                    "apple",
                    "has space",
                    "ptk_0x216",
                    "ptk\n",
                    5,
                    1.5,
                    True,
                    [],
                    {},
                    {"a": 1},
                    {" a": 1},
                    {"": 1},
                    {"$x": 1},
                    {"k": [1]},
                    {"k": float("nan")},
                ]
            )
            if field == "properties" and isinstance(doc.get("properties"), dict) and rng.random() < 0.5:
                doc["properties"][rng.choice(["tier", " k", "", "n", "$r"])] = value
            elif rng.random() < 0.1:
                doc.pop(field, None)
            else:
                doc[field] = value
        return doc

    @pytest.mark.parametrize("seed", range(3))
    def test_same_as_pydantic_on_a_fuzzed_corpus(self, seed: int) -> None:
        rng = random.Random(seed)
        adapter: TypeAdapter[EventIn] = TypeAdapter(EventIn)
        fast_taken = 0
        for i in range(3000):
            doc = self._mutations(rng, event(i, email=f"Holder.{i}@Example.com", phone_number="+14155550123"))
            fast = fast_event_in(doc)
            try:
                expected: EventIn | None = adapter.validate_python(doc)
            except ValidationError:
                expected = None
            if fast is None:
                continue
            fast_taken += 1
            assert expected is not None, doc
            assert fast.model_dump() == expected.model_dump(), doc
            assert {k: type(v) for k, v in vars(fast).items()} == {
                k: type(v) for k, v in vars(expected).items()
            }, doc
            if fast.occurred_at is not None:
                assert fast.occurred_at.tzinfo is UTC
        assert fast_taken > 500  # the corpus reaches the fast path often, unmutated events always do

    def test_built_event_same_as_through_the_model(self) -> None:
        """build_event_from(fast_fields(raw)) (the producer's hot path) equals build_event(validated model)."""
        rng = random.Random(7)
        received = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
        built = 0
        for i in range(2000):
            phone = rng.choice(["+14155550123", "(415) 555-0123", "", "+44 20 7946 0958", "12"])
            doc = self._mutations(rng, event(i, email=f"Holder.{i}@Example.com", phone_number=phone))
            fields = fast_fields(doc)
            if fields is None:
                continue
            kwargs: dict[str, Any] = {
                "account_id": "acme",
                "source": "ndjson",
                "received_at": received,
                "default_region": "US",
                "pass_url_template": "https://passninja.com/p/{serial_number}?t={pass_type}",
            }
            try:
                expected = build_event(EventIn.model_validate(doc), **kwargs)
            except FieldError as exc:
                with pytest.raises(FieldError, match=re.escape(exc.reason)):
                    build_event_from(fields, **kwargs)
                continue
            got = build_event_from(fields, **kwargs)
            assert got == expected, doc
            assert got.to_wire() == expected.to_wire()
            assert got.model_fields_set == expected.model_fields_set
            built += 1
        assert built > 300
