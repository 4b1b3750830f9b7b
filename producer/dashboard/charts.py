"""Inline SVG line charts for the dashboard (pure: values in, markup out; no JavaScript, no build step)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup


@dataclass(frozen=True, slots=True)
class Line:
    """One line of a chart: its legend name, values (None = no sample: the line breaks) and CSS class."""

    name: str
    values: Sequence[float | None]
    css: str


def _fmt(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".") if v < 100 else f"{v:.0f}"


def polyline_segments(values: Sequence[float | None], width: float, height: float, top: float) -> list[str]:
    """``points`` attributes of the unbroken runs of ``values`` scaled into ``width``×``height`` (y up to
    ``top``), one per run; a single-point run becomes a short flat stroke so it stays visible."""
    n = len(values)
    if n == 0:
        return []
    step = width / max(1, n - 1)
    scale = (height - 2) / top if top > 0 else 0.0
    runs: list[list[tuple[float, float]]] = [[]]
    for i, v in enumerate(values):
        if v is None:
            if runs[-1]:
                runs.append([])
            continue
        runs[-1].append((i * step, height - 1 - v * scale))
    out = []
    half = max(1.0, step * 0.4)
    for run in runs:
        if len(run) == 1:
            x, y = run[0]
            run = [(max(0.0, x - half), y), (min(width, x + half), y)]
        if run:
            out.append(" ".join(f"{x:.1f},{y:.1f}" for x, y in run))
    return out


def recent(series: dict[str, list[float | None]], *, min_points: int) -> dict[str, list[float | None]]:
    """``series`` without the leading stretch in which nothing was recorded (keeping at least ``min_points``),
    so a young system's charts are not a flat line with everything squeezed against the right edge."""
    length = min((len(v) for v in series.values()), default=0)
    first = next(
        (i for i in range(length) if any(v[i] not in (None, 0) for v in series.values())),
        length,
    )
    start = max(0, min(first, length - min_points))
    return {name: values[start:] for name, values in series.items()}


def line_chart(
    title: str, lines: Sequence[Line], *, width: int = 240, height: int = 48, unit: str = ""
) -> Markup:
    """A small chart of ``lines`` sharing one y scale (0 to the largest value), with a legend of last values.

    Built from ``Markup`` templates whose ``format`` escapes every interpolated value.
    """
    present = [v for line in lines for v in line.values if v is not None]
    top = max(present, default=0.0) or 1.0
    svg = Markup(
        '<svg class="chart" viewBox="0 0 {w} {h}" width="{w}" height="{h}" role="img" aria-label="{t}" '
        'preserveAspectRatio="none"><title>{t}</title>'
        '<line class="axis" x1="0" y1="{y}" x2="{w}" y2="{y}"/>'
    ).format(w=width, h=height, t=title, y=height - 0.5)
    for line in lines:
        for points in polyline_segments(line.values, width, height, top):
            svg += Markup('<polyline class="{c}" points="{p}"/>').format(c=line.css, p=points)
    svg += Markup("</svg>")
    legend = Markup("")
    for line in lines:
        last = next((v for v in reversed(line.values) if v is not None), None)
        shown = "–" if last is None else _fmt(last) + unit
        legend += Markup('<span class="legend {c}">{n} {v}</span> ').format(c=line.css, n=line.name, v=shown)
    legend += Markup('<span class="legend max">max {v}</span>').format(v=_fmt(top) + unit)
    return Markup('<figure class="chartbox">{s}<figcaption>{l}</figcaption></figure>').format(s=svg, l=legend)
