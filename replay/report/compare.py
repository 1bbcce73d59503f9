"""`replay compare A B`: two runs side by side, and a regression verdict for CI gates.

A is the baseline, B the candidate. Thresholds are `NAME=LIMIT` pairs:
  latency `METRIC_STAT` (ttft_p99, itl_p50, e2e_intended_p99.9, ...): B may exceed A by LIMIT,
      relative (`10%`) or absolute (`20ms`, `0.1s`);
  throughput `req_s`, `output_tok_s`, and for capacity directories `max_slo_rate`, `goodput`:
      B may fall short of A by LIMIT (relative `%`, or absolute in the figure's own unit);
  `error_rate`: B may exceed A by LIMIT percentage points (`1%`).
Without --threshold the defaults below apply; with it, only the thresholds given are checked.
Exit code 1 on any regression, 0 otherwise. A metric missing from either run is reported, never
counted as a pass: it is a regression when a threshold names it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from replay.capacity.slo import STATS
from replay.core.errors import ReplayError
from replay.stats.recorder import LATENCY_METRICS

DEFAULT_RUN = "ttft_p99=10%,itl_p99=10%,e2e_p99=10%,req_s=10%,error_rate=1%"
DEFAULT_CAPACITY = "max_slo_rate=10%,goodput=10%"
HIGHER_BETTER = {"req_s", "output_tok_s", "max_slo_rate", "goodput"}
SHOWN = ("ttft_p50", "ttft_p99", "ttft_intended_p99", "itl_p50", "itl_p99", "tpot_p50", "e2e_p50", "e2e_p99")
_LIMIT = re.compile(r"^([0-9]*\.?[0-9]+)\s*(%|ms|s|us)?$")


@dataclass(frozen=True, slots=True)
class Threshold:
    name: str
    value: float
    relative: bool  # value is a fraction of A; else absolute in base units (s, req/s, fraction)

    def allowed(self, a: float) -> float:
        return abs(a) * self.value if self.relative else self.value


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    a: float | None
    b: float | None
    unit: str
    threshold: str | None
    regressed: bool
    note: str = ""


def parse_thresholds(text: str) -> list[Threshold]:
    out = []
    for raw in text.split(","):
        part = raw.strip().lower()
        if not part:
            continue
        name, sep, limit = part.partition("=")
        name = name.strip()
        m = _LIMIT.match(limit.strip())
        if not sep or m is None:
            raise ReplayError(f"--threshold: {part!r}: expected NAME=LIMIT, e.g. ttft_p99=10% or itl_p99=5ms")
        num, unit = float(m[1]), m[2] or ""
        kind = _kind(name)
        if kind is None:
            raise ReplayError(
                f"--threshold: {name!r}: unknown figure (METRIC_STAT such as ttft_p99, or req_s, "
                "output_tok_s, error_rate, max_slo_rate, goodput)"
            )
        if unit == "%":
            if kind == "error_rate":
                out.append(Threshold(name, num / 100, relative=False))
            else:
                out.append(Threshold(name, num / 100, relative=True))
        elif kind == "latency":
            if not unit:
                raise ReplayError(f"--threshold: {part!r}: give % or a time unit (ms, s, us)")
            out.append(Threshold(name, num * {"ms": 1e-3, "s": 1.0, "us": 1e-6}[unit], relative=False))
        elif unit:
            raise ReplayError(f"--threshold: {part!r}: {name} takes % or a bare number, not {unit}")
        else:
            out.append(Threshold(name, num, relative=False))
    return out


def _kind(name: str) -> str | None:
    if name in HIGHER_BETTER:
        return "higher"
    if name == "error_rate":
        return "error_rate"
    metric, _, stat = name.rpartition("_")
    if metric in LATENCY_METRICS and stat in STATS:
        return "latency"
    return None


def _load(path: Path) -> tuple[str, dict[str, Any]]:
    if (path / "capacity.json").is_file():
        return "capacity", orjson.loads((path / "capacity.json").read_bytes())
    if (path / "summary.json").is_file():
        return "run", orjson.loads((path / "summary.json").read_bytes())
    raise ReplayError(f"{path}: no summary.json or capacity.json (not a replay run directory)")


def figure(kind: str, doc: dict[str, Any], name: str) -> float | None:
    """One comparable figure in base units: seconds, req/s, or a fraction."""
    if kind == "capacity":
        r = doc.get("result", {})
        if name == "max_slo_rate":
            return r.get("max_slo_rate_req_s")
        if name == "goodput":
            return r.get("goodput_at_max_req_s")
        base = (doc.get("baseline") or {}).get("latency_ms", {})
        metric, _, stat = name.rpartition("_")
        v = base.get(metric, {}).get(stat)
        return None if v is None else v / 1000
    if name in ("req_s", "output_tok_s"):
        return doc["throughput"].get(name)
    if name == "error_rate":
        c = doc["counts"]
        failed = sum(c["errors"].values()) + c.get("unfinished", 0) + sum(c["not_sent"].values())
        return failed / c["scheduled"] if c["scheduled"] else None
    metric, _, stat = name.rpartition("_")
    v = doc["metrics"].get(metric, {}).get(stat)
    return None if v is None else v / 1000


def compare(a_dir: Path, b_dir: Path, thresholds: str | None = None) -> list[Row]:
    ka, a = _load(a_dir)
    kb, b = _load(b_dir)
    if ka != kb:
        raise ReplayError(f"compare: {a_dir} is a {ka} directory but {b_dir} is a {kb} directory")
    checks = parse_thresholds(thresholds or (DEFAULT_CAPACITY if ka == "capacity" else DEFAULT_RUN))
    rows: list[Row] = []
    for t in checks:
        va, vb = figure(ka, a, t.name), figure(kb, b, t.name)
        unit = _unit(t.name)
        shown = f"{t.value * 100:g}%" if t.relative or t.name == "error_rate" else _show(t.value, unit)
        if va is None or vb is None:
            rows.append(Row(t.name, va, vb, unit, shown, True, "missing in " + ("A" if va is None else "B")))
            continue
        higher = _kind(t.name) == "higher"
        regressed = vb < va - t.allowed(va) if higher else vb > va + t.allowed(va)
        rows.append(Row(t.name, va, vb, unit, shown, regressed))
    named = {t.name for t in checks}
    extra = ("max_slo_rate", "goodput", "ttft_p50", "e2e_p50") if ka == "capacity" else SHOWN
    for name in extra:
        if name not in named:
            rows.append(Row(name, figure(ka, a, name), figure(kb, b, name), _unit(name), None, False))
    for label, doc, kind in (("A", a, ka), ("B", b, kb)):
        if kind == "run" and not doc["selfcheck"]["trustworthy"]:
            rows.append(
                Row(f"{label} generator", None, None, "", None, False, "fell behind: latencies suspect")
            )
    return rows


def _unit(name: str) -> str:
    if name in HIGHER_BETTER:
        return "req/s" if name != "output_tok_s" else "tok/s"
    return "%" if name == "error_rate" else "ms"


def _show(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "ms":
        return f"{v * 1000:.2f} ms"
    if unit == "%":
        return f"{v * 100:.2f}%"
    return f"{v:.4g} {unit}"


def format_rows(rows: list[Row], a_dir: Path, b_dir: Path) -> str:
    lines = [f"A = {a_dir}", f"B = {b_dir}", ""]
    lines.append(f"{'figure':<20}{'A':>14}{'B':>14}{'change':>10}{'limit':>12}  verdict")
    for r in rows:
        change = "-"
        if r.a is not None and r.b is not None and r.a != 0:
            change = f"{(r.b - r.a) / abs(r.a) * 100:+.1f}%"
        verdict = "REGRESSION" if r.regressed else ("ok" if r.threshold else "")
        if r.note:
            verdict = (verdict + " " + r.note).strip()
        lines.append(
            f"{r.name:<20}{_show(r.a, r.unit):>14}{_show(r.b, r.unit):>14}{change:>10}"
            f"{r.threshold or '':>12}  {verdict}"
        )
    bad = [r.name for r in rows if r.regressed]
    lines.append("")
    lines.append(f"verdict: REGRESSION in {', '.join(bad)}" if bad else "verdict: no regression")
    return "\n".join(lines)
