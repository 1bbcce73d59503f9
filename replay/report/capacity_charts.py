"""The capacity report's load curves: latency and goodput against offered rate, and the
closed-loop probe's throughput and latency against concurrency (interactive, via figures)."""

from __future__ import annotations

import statistics
from typing import Any

from replay.capacity.slo import parse_slo
from replay.report import figures as F

SLO_COLOR = "#d62728"
MAX_COLOR = "#2ca02c"
CI_COLOR = "#98df8a"


def _by_rate(steps: list[dict[str, Any]], metric: str, stat: str) -> tuple[list[float], list[float | None]]:
    rates = sorted({s["rate_req_s"] for s in steps})
    ys: list[float | None] = []
    for r in rates:
        vals = [s["latency_ms"][metric].get(stat) for s in steps if s["rate_req_s"] == r]
        vals = [v for v in vals if v is not None]
        ys.append(statistics.median(vals) if vals else None)
    return rates, ys


VERDICT_COLOR = {"PASS": F.PASS, "FAIL": F.FAIL, "UNDECIDED": "#e6a100", "UNTRUSTED": "#888888"}


def rate_verdict(steps: list[dict[str, Any]]) -> str:
    """The verdict of the steps run at one rate: a step's `verdict` where the search gives one
    (pass, fail, undecided, untrusted), else its `passed`."""
    vs = [
        s.get("verdict") if isinstance(s.get("verdict"), str) else ("pass" if s["passed"] else "fail")
        for s in steps
    ]
    for v in ("fail", "untrusted", "undecided"):
        if v in vs:
            return v.upper()
    return "PASS"


def latency_vs_load(doc: dict[str, Any], metric: str, label: str) -> str:
    """p50, p99 and max per offered rate, the p50-p99 band, verdict-coloured p99 dots. The whole tail
    is drawn (no clipping): past saturation it explodes, so the log view is the default."""
    steps = doc["steps"]
    rates, p50 = _by_rate(steps, metric, "p50")
    _, p99 = _by_rate(steps, metric, "p99")
    _, top = _by_rate(steps, metric, "max")
    both = [(r, a, b) for r, a, b in zip(rates, p50, p99, strict=True) if a is not None and b is not None]
    slo = parse_slo(doc["slo"])
    hlines = [
        (b.value * 1000, f"SLO {b.text}", SLO_COLOR) for b in slo.bounds if b.metric == metric and b.upper
    ]
    res = doc.get("result", {})
    vlines = []
    if res.get("max_slo_rate_req_s"):
        vlines.append((res["max_slo_rate_req_s"], "max SLO rate", MAX_COLOR))
        for end, name in zip(res.get("interval_req_s") or [], ("low", "high"), strict=False):
            if end:
                vlines.append((end, f"its 95% CI, {name} end", CI_COLOR))
    if res.get("knee"):
        vlines.append((res["knee"]["rate_req_s"], "knee", "#9467bd"))
    verdict = [rate_verdict([s for s in steps if s["rate_req_s"] == r]) for r in rates]
    p99_hover = [
        f"p99: {F.fmt(y)} ms at {F.fmt(r)} req/s, step {v}" if y is not None else ""
        for r, y, v in zip(rates, p99, verdict, strict=True)
    ]
    chart = F.Chart(
        f"{label} vs offered load (p50–p99 band, max; dots: step verdict)",
        "offered rate (req/s)",
        "ms",
        series=[
            F.Series("p50", rates, p50, color="#1f77b4"),
            F.Series("max", rates, top, color="#8c564b", dash="dot"),  # drawn under the p99 dots
            F.Series(
                "p99",
                rates,
                p99,
                color="#ff7f0e",
                hover=p99_hover,
                markers=[VERDICT_COLOR.get(v, F.FAIL) for v in verdict],
            ),
        ],
        bands=[
            F.Band("p50–p99", [b[0] for b in both], [b[1] for b in both], [b[2] for b in both], "#1f77b4")
        ],
        hlines=hlines,
        vlines=vlines,
        x_unit="req/s",
        y_unit="ms",
        log_switch=True,
        log_default=True,
        unified_hover=True,
        fig_id=f"latency-vs-load-{metric}",
    )
    return F.render(chart)


def goodput_chart(doc: dict[str, Any]) -> str:
    steps = doc["steps"]
    rates = sorted({s["rate_req_s"] for s in steps})

    def med(key: str, r: float) -> float | None:
        vals = [v for s in steps if s["rate_req_s"] == r for v in [_get(s, key)] if v is not None]
        return statistics.median(vals) if vals else None

    chart = F.Chart(
        "Goodput vs offered load (requests/s meeting every per-request SLO)",
        "offered rate (req/s)",
        "req/s",
        series=[
            F.Series("offered", rates, rates, color="#999", dash="dash"),
            F.Series("achieved", rates, [med("achieved_req_s", r) for r in rates], color="#1f77b4"),
            F.Series("goodput", rates, [med("goodput.goodput_req_s", r) for r in rates], color="#2ca02c"),
        ],
        x_unit="req/s offered",
        y_unit="req/s",
        unified_hover=True,
        fig_id="goodput",
    )
    return F.render(chart)


def _get(d: dict[str, Any], dotted: str) -> Any:
    for k in dotted.split("."):
        d = d.get(k) if isinstance(d, dict) else None  # type: ignore[assignment]
    return d


def probe_chart(doc: dict[str, Any]) -> str:
    probe = doc["probe"]
    cs = [lv["concurrency"] for lv in probe]
    tput = [lv["throughput_req_s"] for lv in probe]
    chart = F.Chart(
        "Closed loop: throughput vs concurrency (dots: SLO met / missed)",
        "concurrent streams",
        "req/s",
        series=[
            F.Series(
                "throughput",
                cs,
                tput,
                markers=[F.PASS if lv["slo_met"] else F.FAIL for lv in probe],
                hover=[
                    f"throughput: {F.fmt(x)} req/s at {c} streams, SLO {'met' if lv['slo_met'] else 'missed'}"
                    for c, x, lv in zip(cs, tput, probe, strict=True)
                ],
            )
        ],
        x_ticks=[(c, str(c)) for c in cs],
        x_unit="streams",
        fig_id="throughput-vs-concurrency",
    )
    lat = F.Chart(
        "Closed loop: latency vs concurrency (p50)",
        "concurrent streams",
        "ms",
        series=[
            F.Series(f"{m.upper()} p50", cs, [lv["latency_ms"][m]["p50"] for lv in probe])
            for m in ("ttft", "tpot", "e2e")
        ],
        x_ticks=[(c, str(c)) for c in cs],
        x_unit="streams",
        y_unit="ms",
        log_switch=True,
        unified_hover=True,
        fig_id="latency-vs-concurrency",
    )
    return F.render(chart) + F.render(lat)
