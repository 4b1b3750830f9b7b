"""Every /api request the sandbox answered: counts by (operation, status) and the most recent entries."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LoggedRequest:
    """One answered request (never headers or bodies: they hold secrets and personal data)."""

    at: float
    method: str
    path: str
    operation: str
    account: str
    status: int
    duration_ms: float


class RequestLog:
    """Counts and a bounded tail."""

    def __init__(self, size: int) -> None:
        self.counts: dict[tuple[str, int], int] = {}
        self.recent: deque[LoggedRequest] = deque(maxlen=size)
        self.total = 0

    def add(self, entry: LoggedRequest) -> None:
        """Record one request."""
        key = (entry.operation, entry.status)
        self.counts[key] = self.counts.get(key, 0) + 1
        self.recent.append(entry)
        self.total += 1

    def clear(self) -> None:
        """Forget everything."""
        self.counts.clear()
        self.recent.clear()
        self.total = 0

    def summary(self, limit: int = 100) -> dict[str, Any]:
        """``{"total", "counts": {operation: {status: n}}, "recent": [...]}`` (newest last)."""
        counts: dict[str, dict[str, int]] = {}
        for (op, status), n in sorted(self.counts.items()):
            counts.setdefault(op, {})[str(status)] = n
        tail = list(self.recent)[-limit:] if limit > 0 else []
        return {
            "total": self.total,
            "counts": counts,
            "recent": [e.__dict__ for e in tail],
        }
