"""Per-class figures of a tenant/adapter mix (`--classes`, replay.schedule.classes): every class's
counts and latencies apart, and its own SLO judged on its own histograms. A mix's overall p99 can
hold while one tenant's breaks; the overall figures stay, these sit beside them.

The recorder puts each main-load request of a class into histograms named `class.<name>.<metric>`
(made the first time the class is seen, so a run without classes holds none); they merge across
workers like any other (decode-add by name). Probe requests are never a class's.
"""

from __future__ import annotations

from typing import Any

from hdrh.histogram import HdrHistogram

from replay.core.errors import ReplayError
from replay.stats import histogram as H
from replay.stats.recorder import CLASS_METRICS, class_metric
from replay.stats.slo import ERROR_RATE, parse_slo


def class_problems(mix: Any, source: str) -> list[str]:
    """A class SLO that does not parse, or bounds a metric not measured per class: one line each."""
    out = []
    for c in mix:
        if not c.slo:
            continue
        try:
            slo = parse_slo(c.slo)
        except ReplayError as exc:
            out.append(f"{source}: class {c.name!r}: slo: {exc}")
            continue
        bad = [b.text for b in slo.bounds if b.metric != ERROR_RATE and b.metric not in CLASS_METRICS]
        if bad:
            out.append(f"{source}: class {c.name!r}: slo: {bad[0]!r}: per class only "
                       f"{', '.join(CLASS_METRICS)} and error_rate are measured")  # fmt: skip
    return out


def class_hists(hists: dict[str, HdrHistogram], name: str) -> dict[str, HdrHistogram]:
    """One class's histograms under the plain metric names (an empty one where none was recorded)."""
    return {m: hists.get(class_metric(name, m)) or H.new() for m in CLASS_METRICS}


def classes_section(hists: dict[str, HdrHistogram], mix: list[dict[str, Any]], scheduled: dict[str, int],
                    ok: dict[str, int], failed: dict[str, int]) -> list[dict[str, Any]]:  # fmt: skip
    """summary.json's "classes": one row per class of the mix (config order): its configured share and
    model, the share it drew, its counts, latencies (ms) and, if it has an SLO, the verdict on its own
    histograms (`failed` = errors + not sent, for error_rate)."""
    total = sum(scheduled.values())
    rows = []
    for c in mix:
        name = c["name"]
        n = scheduled.get(name, 0)
        h = class_hists(hists, name)
        row: dict[str, Any] = {
            "name": name,
            "model": c.get("model"),
            "share": round(c["share"], 6),
            "share_drawn": round(n / total, 6) if total else None,
            "scheduled": n,
            "ok": ok.get(name, 0),
            "not_ok": n - ok.get(name, 0),
            "failed": failed.get(name, 0),
            "metrics": {m: H.summary_ms(h[m]) for m in CLASS_METRICS},
            "slo": c.get("slo"),
            "slo_held": None,
        }
        if c.get("slo"):
            verdict = parse_slo(c["slo"]).evaluate(h, n, failed.get(name, 0))
            row["slo_held"] = verdict.passed
            row["slo_failures"] = verdict.failures()
        rows.append(row)
    return rows


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def classes_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The console table's per-class block."""
    if not rows:
        return []
    out = [f"{'class':<12}{'share':>7}{'drawn':>7}{'sched':>7}{'ok':>7}{'TTFT p50':>10}{'p99':>9}"
           f"{'ITL p50':>9}{'p99':>8}{'E2E p50':>10}{'p99':>10}  SLO  (ms; model)"]  # fmt: skip
    for r in rows:
        m = r["metrics"]
        slo = "-" if r["slo_held"] is None else ("held" if r["slo_held"] else "BROKEN")
        drawn = "-" if r["share_drawn"] is None else f"{r['share_drawn']:.3f}"
        out.append(
            f"{r['name'][:12]:<12}{r['share']:>7.3f}{drawn:>7}{r['scheduled']:>7}{r['ok']:>7}"
            f"{_ms(m['ttft']['p50']):>10}{_ms(m['ttft']['p99']):>9}{_ms(m['itl']['p50']):>9}"
            f"{_ms(m['itl']['p99']):>8}{_ms(m['e2e']['p50']):>10}{_ms(m['e2e']['p99']):>10}  {slo}"
            f"  ({r['model'] or 'target model'})"
        )
        for f in r.get("slo_failures", []):
            out.append(f"  {r['name']}: SLO broken: {f}")
    return out
