"""From judged steps to an answer with an interval, and where to look next.

The answer comes from two kinds of evidence:
  - the bracket: L, the highest rate whose step was decided PASS, and U, the lowest decided FAIL.
    Passing is monotone in rate, so the max SLO rate lies in [L, U] unless one of those two
    verdicts is wrong (each is wrong with at most 2.5%: confidence.py);
  - the crossing: for each SLO bound, the steps' violation counts are fitted with a log-linear
    curve in rate, k_i ~ n_i exp(a + b r_i) (a Poisson regression, its variance inflated by the
    steps' pooled dispersion D), and the rate where it crosses the allowed fraction is the
    estimate; its 95% interval is Fieller's for the ratio (ln a_allowed - a) / b. Steps decided
    far above (more than 10x the allowed fraction) are left out: there the curve bends.
The estimate is the lowest bound's crossing (the binding one) placed within [L, U], and its
interval is the crossing's interval cut to [L, U], its low end lowered by the overload L's step
could hide (its backlog growth's upper bound per second: hidden_overload). With no usable fit (no
violations anywhere below the fails: a server that meets its SLO until it saturates) the interval
is [L, U] (the same lowering) and the estimate its middle. Why a fit at all: near the answer a
p99 step is undecided for minutes (a 4-slot queue at its limit needs ~20 minutes of traffic to
decide a step 5% away), while the counts of every step near it, decided or not, pin the
crossing down several times faster.

Where to look next: bisect the bracket (steps undecided so far count on the side their point
estimate falls) until a crossing can be fitted, then alternate just below and just above it,
which is where a step tells most about where the curve crosses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Z95 = 1.959963984540054
FAR = 10.0  # steps with more than FAR x the allowed violation fraction are left out of a fit
STEP_AROUND = 0.05  # estimation steps sit this fraction below and above the current estimate


@dataclass(frozen=True, slots=True)
class Crossing:
    bound: str
    rate: float
    low: float  # -inf / inf when the interval is unbounded
    high: float
    slope: float
    steps: int

    def to_json(self) -> dict[str, Any]:
        f = lambda x: None if not math.isfinite(x) else round(x, 4)  # noqa: E731
        return {"bound": self.bound, "rate_req_s": f(self.rate), "low": f(self.low), "high": f(self.high),
                "slope": round(self.slope, 5), "steps": self.steps}  # fmt: skip


def fit_crossing(
    bound: str, rates: Sequence[float], n: Sequence[float], k: Sequence[float], d: float, allowed: float
) -> Crossing | None:
    """Where k/n = allowed on the fitted curve k ~ n exp(a + b (r - rc)), with Fieller's interval."""
    x = np.asarray(rates, dtype=np.float64)
    n_ = np.asarray(n, dtype=np.float64)
    k_ = np.asarray(k, dtype=np.float64)
    if len(set(x.tolist())) < 2 or k_.sum() <= 0 or allowed <= 0:
        return None
    rc = float(np.average(x, weights=np.maximum(k_, 0.5)))
    X = np.vstack([np.ones_like(x), x - rc]).T
    beta = np.array([math.log(k_.sum() / n_.sum()), 0.0])
    for _ in range(100):  # Newton on the Poisson log-likelihood
        mu = n_ * np.exp(np.clip(X @ beta, -700, 700))
        info = (X.T * mu) @ X
        try:
            delta = np.linalg.solve(info, X.T @ (k_ - mu))
        except np.linalg.LinAlgError:
            return None
        beta = beta + delta
        if np.max(np.abs(delta)) < 1e-10:
            break
    mu = n_ * np.exp(np.clip(X @ beta, -700, 700))
    try:
        cov = np.linalg.inv((X.T * mu) @ X) * max(1.0, d)
    except np.linalg.LinAlgError:
        return None
    a, b = float(beta[0]), float(beta[1])
    if not b > 0 or not math.isfinite(b):
        return None
    num = math.log(allowed) - a
    rate = rc + num / b
    # Fieller: the r with (num - b r')^2 <= z^2 var(num - b r'), r' = r - rc; var(num) = var(a).
    va, vb, cab = float(cov[0, 0]), float(cov[1, 1]), float(cov[0, 1])
    z2 = Z95 * Z95
    qa = b * b - z2 * vb
    qb = -2 * (num * b - z2 * (-cab))
    qc = num * num - z2 * va
    disc = qb * qb - 4 * qa * qc
    if qa <= 0 or disc < 0:
        lo, hi = -math.inf, math.inf
    else:
        lo = rc + (-qb - math.sqrt(disc)) / (2 * qa)
        hi = rc + (-qb + math.sqrt(disc)) / (2 * qa)
    return Crossing(bound, float(rate), float(lo), float(hi), b, len(x))


def usable(steps: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Steps that count: judged (not discarded because the client fell behind)."""
    return [s for s in steps if s.get("verdict") in ("pass", "fail", "undecided")]


def bracket(steps: Sequence[dict[str, Any]]) -> tuple[float, float | None, list[str]]:
    """(L, U, notes): highest decided pass below the lowest decided fail, and that fail."""
    st = usable(steps)
    fails = [s["rate_req_s"] for s in st if s["verdict"] == "fail"]
    hi = min(fails) if fails else None
    passes = [s["rate_req_s"] for s in st if s["verdict"] == "pass"]
    notes = []
    above = sorted(p for p in passes if hi is not None and p >= hi)
    if above:
        notes.append(f"a pass at {above[-1]:g} req/s above the fail at {hi:g} req/s (noise or a non-monotone "
                     "server): the bracket keeps the fail")  # fmt: skip
    lo = max((p for p in passes if hi is None or p < hi), default=0.0)
    return lo, hi, notes


def crossings(steps: Sequence[dict[str, Any]]) -> list[Crossing]:
    """One fitted crossing per SLO bound that has violations to fit."""
    st = usable(steps)
    by_bound: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    for s in st:
        for j in s["bounds"]:
            if j["allowed"] and j["n"] and j["estimate"] is not None and j["estimate"] <= FAR * j["allowed"]:
                by_bound.setdefault(j["bound"], []).append((s["rate_req_s"], j))
    out = []
    for name, pts in by_bound.items():
        n = [j["n"] for _, j in pts]
        d = float(np.average([j["dispersion"] for _, j in pts], weights=n))
        c = fit_crossing(name, [r for r, _ in pts], n, [j["k"] for _, j in pts], d, pts[0][1]["allowed"])
        if c is not None:
            out.append(c)
    return out


def hidden_overload(steps: Sequence[dict[str, Any]], rate: float) -> float:
    """How far over the server's sustainable rate a step at `rate` that passed could still have been:
    the backlog growth its window could not rule out (the upper end of its interval) per second.
    A step 0.1% over a D/D/8 stub's capacity grows its backlog by ~1 request in 32 s, well inside a
    stable verdict's allowance (saturation_arrays); so the interval's low end sits that much lower."""
    worst = 0.0
    for s in usable(steps):
        if s["verdict"] != "pass" or s["rate_req_s"] != rate or not s.get("window_s"):
            continue
        growth = (s.get("saturation") or {}).get("backlog_growth")
        if growth:
            worst = max(worst, max(growth[2], 0.0) / s["window_s"])
    return min(worst, rate)


def answer(steps: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The max SLO rate, its 95% interval and how they were found (see the module docstring);
    no upper end (None) while no step has failed."""
    lo, hi, notes = bracket(steps)
    top = hi if hi is not None else math.inf
    cr = [c for c in crossings(steps) if math.isfinite(c.rate)]
    binding = min(cr, key=lambda c: c.rate) if cr else None
    if binding is not None:
        point = min(max(binding.rate, lo), top)
        low, high = max(lo, binding.low), min(top, binding.high)
        method = "fit"
    else:  # no estimate without a decided pass (0 when even the lowest rate tried failed)
        point = (lo + hi) / 2 if hi is not None and lo > 0 else lo if lo > 0 else None
        low, high, method = lo, top, "bracket"
    if lo > 0:
        low = min(low, lo - hidden_overload(steps, lo))
    return {
        "rate_req_s": None if point is None else round(point, 4),
        "low_req_s": round(low, 4),
        "high_req_s": None if not math.isfinite(high) else round(high, 4),
        "bracket": {"pass_req_s": lo or None, "fail_req_s": hi},
        "method": method,
        "binding": None if binding is None else binding.bound,
        "crossings": [c.to_json() for c in cr],
        "notes": notes,
    }


def next_rate(steps: Sequence[dict[str, Any]], ceiling: float, turn: int) -> float:
    """Where to step next; `ceiling` stands for the lowest FAIL while no step failed (the probe's
    plateau, itself tested before it is believed); `turn` alternates the side of the estimate."""
    st = usable(steps)
    lo, hi, _ = bracket(st)
    top = hi if hi is not None else ceiling
    und = [s for s in st if s["verdict"] == "undecided"]
    nav_lo = max([s["rate_req_s"] for s in und if _looks(s) == "pass" and s["rate_req_s"] < top] + [lo])
    nav_hi = min([s["rate_req_s"] for s in und if _looks(s) == "fail" and s["rate_req_s"] > lo] + [top])
    cr = [c for c in crossings(st) if math.isfinite(c.rate)]
    if cr:
        r = min(c.rate for c in cr) * (1 + (STEP_AROUND if turn % 2 else -STEP_AROUND))
    else:  # bisect, with undecided steps on the side their point estimate falls
        r = (nav_lo + nav_hi) / 2 if nav_hi > nav_lo else (lo + top) / 2
    if hi is None:  # the ceiling is an assumption: it may be tested itself
        return top if nav_lo >= 0.95 * top else min(max(r, lo + 0.1 * (top - lo)), top)
    return min(max(r, lo + 0.1 * (top - lo)), top - 0.1 * (top - lo))


def highest_passing(steps: Sequence[dict[str, Any]]) -> float:
    """The highest rate decided PASS or, undecided, looking like a pass (0 if none)."""
    st = usable(steps)
    return max([s["rate_req_s"] for s in st if s["verdict"] == "pass"]
               + [s["rate_req_s"] for s in st if s["verdict"] == "undecided" and _looks(s) == "pass"]
               + [0.0])  # fmt: skip


def _looks(step: dict[str, Any]) -> str:
    """An undecided step's side by its point estimates alone."""
    for j in step["bounds"]:
        if j["estimate"] is not None and j["allowed"] and j["estimate"] > j["allowed"]:
            return "fail"
    sat = step.get("saturation") or {}
    rise = sat.get("backlog_growth")
    return "fail" if rise and rise[0] > max(3, 0.1 * sat.get("arrivals", 0)) else "pass"
