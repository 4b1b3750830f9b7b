"""The pure retry policy: backoff bounds, limits, classes, paused time, per-account overrides."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.retry import (
    DeadLetter,
    Failure,
    FailureKind,
    PauseAccount,
    Retry,
    RetryPolicy,
    RetryRecord,
    Wait,
    active_age_ms,
    backoff_s,
    decide,
)

POLICY = RetryPolicy(base_delay_s=1.0, max_delay_s=60.0, max_attempts=5, max_age_s=3600.0)


def failure(kind: FailureKind, **kw: object) -> Failure:
    return Failure(kind=kind, message=f"{kind} failure", **kw)  # type: ignore[arg-type]


class TestBackoff:
    """Capped exponential backoff with full jitter."""

    @given(attempt=st.integers(1, 200), r=st.floats(0, 1, exclude_max=True))
    def test_within_zero_and_the_capped_exponential(self, attempt: int, r: float) -> None:
        delay = backoff_s(POLICY, attempt, lambda: r)
        assert 0 <= delay <= min(60.0, 2.0 ** (attempt - 1))

    def test_ceiling_doubles_then_caps(self) -> None:
        top = [backoff_s(POLICY, n, lambda: 0.999999) for n in range(1, 10)]
        assert [round(t) for t in top] == [1, 2, 4, 8, 16, 32, 60, 60, 60]

    def test_full_jitter_reaches_zero(self) -> None:
        assert backoff_s(POLICY, 7, lambda: 0.0) == 0.0


class TestDecide:
    """Each failure class gets its handling."""

    def test_transient_retries_until_max_attempts(self) -> None:
        got = [
            decide(POLICY, failure(FailureKind.transient), attempts=n, age_ms=0, rand=lambda: 0.5)
            for n in range(5)
        ]
        assert [type(d) for d in got] == [Retry, Retry, Retry, Retry, DeadLetter]
        assert [d.attempt for d in got if isinstance(d, Retry)] == [1, 2, 3, 4]
        assert "5 attempts" in got[-1].reason  # type: ignore[union-attr]

    def test_max_age_dead_letters(self) -> None:
        d = decide(POLICY, failure(FailureKind.transient), attempts=0, age_ms=3_600_000, rand=lambda: 0.5)
        assert isinstance(d, DeadLetter)
        assert "max age" in d.reason

    def test_internal_errors_retry_like_transient(self) -> None:
        d = decide(POLICY, failure(FailureKind.internal), attempts=0, age_ms=0, rand=lambda: 0.5)
        assert d == Retry(0.5, 1)

    @given(attempts=st.integers(0, 1000), age=st.integers(0, 10**10))
    def test_throttle_waits_retry_after_and_never_dead_letters(self, attempts: int, age: int) -> None:
        d = decide(
            POLICY,
            failure(FailureKind.throttled, retry_after_s=2.5),
            attempts=attempts,
            age_ms=age,
            rand=lambda: 0.5,
        )
        assert d == Wait(2.5)

    def test_auth_pauses_the_account(self) -> None:
        d = decide(POLICY, failure(FailureKind.auth, status=401), attempts=99, age_ms=10**12, rand=lambda: 0)
        assert isinstance(d, PauseAccount)

    def test_permanent_dead_letters_at_once(self) -> None:
        d = decide(POLICY, failure(FailureKind.permanent, status=400), attempts=0, age_ms=0, rand=lambda: 0)
        assert isinstance(d, DeadLetter)
        assert d.reason.startswith("permanent error")


class TestActiveAge:
    """Paused time does not age events."""

    def test_no_pauses(self) -> None:
        assert active_age_ms(1_000, 5_000, []) == 4_000

    def test_overlapping_pauses_are_subtracted(self) -> None:
        # Received at 1 s, now 10 s; paused 0-2 s (1 s overlaps), 4-6 s (2 s), 12-20 s (after now: none).
        assert active_age_ms(1_000, 10_000, [(0, 2_000), (4_000, 6_000), (12_000, 20_000)]) == 6_000

    @given(
        received=st.integers(0, 10**6),
        life=st.integers(0, 10**6),
        pauses=st.lists(st.tuples(st.integers(0, 2 * 10**6), st.integers(0, 10**6)), max_size=5),
    )
    def test_between_zero_and_wall_age(self, received: int, life: int, pauses: list[tuple[int, int]]) -> None:
        intervals = sorted((s, s + d) for s, d in pauses)
        # Closed pauses never overlap each other (one open pause per account at a time).
        disjoint: list[tuple[int, int]] = []
        for s, e in intervals:
            if not disjoint or s >= disjoint[-1][1]:
                disjoint.append((s, e))
        age = active_age_ms(received, received + life, disjoint)
        assert 0 <= age <= life


class TestOverrides:
    """Accounts override the defaults; mistakes are named."""

    def test_override(self) -> None:
        p = POLICY.with_overrides({"max_attempts": 3, "max_age_s": 60})
        assert p.max_attempts == 3
        assert p.max_age_s == 60.0
        assert p.base_delay_s == POLICY.base_delay_s

    def test_unknown_key(self) -> None:
        with pytest.raises(ValueError, match="unknown retry_policy keys: max_tries"):
            POLICY.with_overrides({"max_tries": 3})

    @pytest.mark.parametrize(
        "bad", [{"max_attempts": 0}, {"base_delay_s": -1}, {"max_age_s": "1h"}, {"max_delay_s": 0.1}]
    )
    def test_invalid_values(self, bad: dict[str, object]) -> None:
        with pytest.raises(ValueError, match="retry"):
            POLICY.with_overrides(bad)


class TestRetryRecord:
    """The per-event failure history."""

    def test_counts_attempts_and_throttles_separately(self) -> None:
        rec = RetryRecord("S1")
        rec.add(failure(FailureKind.transient, status=503), at_ms=10, worker_id="w1", counted=True)
        rec.add(failure(FailureKind.throttled, status=429), at_ms=20, worker_id="w1", counted=False)
        rec.add(failure(FailureKind.transient, status=500), at_ms=30, worker_id="w2", counted=True)
        assert (rec.attempts, rec.throttled, rec.first_failure_ms) == (2, 1, 10)
        assert [(e["status"], e["worker"], e["at_ms"]) for e in rec.errors] == [
            (503, "w1", 10),
            (500, "w2", 30),
        ]
        assert RetryRecord.from_doc(rec.to_doc()) == rec
