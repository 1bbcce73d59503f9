"""The charts of one run (a single run, or a capacity step): percentile distributions from its
histograms, and its interval time series (rate, in flight, TTFT/ITL per interval, server metrics)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import orjson
from hdrh.histogram import HdrHistogram

from replay.report import figures as F

NAMED = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99.9", 99.9), ("p99.99", 99.99))


def percentile_series(h: HdrHistogram, name: str, scale: float = 1e-3) -> list[F.Series]:
    """Latency at percentile p against -log10(1 - p) (the HdrHistogram percentile plot), with the
    named percentiles and the max marked: the whole tail, every point's value on hover."""
    n = h.get_total_count()
    top, _ = F.percentile_axis(n)
    xs, ys, hover = [], [], []
    for i in range(0, 41):
        x = top * i / 40
        p = 100.0 * (1 - 10**-x)
        v = h.get_value_at_percentile(p) * scale
        xs.append(x)
        ys.append(v)
        hover.append(f"{name} p{p:.4g}: {F.fmt(v)} ms")
    nx, ny, nh = [], [], []
    for label, p in NAMED:
        x = -math.log10(1 - p / 100)
        if x <= top + 1e-9:
            v = h.get_value_at_percentile(p) * scale
            nx.append(x)
            ny.append(v)
            nh.append(f"{name} {label}: {F.fmt(v)} ms")
    v = h.get_max_value() * scale
    nx.append(top)
    ny.append(v)
    nh.append(f"{name} max: {F.fmt(v)} ms (of {n} samples)")
    return [
        F.Series(name, xs, ys, hover=hover, color="#1f77b4"),
        F.Series("named percentiles, max", nx, ny, hover=nh, color="#d62728", line=False),
    ]


def distribution_charts(hists: dict[str, HdrHistogram], what: str, fig: str) -> list[str]:
    out = []
    for metric, label in (("ttft", "TTFT"), ("ttft_intended", "TTFT from intended"), ("itl", "ITL")):
        if metric not in hists:
            continue
        _, ticks = F.percentile_axis(hists[metric].get_total_count())
        chart = F.Chart(
            f"{label} percentile distribution — {what}",
            "percentile",
            "ms",
            series=percentile_series(hists[metric], label),
            x_ticks=ticks,
            y_unit="ms",
            log_switch=True,
            fig_id=f"{fig}-{metric}",
        )
        out.append(F.render(chart))
    return out


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [orjson.loads(x) for x in path.read_bytes().splitlines() if x.strip()]


def timeseries_charts(run_dir: Path, what: str, fig: str) -> list[str]:
    rows = _read_jsonl(run_dir / "timeseries.jsonl")
    t = [r["t_s"] for r in rows]
    # A rate over the last, partial interval (often a few ms) is true but reads as a spike.
    full = statistics.median([r["interval_s"] for r in rows]) if rows else 0.0
    rate = [r.get("req_s") if r.get("interval_s", 0) >= 0.5 * full else None for r in rows]
    load = F.Chart(
        f"Rate and in-flight over time — {what}",
        "seconds from start",
        "req/s, requests",
        series=[
            F.Series("completed req/s", t, rate),
            F.Series("in flight", t, [r.get("in_flight") for r in rows]),
            F.Series("waiting for cap", t, [r.get("waiting_for_cap") for r in rows], dash="dash"),
        ],
        x_unit="s",
        unified_hover=True,
        fig_id=f"{fig}-rate",
    )
    lat = F.Chart(
        f"TTFT and ITL per interval — {what}",
        "seconds from start",
        "ms",
        series=[
            F.Series("TTFT p50", t, [r.get("ttft_p50_ms") for r in rows]),
            F.Series("TTFT p99", t, [r.get("ttft_p99_ms") for r in rows]),
            F.Series("ITL p99", t, [r.get("itl_p99_ms") for r in rows], dash="dash"),
            *(  # the probe stream's (--probe-rate) beside the load's
                [F.Series("probe TTFT p99", t, [r.get("probe_ttft_p99_ms") for r in rows], dash="dot")]
                if any(r.get("probe_ttft_p99_ms") is not None for r in rows)
                else []
            ),
        ],
        x_unit="s",
        y_unit="ms",
        log_switch=True,
        unified_hover=True,
        fig_id=f"{fig}-latency",
    )
    server = sorted({k for r in rows for k, v in r.items() if k.startswith("server.") and _num(v)})
    varying = [k for k in server if len({r.get(k) for r in rows}) > 1][:6]
    srv = F.Chart(
        f"Server metrics — {what}" + ("" if varying else " (none scraped)"),
        "seconds from start",
        "value",
        series=[F.Series(k[7:], t, [r.get(k) if _num(r.get(k)) else None for r in rows]) for k in varying],
        x_unit="s",
        unified_hover=True,
        fig_id=f"{fig}-server",
    )
    return [F.render(load), F.render(lat), F.render(srv)]


def _num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
