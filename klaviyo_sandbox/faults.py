"""Fault injection: error statuses, latency, hung requests, dropped connections, scheduled outages.

``FaultInjector.decide`` is pure apart from its random source (seedable), so the policy is testable without a
server; the app turns a decision into behaviour.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from klaviyo_sandbox.config import FaultConfig, Outage


@dataclass(frozen=True)
class Fault:
    """What to do to one request: ``kind`` is ``status`` (answer ``status``), ``hang`` or ``drop``."""

    kind: str
    status: int = 0
    after_processing: bool = False


@dataclass
class _ScheduledOutage:
    start: float
    end: float
    status: int


class FaultInjector:
    """Holds the current fault configuration and the outage schedule (monotonic clock)."""

    def __init__(self, config: FaultConfig, now: float) -> None:
        self.started = now
        self.configure(config, now)

    def configure(self, config: FaultConfig, now: float) -> None:
        """Replace the configuration; outages in it are scheduled relative to ``now``."""
        self.config = config
        self.rng = random.Random(config.seed)
        self.outages = [self._schedule(o, now) for o in config.outages]

    @staticmethod
    def _schedule(outage: Outage, now: float) -> _ScheduledOutage:
        return _ScheduledOutage(now + outage.start_s, now + outage.start_s + outage.duration_s, outage.status)

    def add_outage(self, outage: Outage, now: float) -> None:
        """Schedule one more outage, ``start_s`` from now."""
        self.outages.append(self._schedule(outage, now))
        self.config = replace(self.config, outages=(*self.config.outages, outage))

    @property
    def active(self) -> bool:
        """Whether any fault can fire."""
        return self.config.active or bool(self.outages)

    def latency_s(self) -> float:
        """Added latency for one request."""
        c = self.config
        extra = self.rng.uniform(0, c.jitter_ms) if c.jitter_ms else 0.0
        return (c.latency_ms + extra) / 1000.0

    def rejects(self, operation_id: str, identity: object) -> bool:
        """Whether the item of ``identity`` (an ``external_id``, or a record's serial) sent to ``operation_id``
        is to be refused as a bad item (``reject_external_ids``)."""
        c = self.config
        if not c.reject_external_ids or not isinstance(identity, str):
            return False
        scope = c.reject_operations or c.operations
        if scope and operation_id not in scope:
            return False
        return identity in c.reject_external_ids

    def decide(self, operation_id: str, now: float) -> Fault | None:
        """The fault for a request to ``operation_id`` at ``now``, if any."""
        for o in self.outages:
            if o.start <= now < o.end:
                return Fault("drop") if o.status == 0 else Fault("status", o.status)
        c = self.config
        if c.operations and operation_id not in c.operations:
            return None
        for status, rate in c.error_rates:
            if rate and self.rng.random() < rate:
                return Fault("status", status)
        if c.hang_rate and self.rng.random() < c.hang_rate:
            return Fault("hang")
        if c.drop_rate and self.rng.random() < c.drop_rate:
            return Fault("drop", after_processing=c.drop_after_processing)
        return None
