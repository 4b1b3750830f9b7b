"""The merchant report (pure): pass lifecycle counts turned into the rates merchants track.

- **save rate** = installed / created: how many issued passes were added to a wallet;
- **install-to-uninstall ratio** = installed / uninstalled: how many installs per removal (higher is better).

Counts come from :func:`worker.inspect.report_rows` (events the producer ingested, by the hour they occurred);
this module only sums and divides, so it is tested without Redis.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from passbridge.event import EventKind

KINDS = tuple(k.value for k in EventKind)


@dataclass(frozen=True, slots=True)
class ReportRow:
    """How many events of one kind, platform and pass type occurred in the report's range."""

    kind: str
    platform: str
    pass_type: str
    count: int


def ratio(num: int, den: int) -> float | None:
    """``num / den`` rounded to 4 places, or None when ``den`` is 0 (undefined, not zero)."""
    return round(num / den, 4) if den else None


@dataclass(slots=True)
class Tally:
    """Counts by event kind and the rates derived from them."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))

    def add(self, kind: str, n: int) -> None:
        """Count ``n`` events of ``kind``."""
        self.counts[kind] = self.counts.get(kind, 0) + n

    @property
    def save_rate(self) -> float | None:
        """installed / created."""
        return ratio(self.counts["installed"], self.counts["created"])

    @property
    def install_uninstall_ratio(self) -> float | None:
        """installed / uninstalled."""
        return ratio(self.counts["installed"], self.counts["uninstalled"])

    def to_doc(self) -> dict[str, Any]:
        """JSON form: the counts and both rates."""
        return {
            **self.counts,
            "save_rate": self.save_rate,
            "install_uninstall_ratio": self.install_uninstall_ratio,
        }


@dataclass(slots=True)
class Report:
    """Totals and the same figures by platform, by pass type and by both."""

    total: Tally
    by_platform: dict[str, Tally]
    by_pass_type: dict[str, Tally]
    by_platform_and_pass_type: dict[tuple[str, str], Tally]

    def to_doc(self) -> dict[str, Any]:
        """JSON form (``passbridge report --json``)."""
        return {
            "total": self.total.to_doc(),
            "by_platform": {k: v.to_doc() for k, v in sorted(self.by_platform.items())},
            "by_pass_type": {k: v.to_doc() for k, v in sorted(self.by_pass_type.items())},
            "by_platform_and_pass_type": [
                {"platform": p, "pass_type": t, **v.to_doc()}
                for (p, t), v in sorted(self.by_platform_and_pass_type.items())
            ],
        }


def summarize(rows: Iterable[ReportRow]) -> Report:
    """Sum ``rows`` overall, by platform, by pass type and by (platform, pass type)."""
    total = Tally()
    platform: dict[str, Tally] = defaultdict(Tally)
    pass_type: dict[str, Tally] = defaultdict(Tally)
    both: dict[tuple[str, str], Tally] = defaultdict(Tally)
    for r in rows:
        for tally in (total, platform[r.platform], pass_type[r.pass_type], both[(r.platform, r.pass_type)]):
            tally.add(r.kind, r.count)
    return Report(total, dict(platform), dict(pass_type), dict(both))
