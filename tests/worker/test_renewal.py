"""Which held leases a renewal tick takes (:func:`worker.engine.renewal_due`): pure, no servers."""

from __future__ import annotations

from worker.engine import SerialWork, renewal_due
from worker.queue import Lease

INTERVAL = 2.5


def held(*ages: float, now: float = 100.0) -> list[SerialWork]:
    """Works in renewal order (oldest first), renewed ``ages`` seconds before ``now``."""
    return [
        SerialWork(Lease("acme", f"S{i}", f"w.{i}"), [], None, renewed_at=now - age)
        for i, age in enumerate(ages)
    ]


def serials(works: list[SerialWork]) -> list[str]:
    return [w.lease.serial for w in works]


def test_every_overdue_lease_is_taken_beyond_the_quota() -> None:
    works = held(3.0, 2.6, 2.5, 1.0)
    assert serials(renewal_due(works, 100.0, INTERVAL, quota=1)) == ["S0", "S1", "S2"]


def test_the_quota_is_filled_with_leases_older_than_half_the_interval_only() -> None:
    works = held(2.0, 1.5, 1.3, 1.2, 0.2)
    assert serials(renewal_due(works, 100.0, INTERVAL, quota=2)) == ["S0", "S1"]
    # 1.2 s is under half the interval: a lease that young waits for a later tick, quota or not.
    assert serials(renewal_due(works, 100.0, INTERVAL, quota=10)) == ["S0", "S1", "S2"]


def test_nothing_is_due_while_every_lease_is_young() -> None:
    assert renewal_due(held(1.0, 0.5), 100.0, INTERVAL, quota=5) == []


def test_released_and_lost_leases_are_skipped() -> None:
    works = held(3.0, 3.0, 3.0)
    works[0].released = True
    works[1].lost = True
    assert serials(renewal_due(works, 100.0, INTERVAL, quota=1)) == ["S2"]
