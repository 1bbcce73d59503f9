"""Interactive charts for report.html: plotly.js figures in a self-contained, offline page.

Why plotly (the Python package ships plotly.js, inlined once per page, ~4.8 MB): values on hover
for every point and line, zoom and pan, and a linear/log switch on latency axes, from a well-kept
library instead of hand-written SVG. A chart is described here (series, bands, reference lines)
and becomes a `<figure>` holding its figure JSON; `page_script` draws every figure on load.

Reference lines (an SLO bound, the max rate, the knee) are traces with their value in the legend
and on hover, never free-floating text: labels cannot collide, however close two lines are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

import orjson

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#d62728", "#17becf", "#8c564b", "#e377c2")
PASS, FAIL = "#2ca02c", "#d62728"
FONT = 'system-ui,-apple-system,"Segoe UI",Roboto,sans-serif'


@dataclass
class Series:
    name: str
    xs: Sequence[float]
    ys: Sequence[float | None]
    color: str = ""
    dash: str = ""  # plotly dash name: "dash", "dot", "dashdot"
    markers: Sequence[str] = ()  # one colour per point (e.g. a step's verdict)
    hover: Sequence[str] = ()  # one hover text per point; default "name: y unit at x unit"
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
    vlines: list[tuple[float, str, str]] = field(default_factory=list)  # (x, label, colour)
    x_ticks: list[tuple[float, str]] | None = None
    x_unit: str = ""
    y_unit: str = ""
    log_switch: bool = False  # a linear/log button pair on the y axis
    log_default: bool = False
    unified_hover: bool = False  # every series' value at the hovered x (time series)
    fig_id: str = ""
    height: int = 400


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.1f}"
    return f"{v:.4g}"


def log_ticks(lo: float, hi: float) -> list[float]:
    """Round ticks for a log axis over [lo, hi] > 0, labelled with their values rather than plotly's
    bare digits between powers of ten: the coarsest of 10^k, {1,2,5} x 10^k and {1..9} x 10^k that
    puts at least three inside, else evenly spaced round values (a range narrower than a digit)."""
    if not (0 < lo <= hi and math.isfinite(hi)):
        return []
    if hi < lo * 1.001:
        return [lo]
    k0, k1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    for steps in ((1,), (1, 2, 5), tuple(range(1, 10))):
        ticks = [m * 10.0**k for k in range(k0, k1 + 1) for m in steps]
        inside = [t for t in ticks if lo <= t <= hi]
        if len(inside) >= 3:
            return inside if len(inside) <= 12 or steps == (1,) else inside[:: len(inside) // 8 + 1]
    raw = (hi - lo) / 4
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def _tick(v: float) -> str:
    return f"{v:,.0f}" if v >= 10 and v == round(v) else f"{v:.3g}"


def _rgba(hex_colour: str, alpha: float) -> str:
    r, g, b = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _hover(c: Chart, s: Series) -> list[str]:
    if s.hover:
        return list(s.hover)
    xu = f" {c.x_unit}" if c.x_unit else ""
    yu = f" {c.y_unit}" if c.y_unit else ""
    return [
        "" if y is None else f"{s.name}: {fmt(y)}{yu} at {fmt(x)}{xu}"
        for x, y in zip(s.xs, s.ys, strict=True)
    ]


def _traces(c: Chart) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = []
    for i, b in enumerate(c.bands):
        col = b.color or PALETTE[i % len(PALETTE)]
        common = {
            "type": "scatter",
            "mode": "lines",
            "x": list(b.xs),
            "hoverinfo": "skip",
            "legendgroup": b.name,
        }
        data.append({**common, "y": list(b.lo), "line": {"width": 0}, "showlegend": False, "name": b.name})
        data.append(
            {
                **common,
                "y": list(b.hi),
                "line": {"width": 0},
                "fill": "tonexty",
                "fillcolor": _rgba(col, 0.15),
                "name": b.name,
            }
        )
    n_points = max((len(s.xs) for s in c.series), default=0)
    for i, s in enumerate(c.series):
        col = s.color or PALETTE[i % len(PALETTE)]
        marker: dict[str, Any] = {"size": 8 if s.markers else (5 if n_points <= 80 else 3), "color": col}
        if s.markers:
            marker.update(color=list(s.markers), line={"color": "#fff", "width": 1})
        data.append(
            {
                "type": "scatter",
                "mode": "lines+markers" if s.line else "markers",
                "name": s.name,
                "x": list(s.xs),
                "y": list(s.ys),
                "text": _hover(c, s),
                "hovertemplate": "%{text}<extra></extra>",
                "line": {"color": col, "width": 2, "dash": s.dash or "solid"},
                "marker": marker,
            }
        )
    xs = [x for s in c.series for x, y in zip(s.xs, s.ys, strict=True) if y is not None]
    ys = _positive_ys(c, lines=False)
    for y, label, col in c.hlines:
        if xs:
            data.append(_ref([min(xs), max(xs)], [y, y], label, col))  # the label states its bound
    for x, label, col in c.vlines:
        if ys:  # from below the lowest value to above the highest, positive for the log view
            span = [min(ys) / VSPAN, max(ys) * VSPAN]
            data.append(_ref([x, x], span, f"{label} ({fmt(x)} {c.x_unit})".strip(), col))
    return data


VSPAN = 1.1  # a vertical reference line reaches this factor beyond the data, up and down


def _positive_ys(c: Chart, lines: bool = True) -> list[float]:
    """The chart's positive y values (what a log axis shows), with the reference lines' extent."""
    ys = [y for s in c.series for y in s.ys if y is not None and y > 0]
    ys += [y for b in c.bands for y in (*b.lo, *b.hi) if y > 0] + [y for y, _, _ in c.hlines if y > 0]
    if lines and ys and c.vlines:
        ys += [min(ys) / VSPAN, max(ys) * VSPAN]
    return ys


def _ref(xs: list[float], ys: list[float], name: str, col: str) -> dict[str, Any]:
    return {
        "type": "scatter",
        "mode": "lines",
        "name": name,
        "x": xs,
        "y": ys,
        "line": {"color": col, "width": 1.5, "dash": "dash"},
        "text": [name, name],
        "hovertemplate": "%{text}<extra></extra>",
    }


def figure(c: Chart) -> dict[str, Any]:
    """The plotly figure (data, layout, config) for one chart."""
    xaxis: dict[str, Any] = {"title": {"text": c.x_label}, "zeroline": False, "automargin": True}
    if c.x_ticks:
        xaxis.update(
            tickmode="array", tickvals=[t for t, _ in c.x_ticks], ticktext=[lb for _, lb in c.x_ticks]
        )
    yaxis: dict[str, Any] = {"title": {"text": c.y_label}, "automargin": True, "zeroline": False}
    pos = _positive_ys(c)
    ticks = log_ticks(min(pos), max(pos)) if pos else []
    log = {"type": "log", "tickmode": "array", "tickvals": ticks, "ticktext": [_tick(t) for t in ticks]}
    linear = {"type": "linear", "tickmode": "auto", "rangemode": "tozero"}
    yaxis.update(log if c.log_default else linear)
    layout: dict[str, Any] = {
        "height": c.height,
        "autosize": True,
        # A fixed right margin holds the legend: the plot areas of all charts line up.
        "margin": {"l": 64, "r": 280, "t": 40 if c.log_switch else 16, "b": 50},
        "font": {"family": FONT, "size": 12, "color": "#333"},
        "paper_bgcolor": "#fff",
        "plot_bgcolor": "#fafafa",
        "xaxis": xaxis,
        "yaxis": yaxis,
        "hovermode": "x unified" if c.unified_hover else "closest",
        "legend": {"x": 1.01, "xanchor": "left", "y": 1, "yanchor": "top"},
    }
    if c.log_switch:
        layout["updatemenus"] = [
            {
                "type": "buttons",
                "direction": "right",
                "showactive": True,
                "active": 1 if c.log_default else 0,
                "x": 0,
                "xanchor": "left",
                "y": 1.01,
                "yanchor": "bottom",
                "pad": {"t": 0, "b": 2},
                "buttons": [
                    {"label": "linear", "method": "relayout", "args": [_dotted("yaxis", linear)]},
                    {"label": "log scale", "method": "relayout", "args": [_dotted("yaxis", log)]},
                ],
            }
        ]
    config = {
        "responsive": True,
        "displaylogo": False,
        "showSendToCloud": False,  # plotly.js 3 offers to upload the chart by default: never from a report
        "modeBarButtonsToRemove": ["select2d", "lasso2d"],
    }
    return {"data": _traces(c), "layout": layout, "config": config}


def _dotted(axis: str, attrs: dict[str, Any]) -> dict[str, Any]:
    return {f"{axis}.{k}": v for k, v in attrs.items()}


def render(c: Chart) -> str:
    """A `<figure>`: caption, the plot's container and its figure JSON (drawn by page_script)."""
    fid = f' id="{escape(c.fig_id)}"' if c.fig_id else ""
    head = f'<figure class="chart"{fid}><figcaption>{escape(c.title)}</figcaption>'
    if not any(y is not None for s in c.series for y in s.ys) and not c.bands:
        return head + '<p class="nodata">no data</p></figure>'
    blob = orjson.dumps(figure(c), option=orjson.OPT_SERIALIZE_NUMPY).replace(b"</", b"<\\/").decode()
    return head + f'<div class="plot"></div><script type="application/json">{blob}</script></figure>'


BOOT = """
document.querySelectorAll('figure.chart').forEach(function (f) {
  var spec = f.querySelector('script[type="application/json"]');
  if (!spec) return;
  var fig = JSON.parse(spec.textContent);
  Plotly.newPlot(f.querySelector('div.plot'), fig.data, fig.layout, fig.config);
});
"""


def page_script() -> str:
    """plotly.js (from the installed plotly package: offline) and the code that draws each figure."""
    from plotly.offline import get_plotlyjs

    return f"<script>{get_plotlyjs()}</script><script>{BOOT}</script>"


def percentile_axis(n: int, limit: float = 5.0) -> tuple[float, list[tuple[float, str]]]:
    """The HdrHistogram percentile plot's x axis, -log10(1 - p): its right end for n samples and
    its ticks (0%, 90%, 99%, ...)."""
    top = min(limit, math.log10(n)) if n > 1 else 0.0
    names = [(0.0, "0%"), (math.log10(2), "50%"), (math.log10(4), "75%"), (1.0, "90%")]
    names += [(math.log10(20), "95%"), (2.0, "99%"), (3.0, "99.9%"), (4.0, "99.99%"), (5.0, "99.999%")]
    return top, [t for t in names if t[0] <= max(1.0, math.ceil(top))]
