"""The canonical event's pure rules: normalization, limits, the wire form."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from pydantic import ValidationError

from passbridge.event import EventIn, FieldError, PassEvent, build_event, normalize_email, normalize_phone
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


class TestWire:
    """What goes into Redis comes back equal."""

    def test_round_trip(self) -> None:
        ev = build()
        back = PassEvent.from_wire(ev.to_wire(), "acme")
        assert back == ev
        assert len(ev.to_wire()) < 400

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
