"""The sliding two-window limiter on a fake clock."""

from __future__ import annotations

import pytest

from klaviyo_sandbox.ratelimit import SlidingWindowLimiter, Tier

KEY = ("acct", "", "op")


def test_tier_parses_the_spec_extension() -> None:
    assert Tier.parse({"burst": "75/s", "steady": "750/m"}) == Tier(75, 750)
    with pytest.raises(ValueError, match="unexpected"):
        Tier.parse({"burst": "75/m", "steady": "750/s"})


def test_burst_window_slides() -> None:
    limiter = SlidingWindowLimiter()
    tier = Tier(3, 100)
    assert [limiter.check(KEY, tier, 10.0 + i * 0.1).admitted for i in range(4)] == [True, True, True, False]
    blocked = limiter.check(KEY, tier, 10.35)
    assert not blocked.admitted
    assert blocked.retry_after_s == pytest.approx(0.65)
    assert limiter.check(KEY, tier, 10.99).admitted is False
    assert limiter.check(KEY, tier, 11.0).admitted  # an admission at t counts during [t, t + 1 s)


def test_steady_window_holds_at_most_steady_in_any_60s() -> None:
    limiter = SlidingWindowLimiter()
    tier = Tier(100, 10)
    times = [float(t) for t in range(0, 600, 1)]
    admitted = [t for t in times if limiter.check(KEY, tier, t).admitted]
    for i in range(len(admitted) - 10):
        assert admitted[i + 10] - admitted[i] > 60 - 1e-9
    assert len(admitted) == pytest.approx(10 * 10, abs=10)


def test_rejections_do_not_consume_budget_and_keys_are_separate() -> None:
    limiter = SlidingWindowLimiter()
    tier = Tier(1, 60)
    assert limiter.check(KEY, tier, 0.0).admitted
    for i in range(50):
        assert not limiter.check(KEY, tier, 0.01 * (i + 1)).admitted
    assert limiter.check(KEY, tier, 1.001).admitted
    assert limiter.check(("other", "", "op"), tier, 0.5).admitted


def test_scale_shrinks_windows_and_retry_after() -> None:
    limiter = SlidingWindowLimiter(scale=10.0)
    tier = Tier(1, 15)
    assert limiter.check(KEY, tier, 0.0).admitted
    blocked = limiter.check(KEY, tier, 0.01)
    assert not blocked.admitted
    assert blocked.retry_after_s == pytest.approx(0.09)
    assert limiter.retry_after_header(blocked.retry_after_s) == "0.1"
    assert SlidingWindowLimiter().retry_after_header(0.2) == "1"
    assert SlidingWindowLimiter().retry_after_header(3.5) == "4"


def test_remaining_and_reset() -> None:
    limiter = SlidingWindowLimiter()
    d = limiter.check(KEY, Tier(75, 750), 0.0)
    assert d.admitted
    assert d.remaining == 74
    assert d.reset_s == pytest.approx(1.0)
