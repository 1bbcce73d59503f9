"""Tiny inline-SVG line charts for the HTML report: no JavaScript, no network, no dependencies.

A chart is a `<figure>` holding one `<svg>`: axes with 1-2-5 ticks, optional bands (p50-p99
areas), lines with optional per-point markers, reference lines (an SLO bound, the max rate) and
a legend. Axes are linear; a log-like axis is drawn by passing transformed values and `x_ticks`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
PASS, FAIL = "#2ca02c", "#d62728"


@dataclass
class Series:
    name: str
    xs: Sequence[float]
    ys: Sequence[float | None]
    color: str = ""
    dash: str = ""
    markers: Sequence[str] = ()  # one colour per point: draws a dot at each
    line: bool = True


@dataclass
class Band:
    name: str
    xs: Sequence[float]
    lo: Sequence[float]
    hi: Sequence[float]
    color: str = ""


@dataclass
class Chart:
    title: str
    x_label: str
    y_label: str
    series: list[Series] = field(default_factory=list)
    bands: list[Band] = field(default_factory=list)
    hlines: list[tuple[float, str, str]] = field(default_factory=list)  # (y, label, colour)
    vlines: list[tuple[float, str, str]] = field(default_factory=list)
    x_ticks: list[tuple[float, str]] | None = None
    y_min: float | None = 0.0
    y_max: float | None = None  # clip above this (clipped points sit on the top edge, hollow)
    fig_id: str = ""
    width: int = 620
    height: int = 300


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round ticks (1, 2 or 5 x 10^k apart) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.0f}"
    if a >= 1:
        return f"{v:.1f}".rstrip("0").rstrip(".")
    return f"{v:.3g}"


def render(c: Chart) -> str:
    ml, mr, mt, mb = 64, 26, 30, 44
    w, h = c.width, c.height
    pw, ph = w - ml - mr, h - mt - mb
    xs = [x for s in c.series for x, y in zip(s.xs, s.ys, strict=False) if y is not None]
    xs += [x for b in c.bands for x in b.xs] + [x for x, _, _ in c.vlines]
    ys = [y for s in c.series for y in s.ys if y is not None]
    ys += [y for b in c.bands for y in (*b.lo, *b.hi)] + [y for y, _, _ in c.hlines]
    fid = f' id="{escape(c.fig_id)}"' if c.fig_id else ""
    head = f'<figure class="chart"{fid}><figcaption>{escape(c.title)}</figcaption>'
    if not xs or not ys:
        return head + '<p class="nodata">no data</p></figure>'
    x_lo, x_hi = min(xs), max(xs)
    if c.x_ticks:
        x_lo, x_hi = min(x_lo, c.x_ticks[0][0]), max(x_hi, c.x_ticks[-1][0])
    y_lo = c.y_min if c.y_min is not None else min(ys)
    y_hi = max(ys)
    clip = c.y_max is not None and y_hi > c.y_max
    if clip:
        y_hi = c.y_max
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    if y_hi <= y_lo:
        y_hi = y_lo + 1
    yt = nice_ticks(y_lo, y_hi * 1.05)
    y_hi = max(y_hi, yt[-1])
    xt = c.x_ticks or [(t, _fmt(t)) for t in nice_ticks(x_lo, x_hi) if x_lo <= t <= x_hi]

    def px(x: float) -> float:
        return ml + (x - x_lo) / (x_hi - x_lo) * pw

    def py(y: float) -> float:
        return mt + ph - (min(y, y_hi) - y_lo) / (y_hi - y_lo) * ph

    out = [head, f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {w} {h}" width="{w}" height="{h}">']
    out.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" class="plot"/>')
    for t in yt:
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{py(t):.1f}" y2="{py(t):.1f}" class="grid"/>')
        out.append(f'<text x="{ml - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    for t, label in xt:
        out.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{mt}" y2="{mt + ph}" class="grid"/>')
        out.append(f'<text x="{px(t):.1f}" y="{mt + ph + 16}" text-anchor="middle">{escape(label)}</text>')
    out.append(
        f'<text x="{ml + pw / 2}" y="{h - 6}" text-anchor="middle" class="axis">{escape(c.x_label)}</text>'
    )
    out.append(
        f'<text transform="translate(14 {mt + ph / 2}) rotate(-90)" text-anchor="middle" class="axis">'
        f"{escape(c.y_label)}</text>"
    )
    legend: list[tuple[str, str, str]] = []
    for i, b in enumerate(c.bands):
        col = b.color or PALETTE[i % len(PALETTE)]
        pts = [(px(x), py(y)) for x, y in zip(b.xs, b.hi, strict=True)]
        pts += [(px(x), py(y)) for x, y in reversed(list(zip(b.xs, b.lo, strict=True)))]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        out.append(f'<polygon points="{path}" fill="{col}" fill-opacity="0.18" stroke="none" class="band"/>')
        legend.append((b.name, col, "band"))
    for i, s in enumerate(c.series):
        col = s.color or PALETTE[i % len(PALETTE)]
        pts = [(px(x), py(y)) for x, y in zip(s.xs, s.ys, strict=True) if y is not None]
        if s.line and len(pts) > 1:
            dash = f' stroke-dasharray="{s.dash}"' if s.dash else ""
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            out.append(
                f'<polyline points="{path}" fill="none" stroke="{col}" stroke-width="2"{dash} class="line"/>'
            )
        if s.markers or not s.line or len(pts) == 1:
            marks = list(s.markers) or [col] * len(pts)
            valid = [m for m, y in zip(marks, s.ys, strict=False) if y is not None]
            raw = [y for y in s.ys if y is not None]
            for (x, y), m, v in zip(pts, valid, raw, strict=False):
                fill = f'fill="#fff" stroke="{m}"' if v > y_hi else f'fill="{m}" stroke="#fff"'
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" {fill} class="pt"/>')
        legend.append((s.name, col, "line"))
    for y, label, col in c.hlines:
        out.append(
            f'<line x1="{ml}" x2="{ml + pw}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="{col}" '
            f'stroke-dasharray="6 4" class="ref"/>'
        )
        out.append(
            f'<text x="{ml + pw - 4}" y="{py(y) - 4:.1f}" text-anchor="end" fill="{col}">'
            f"{escape(label)}</text>"
        )
    for i, (x, label, col) in enumerate(c.vlines):
        out.append(
            f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{mt}" y2="{mt + ph}" stroke="{col}" '
            f'stroke-dasharray="6 4" class="ref"/>'
        )
        anchor = "end" if px(x) > ml + pw * 0.6 else "start"
        tx = px(x) - 4 if anchor == "end" else px(x) + 4
        out.append(
            f'<text x="{tx:.1f}" y="{mt + 12 + 14 * i}" text-anchor="{anchor}" fill="{col}">'
            f"{escape(label)}</text>"
        )
    if clip:
        out.append(f'<text x="{ml + 4}" y="{mt + 12}" class="clip">clipped above {_fmt(y_hi)}</text>')
    lx = ml + 8
    for name, col, kind in legend:
        shape = (
            f'<rect x="{lx}" y="{mt - 20}" width="12" height="10" fill="{col}" fill-opacity="0.35"/>'
            if kind == "band"
            else f'<line x1="{lx}" x2="{lx + 12}" y1="{mt - 15}" y2="{mt - 15}" stroke="{col}" '
            'stroke-width="2"/>'
        )
        out.append(shape + f'<text x="{lx + 16}" y="{mt - 11}">{escape(name)}</text>')
        lx += 24 + 7 * len(name)
    out.append("</svg></figure>")
    return "\n".join(out)
