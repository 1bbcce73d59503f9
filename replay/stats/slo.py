"""Service-level objectives: parse, check against a run's histograms, and count goodput per request.

An SLO string is comma-separated bounds, `METRIC_STAT OP VALUE[UNIT]`:
    ttft_p99<=500ms, itl_p99<=50ms, e2e_intended_p90<=2s, output_tps_p50>=20, error_rate<=1%
METRIC is any recorded metric (`replay.stats.recorder.METRICS`; `_corrected` is accepted for `_intended`),
STAT one of p50 p90 p95 p99 p99.9 max mean. Latencies need a unit (us, ms, s); `output_tps` is
tokens/s (bare or `tok/s`); `error_rate` is a bare fraction or a percentage and takes no STAT.

Aggregate check: the STAT of the run's (or window's) HDR histogram against VALUE.

Per-request check (goodput, attainment): a request meets a bound when its *own* value does. For
single-valued metrics (TTFT, TPOT, E2E, lags, tokens/s) that is the value itself, whatever STAT
the bound names. ITL has many samples per request, so a request meets `itl_pXX<=V` when its own
pXX ITL (nearest rank over its own gaps, stored as `itl_s` in requests.jsonl) is <= V, its own max
for `itl_max` and its mean gap for `itl_mean`: the same statistic, applied to one user's stream.
A request with no sample of a metric (one output token has no ITL/TPOT) is not judged on it.
Errors and not-sent requests never meet the SLO; `error_rate` is (errors + not sent) / scheduled.

Contradictions are refused: a lower and an upper bound on one metric that no distribution can
satisfy together, given that p_a <= p_b for a <= b and every stat <= max
(e.g. `ttft_p99<=100ms,ttft_p50>=200ms`). Two upper bounds at different stats (p50<=600ms beside
p99<=500ms) are redundant, not contradictory, and accepted; the same bound given twice is refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from hdrh.histogram import HdrHistogram

from replay.core.errors import ReplayError
from replay.core.request import ITL_STATS, OK
from replay.stats.recorder import LATENCY_METRICS, METRICS, RATE_METRICS

STATS: dict[str, float | None] = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p99.9": 99.9}
STATS.update({"max": None, "mean": None})
ERROR_RATE = "error_rate"
_TIME_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}
_TERM = re.compile(
    r"^(?P<metric>[a-z][a-z0-9_]*?)(?:_(?P<stat>p\d+(?:\.\d+)?|max|mean))?\s*(?P<op><=|>=|<|>|==|=)\s*"
    r"(?P<num>[0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*(?P<unit>[a-zµ%/]*)$"
)


@dataclass(frozen=True, slots=True)
class Bound:
    """One bound. `value` is in base units: seconds, tokens/s, or a fraction for error_rate."""

    metric: str
    stat: str | None
    op: str
    value: float
    text: str

    @property
    def upper(self) -> bool:
        return self.op in ("<=", "<")

    def holds(self, x: float) -> bool:
        v = self.value
        return {"<=": x <= v, "<": x < v, ">=": x >= v, ">": x > v}[self.op]

    def display(self, x: float | None) -> str:
        """A measured value in the bound's reading units (ms, tok/s, %)."""
        if x is None:
            return "-"
        if self.metric == ERROR_RATE:
            return f"{x * 100:.2f}%"
        if self.metric in RATE_METRICS:
            return f"{x:.1f} tok/s"
        return f"{x * 1000:.1f} ms"


@dataclass(frozen=True, slots=True)
class Check:
    bound: str
    measured: float | None
    shown: str
    ok: bool


@dataclass(frozen=True, slots=True)
class Verdict:
    passed: bool
    checks: tuple[Check, ...]

    def failures(self) -> list[str]:
        return [f"{c.bound} (measured {c.shown})" for c in self.checks if not c.ok]

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "checks": [
                {"bound": c.bound, "measured": c.measured, "shown": c.shown, "ok": c.ok} for c in self.checks
            ],
        }


@dataclass(frozen=True, slots=True)
class Slo:
    bounds: tuple[Bound, ...]
    text: str

    def latency_metrics(self) -> list[str]:
        return [b.metric for b in self.bounds if b.metric in LATENCY_METRICS]

    def evaluate(self, hists: dict[str, HdrHistogram], scheduled: int, failed: int) -> Verdict:
        """Aggregate verdict. `failed` = errors + not sent among `scheduled`."""
        checks = []
        for b in self.bounds:
            if b.metric == ERROR_RATE:
                x: float | None = failed / scheduled if scheduled else None
            else:
                x = hist_stat(hists[b.metric], b.metric, b.stat or "max")
            ok = x is not None and b.holds(x)
            checks.append(Check(b.text, x, b.display(x), ok))
        return Verdict(all(c.ok for c in checks), tuple(checks))

    def request_meets(self, line: dict[str, Any]) -> bool:
        """Per-request criterion on one requests.jsonl line (see the module docstring)."""
        if line.get("status") != OK:
            return False
        for b in self.bounds:
            if b.metric == ERROR_RATE:
                continue
            x = request_value(line, b.metric, b.stat or "max")
            if x is not None and not b.holds(x):
                return False
        return True


def hist_stat(h: HdrHistogram, metric: str, stat: str) -> float | None:
    """A statistic of one recorder histogram in base units (seconds, or tokens/s for rates)."""
    if h.get_total_count() == 0:
        return None
    scale = 1e-3 if metric in RATE_METRICS else 1e-6
    p = STATS[stat]
    if p is not None:
        return h.get_value_at_percentile(p) * scale
    if stat == "max":
        return h.get_max_value() * scale
    return h.get_mean_value() * scale


def _diff(a: Any, b: Any) -> float | None:
    return None if a is None or b is None else a - b


def request_value(line: dict[str, Any], metric: str, stat: str) -> float | None:
    """One request's own value of `metric` from its requests.jsonl line (seconds or tokens/s)."""
    ft, end, sent, intended = (
        line.get("first_token_s"),
        line.get("end_s"),
        line.get("sent_s"),
        line["intended_s"],
    )
    n = line.get("output_tokens") or 0
    if metric == "ttft":
        return _diff(ft, sent)
    if metric == "ttft_intended":
        return _diff(ft, intended)
    if metric == "e2e":
        return _diff(end, sent)
    if metric == "e2e_intended":
        return _diff(end, intended)
    if metric == "send_lag":
        return _diff(sent, intended)
    if metric == "dispatch_lag":
        return _diff(line.get("dispatch_s"), intended)
    if metric in ("tpot", "output_tps"):
        decode = _diff(end, ft)
        if decode is None or n < 2:
            return None
        if metric == "tpot":
            return decode / (n - 1)
        return (n - 1) / decode if decode > 0 else None
    if metric == "itl":
        stats = line.get("itl_s")
        if not stats:
            return None
        return stats[ITL_STATS.index(stat)]
    raise ReplayError(f"slo: no per-request value for metric {metric!r}")


# --- parsing ----------------------------------------------------------------------------------


def _canonical(metric: str) -> str:
    return metric[: -len("_corrected")] + "_intended" if metric.endswith("_corrected") else metric


def _parse_term(term: str) -> Bound:
    where = f"slo: {term!r}"
    m = _TERM.match(term)
    if m is None:
        raise ReplayError(f"{where}: expected METRIC_STAT<=VALUE, e.g. ttft_p99<=500ms or error_rate<=1%")
    metric, stat, op, num, unit = (m[k] for k in ("metric", "stat", "op", "num", "unit"))
    metric = _canonical(metric)
    if op in ("=", "=="):
        raise ReplayError(f"{where}: use <=, <, >= or > (an SLO is a bound, not an equality)")
    value = float(num)
    if metric == ERROR_RATE:
        if stat is not None:
            raise ReplayError(f"{where}: error_rate takes no statistic (write error_rate<=1%)")
        if not op.startswith("<"):
            raise ReplayError(f"{where}: error_rate takes an upper bound (<= or <)")
        if unit not in ("", "%"):
            raise ReplayError(f"{where}: unknown unit {unit!r} for error_rate (use % or a fraction)")
        value = value / 100 if unit == "%" else value
        if not 0 <= value <= 1:
            raise ReplayError(f"{where}: error_rate must lie between 0 and 100%")
        return Bound(metric, None, op, value, term)
    if metric not in METRICS:
        known = ", ".join((*METRICS, ERROR_RATE))
        raise ReplayError(f"{where}: unknown metric {metric!r} (known: {known}; _corrected = _intended)")
    if stat is None:
        raise ReplayError(f"{where}: name a statistic, e.g. {metric}_p99 (one of {', '.join(STATS)})")
    if stat not in STATS:
        raise ReplayError(f"{where}: unknown statistic {stat!r} (one of {', '.join(STATS)})")
    if metric in RATE_METRICS:
        if unit not in ("", "tok/s"):
            raise ReplayError(f"{where}: unknown unit {unit!r} for {metric} (tokens/s: bare or tok/s)")
    else:
        if not unit:
            raise ReplayError(f"{where}: a latency needs a unit (us, ms or s)")
        if unit not in _TIME_UNITS:
            raise ReplayError(f"{where}: unknown unit {unit!r} (use us, ms or s)")
        value *= _TIME_UNITS[unit]
    if not (math.isfinite(value) and value > 0):
        raise ReplayError(f"{where}: the bound must be a positive number")
    return Bound(metric, stat, op, value, term)


def _always_le(a: str, b: str) -> bool:
    """True when stat `a` <= stat `b` for every distribution."""
    if a == b or b == "max":
        return True
    pa, pb = STATS[a], STATS[b]
    return pa is not None and pb is not None and pa <= pb


def _check_consistent(bounds: list[Bound]) -> None:
    seen: dict[tuple[str, str | None, bool], Bound] = {}
    for b in bounds:
        key = (b.metric, b.stat, b.upper)
        if key in seen:
            raise ReplayError(
                f"slo: {b.text!r}: {b.metric} {b.stat or ''} is bounded twice ({seen[key].text!r})"
            )
        seen[key] = b
    for lo in (b for b in bounds if not b.upper):
        for hi in (b for b in bounds if b.upper and b.metric == lo.metric):
            assert lo.stat is not None and hi.stat is not None
            if not _always_le(lo.stat, hi.stat):
                continue
            strict = lo.op == ">" or hi.op == "<"
            if lo.value > hi.value or (strict and lo.value == hi.value):
                raise ReplayError(
                    f"slo: {lo.text!r} contradicts {hi.text!r}: {lo.metric} {lo.stat} <= {hi.stat} always"
                )


def parse_slo(text: str) -> Slo:
    """Parse and validate an SLO string; ReplayError naming the offending term on any problem."""
    if not text or not text.strip():
        raise ReplayError("slo: empty (e.g. --slo 'ttft_p99<=500ms,itl_p99<=50ms')")
    bounds = []
    for i, raw in enumerate(text.split(",")):
        term = raw.strip().lower()
        if not term:
            raise ReplayError(f"slo: term {i + 1} is empty in {text!r}")
        bounds.append(_parse_term(term))
    _check_consistent(bounds)
    return Slo(tuple(bounds), ",".join(b.text for b in bounds))


# --- goodput and attainment from requests.jsonl --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Goodput:
    """Per-request SLO accounting over requests intended in [start_s, end_s)."""

    scheduled: int
    ok: int
    failed: int  # errors + not sent
    met: int
    # A bounded window: its length, so met/span is the rate of SLO-meeting arrivals and does not
    # shrink with latency. Unbounded (a whole run): from start_s to the last counted request's end.
    span_s: float | None
    goodput_req_s: float | None
    attainment: float | None

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


def read_requests(path: Path) -> Iterable[dict[str, Any]]:
    """Stream a requests.jsonl; a bad line is a one-line error naming file and line."""
    with open(path, "rb") as f:
        for no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = orjson.loads(raw)
                line["intended_s"] = float(line["intended_s"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ReplayError(f"{path}:{no}: not a requests.jsonl line ({exc})") from None
            yield line


def goodput(
    lines: Iterable[dict[str, Any]], slo: Slo, start_s: float = 0.0, end_s: float = math.inf
) -> Goodput:
    scheduled = ok = met = 0
    last = start_s
    for line in lines:
        t = line["intended_s"]
        if not start_s <= t < end_s:
            continue
        scheduled += 1
        if line.get("status") == OK:
            ok += 1
        if slo.request_meets(line):
            met += 1
        last = max(last, line.get("end_s") or t)
    if math.isfinite(end_s):
        span = end_s - start_s if end_s > start_s else None
    else:
        span = last - start_s if last > start_s else None
    return Goodput(
        scheduled=scheduled,
        ok=ok,
        failed=scheduled - ok,
        met=met,
        span_s=None if span is None else round(span, 6),
        goodput_req_s=None if not span else round(met / span, 4),
        attainment=None if not scheduled else round(met / scheduled, 6),
    )
