"""The JSONPath subset Klaviyo source mappings use: ``$['a']['b']``, ``$.a.b``, ``$.a[0]``, ``$["a"]``."""

from __future__ import annotations

import functools
import re
from typing import Any

_STEP = re.compile(
    r"""\.([A-Za-z_$][\w$\-]*)|\[\s*'((?:[^'\\]|\\.)*)'\s*\]|\[\s*"((?:[^"\\]|\\.)*)"\s*\]|\[\s*(\d+)\s*\]"""
)

MISSING = object()


@functools.lru_cache(maxsize=1024)
def compile_path(path: str) -> tuple[str | int, ...]:
    """The steps of ``path``; ValueError when it is not in the supported subset."""
    if not path.startswith("$"):
        raise ValueError(f"JSONPath must start with '$': {path!r}")
    steps: list[str | int] = []
    pos = 1
    while pos < len(path):
        m = _STEP.match(path, pos)
        if not m:
            raise ValueError(f"unsupported JSONPath {path!r}")
        name, single, double, index = m.groups()
        if index is not None:
            steps.append(int(index))
        else:
            steps.append(name if name is not None else (single if single is not None else double))
        pos = m.end()
    return tuple(steps)


def evaluate(path: str, data: Any) -> Any:
    """The value at ``path`` in ``data``, or :data:`MISSING`."""
    for step in compile_path(path):
        if isinstance(step, int):
            if not isinstance(data, list) or step >= len(data):
                return MISSING
            data = data[step]
        else:
            if not isinstance(data, dict) or step not in data:
                return MISSING
            data = data[step]
    return data
