"""The capacity report's load curves: latency and goodput against offered rate, and the
closed-loop probe's throughput and latency against concurrency (inline SVG via svgplot)."""

from __future__ import annotations

import statistics
from typing import Any

from replay.capacity.slo import parse_slo
from replay.report import svgplot as P

SLO_COLOR = "#d62728"
MAX_COLOR = "#2ca02c"


def _by_rate(steps: list[dict[str, Any]], metric: str, stat: str) -> tuple[list[float], list[float | None]]:
    rates = sorted({s["rate_req_s"] for s in steps})
    ys: list[float | None] = []
    for r in rates:
        vals = [s["latency_ms"][metric][stat] for s in steps if s["rate_req_s"] == r]
        vals = [v for v in vals if v is not None]
        ys.append(statistics.median(vals) if vals else None)
    return rates, ys


def latency_vs_load(doc: dict[str, Any], metric: str, label: str) -> str:
    steps = doc["steps"]
    rates, p50 = _by_rate(steps, metric, "p50")
    _, p99 = _by_rate(steps, metric, "p99")
    passed = {r: all(s["passed"] for s in steps if s["rate_req_s"] == r) for r in rates}
    band_x = [r for r, a, b in zip(rates, p50, p99, strict=True) if a is not None and b is not None]
    band_lo = [a for a, b in zip(p50, p99, strict=True) if a is not None and b is not None]
    band_hi = [b for a, b in zip(p50, p99, strict=True) if a is not None and b is not None]
    slo = parse_slo(doc["slo"])
    hlines = [
        (b.value * 1000, f"SLO {b.text}", SLO_COLOR) for b in slo.bounds if b.metric == metric and b.upper
    ]
    res = doc.get("result", {})
    vlines = []
    if res.get("max_slo_rate_req_s"):
        vlines.append((res["max_slo_rate_req_s"], f"max SLO rate {res['max_slo_rate_req_s']:.3g}", MAX_COLOR))
    if res.get("knee"):
        vlines.append((res["knee"]["rate_req_s"], "knee", "#9467bd"))
    # Past saturation latency explodes; clip so the region that matters stays readable.
    ok99 = [y for r, y in zip(rates, p99, strict=True) if y is not None and passed[r]]
    cands = ([1.5 * max(ok99)] if ok99 else []) + [2.5 * y for y, _, _ in hlines]
    cap = max(cands, default=None)
    chart = P.Chart(
        f"{label} vs offered load (p50–p99 band; dots: step verdict)",
        "offered rate (req/s)",
        "ms",
        series=[
            P.Series("p50", rates, p50, color="#1f77b4"),
            P.Series(
                "p99", rates, p99, color="#ff7f0e", markers=[P.PASS if passed[r] else P.FAIL for r in rates]
            ),
        ],
        bands=[P.Band("p50–p99", band_x, band_lo, band_hi, color="#1f77b4")],
        hlines=hlines,
        vlines=vlines,
        y_max=cap,
        fig_id=f"latency-vs-load-{metric}",
    )
    return P.render(chart)


def goodput_chart(doc: dict[str, Any]) -> str:
    steps = doc["steps"]
    rates = sorted({s["rate_req_s"] for s in steps})

    def med(key: str, r: float) -> float | None:
        vals = [v for s in steps if s["rate_req_s"] == r for v in [_get(s, key)] if v is not None]
        return statistics.median(vals) if vals else None

    chart = P.Chart(
        "Goodput vs offered load (requests/s meeting every per-request SLO)",
        "offered rate (req/s)",
        "req/s",
        series=[
            P.Series("offered", rates, rates, color="#999", dash="5 4"),
            P.Series("achieved", rates, [med("achieved_req_s", r) for r in rates], color="#1f77b4"),
            P.Series("goodput", rates, [med("goodput.goodput_req_s", r) for r in rates], color="#2ca02c"),
        ],
        fig_id="goodput",
    )
    return P.render(chart)


def _get(d: dict[str, Any], dotted: str) -> Any:
    for k in dotted.split("."):
        d = d.get(k) if isinstance(d, dict) else None  # type: ignore[assignment]
    return d


def probe_chart(doc: dict[str, Any]) -> str:
    probe = doc["probe"]
    cs = [lv["concurrency"] for lv in probe]
    chart = P.Chart(
        "Closed loop: throughput vs concurrency",
        "concurrent streams",
        "req/s",
        series=[
            P.Series(
                "throughput",
                cs,
                [lv["throughput_req_s"] for lv in probe],
                markers=[P.PASS if lv["slo_met"] else P.FAIL for lv in probe],
            )
        ],
        fig_id="throughput-vs-concurrency",
    )
    lat = P.Chart(
        "Closed loop: latency vs concurrency (p50)",
        "concurrent streams",
        "ms",
        series=[
            P.Series(m, cs, [lv["latency_ms"][m]["p50"] for lv in probe]) for m in ("ttft", "tpot", "e2e")
        ],
        fig_id="latency-vs-concurrency",
    )
    return P.render(chart) + P.render(lat)
