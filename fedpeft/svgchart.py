"""Line charts as inline SVG, drawn on the server: the dashboard's charts need no script and
nothing fetched at run time. Each point carries its values as ``data-*`` attributes, so a test
(or a reader of the page source) can check what a chart shows against the store."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

#: A colour-blind-safe cycle (Okabe & Ito), one per series.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000")

#: The colour of faint series (:attr:`Series.faint`).
FAINT = "#5b7a99"

_W, _H = 640, 300
_LEFT, _RIGHT, _TOP, _BOTTOM = 52, 180, 12, 32


@dataclass(frozen=True)
class Point:
    x: int
    y: float
    #: The 95 % interval drawn as a whisker, if known.
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class Series:
    name: str
    points: Sequence[Point]
    dashed: bool = False
    #: One of many (a site of 100): a thin pale line without whiskers or a legend entry of its
    #: own; the chart's legend names the faint series once, with their count.
    faint: bool = False


@dataclass(frozen=True)
class Chart:
    title: str
    series: Sequence[Series]
    #: Horizontal reference lines, (label, y): e.g. the alone and centralized macro AUCs.
    references: Sequence[tuple[str, float]] = field(default_factory=tuple)
    x_label: str = "round"
    #: A fixed y range (AUC: 0.5-1 stretched to the data); None to fit the data.
    y_range: tuple[float, float] | None = None


def _finite(values: Sequence[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def render(chart: Chart) -> str:
    """The chart as one ``<svg>`` element (a string safe to insert into HTML)."""
    xs = [p.x for s in chart.series for p in s.points]
    # The axis spans the points and reference lines; a wide interval is cut at its edge
    # rather than squeezing every line (a small site's AUC interval may span 0.3-1).
    ys = _finite([p.y for s in chart.series for p in s.points] + [y for _, y in chart.references])
    title = escape(chart.title)
    if not xs or not ys:
        return (
            f'<svg class="chart" role="img" aria-label="{title}" viewBox="0 0 {_W} 60" '
            f'width="{_W}" height="60"><text x="8" y="30">{title}: nothing recorded yet</text>'
            "</svg>"
        )
    lo, hi = chart.y_range or (min(ys), max(ys))
    lo, hi = min(lo, min(ys)), max(hi, max(ys))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.05, hi + 0.05
    digits = min(6, max(2, math.ceil(-math.log10((hi - lo) / 4)) + 1))
    x0, x1 = min(xs), max(xs)
    span_x = max(x1 - x0, 1)
    plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def px(x: float) -> float:
        return _LEFT + (x - x0) / span_x * plot_w if x1 > x0 else _LEFT + plot_w / 2

    def py(y: float) -> float:
        return _TOP + (hi - y) / (hi - lo) * plot_h

    out = [
        f'<svg class="chart" role="img" aria-label="{title}" viewBox="0 0 {_W} {_H}" '
        f'width="{_W}" height="{_H}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{title}</title>",
        f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_w}" height="{plot_h}" fill="#fafafa" '
        'stroke="#ccc"/>',
    ]
    for i in range(5):  # y grid and labels
        y = lo + (hi - lo) * i / 4
        out.append(
            f'<line x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{py(y):.1f}" y2="{py(y):.1f}" '
            f'stroke="#e4e4e4"/><text x="{_LEFT - 4}" y="{py(y) + 4:.1f}" font-size="11" '
            f'text-anchor="end">{y:.{digits}f}</text>'
        )
    for x in sorted(set(xs)):  # x ticks (rounds are few)
        out.append(
            f'<text x="{px(x):.1f}" y="{_TOP + plot_h + 14}" font-size="11" '
            f'text-anchor="middle">{x}</text>'
        )
    out.append(
        f'<text x="{_LEFT + plot_w / 2}" y="{_H - 4}" font-size="11" '
        f'text-anchor="middle">{escape(chart.x_label)}</text>'
    )
    legend_y = _TOP + 12
    for i, (label, y) in enumerate(chart.references):
        colour = "#777" if i % 2 == 0 else "#b00"
        out.append(
            f'<line class="reference" data-label="{escape(label)}" data-y="{y:.6f}" '
            f'x1="{_LEFT}" x2="{_LEFT + plot_w}" y1="{py(y):.1f}" y2="{py(y):.1f}" '
            f'stroke="{colour}" stroke-dasharray="2 3"/>'
        )
        out.append(_legend(legend_y, colour, f"{label} {y:.3f}", dashed=True))
        legend_y += 16
    faint = [s for s in chart.series if s.faint]
    if faint:
        out.append(_legend(legend_y, FAINT, f"each of {len(faint)} sites", dashed=False))
        legend_y += 16
    bold = [s for s in chart.series if not s.faint]
    for i, s in enumerate(faint + bold):
        colour = FAINT if s.faint else PALETTE[(i - len(faint)) % len(PALETTE)]
        name = escape(s.name)
        pts = sorted((p for p in s.points if math.isfinite(p.y)), key=lambda p: p.x)
        dash = ' stroke-dasharray="6 3"' if s.dashed else ""
        width, opacity = ("1", ' stroke-opacity="0.25"') if s.faint else ("2", "")
        if len(pts) > 1:
            path = " ".join(f"{px(p.x):.1f},{py(p.y):.1f}" for p in pts)
            out.append(
                f'<polyline fill="none" stroke="{colour}" stroke-width="{width}"{opacity}{dash} '
                f'points="{path}"/>'
            )
        for p in pts:
            if s.faint:  # the point stays, with its values, for a reader of the source
                out.append(
                    f'<circle class="point" data-series="{name}" data-x="{p.x}" '
                    f'data-y="{p.y:.6f}" cx="{px(p.x):.1f}" cy="{py(p.y):.1f}" r="1.5" '
                    f'fill="{colour}" fill-opacity="0.4"><title>{name}, '
                    f"{escape(chart.x_label)} {p.x}: {p.y:.3f}{_interval_text(p)}</title>"
                    "</circle>"
                )
                continue
            if p.low is not None and p.high is not None:
                low, high = max(p.low, lo), min(p.high, hi)
                out.append(
                    f'<line x1="{px(p.x):.1f}" x2="{px(p.x):.1f}" y1="{py(low):.1f}" '
                    f'y2="{py(high):.1f}" stroke="{colour}" stroke-opacity="0.5"/>'
                )
            out.append(
                f'<circle class="point" data-series="{name}" data-x="{p.x}" '
                f'data-y="{p.y:.6f}" cx="{px(p.x):.1f}" cy="{py(p.y):.1f}" r="3" '
                f'fill="{colour}"><title>{name}, {escape(chart.x_label)} {p.x}: {p.y:.3f}'
                f"{_interval_text(p)}</title></circle>"
            )
        if not s.faint:
            out.append(_legend(legend_y, colour, s.name, dashed=s.dashed))
            legend_y += 16
    out.append("</svg>")
    return "\n".join(out)


def _interval_text(p: Point) -> str:
    if p.low is None or p.high is None:
        return ""
    return f" [{p.low:.3f}, {p.high:.3f}]"


def _legend(y: float, colour: str, label: str, *, dashed: bool) -> str:
    x = _W - _RIGHT + 8
    dash = ' stroke-dasharray="4 3"' if dashed else ""
    return (
        f'<line x1="{x}" x2="{x + 16}" y1="{y - 4}" y2="{y - 4}" stroke="{colour}" '
        f'stroke-width="2"{dash}/><text x="{x + 20}" y="{y}" font-size="11">{escape(label)}</text>'
    )
