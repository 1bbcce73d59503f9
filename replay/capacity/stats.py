"""The arithmetic behind a capacity search, kept apart from the search loop so it can be tested alone:
measurement windows of a finished run, saturation signals, the knee, and the replica estimate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hdrh.histogram import HdrHistogram

from replay.capacity.confidence import trend
from replay.core.errors import ReplayError
from replay.stats import histogram as H
from replay.stats.recorder import METRICS


def window_hists(run_dir: Path, start_s: float) -> dict[str, HdrHistogram]:
    """Whole-run histograms less the intervals that began before `start_s` (the warm-up).

    Read from intervals.hlog, whose intervals sum exactly to the run total; a record lands in the
    interval in which it finished, so this drops what finished during the warm-up.
    """
    out = {m: H.new() for m in METRICS}
    path = run_dir / "intervals.hlog"
    with open(path) as f:
        for no, line in enumerate(f, 1):
            if not line.startswith("Tag="):
                continue
            try:
                tag, start, _length, _max, enc = line.rstrip("\n").split(",", 4)
                name = tag[4:]
                begin = float(start)
            except ValueError:
                raise ReplayError(f"{path}:{no}: not an interval-log line") from None
            if (name in out or name.startswith("class.")) and begin >= start_s - 1e-6:  # class: --classes
                out.setdefault(name, H.new()).add(H.decode(enc))
    return out


def ended_ok(lines: Iterable[dict[str, Any]], start_s: float, end_s: float) -> list[dict[str, Any]]:
    """Successful requests that *ended* in [start_s, end_s): their count over the window is the
    completion rate, the offered rate in steady state and the service rate in overload. Counting
    requests intended in the window over the time to the last one's end instead would read
    latency as lost throughput."""
    return [ln for ln in lines if ln["status"] == "ok" and start_s <= (ln["end_s"] or 0) < end_s]


@dataclass(frozen=True, slots=True)
class Saturation:
    """Whether the server fell behind the offered rate during a step's measurement window, with
    each trend's confidence interval (see `saturation_arrays`)."""

    arrivals: int  # requests intended in the window
    backlog_start: int  # outstanding (intended, not ended) at the window's start
    backlog_end: int  # ... at its end
    backlog_growth: tuple[float, float, float] | None  # fitted growth over the window: (est, low, high)
    ttft_rise_ms: tuple[float, float, float] | None  # fitted TTFT rise over the window: (est, low, high)
    verdict: str  # "saturated" | "stable" | "undecided"
    reasons: tuple[str, ...]

    @property
    def saturated(self) -> bool:
        return self.verdict == "saturated"

    @property
    def verdict_as_bound(self) -> str:
        return {"saturated": "fail", "stable": "pass"}.get(self.verdict, "undecided")

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


def saturation(
    lines: Sequence[dict[str, Any]], start_s: float, end_s: float, baseline_ttft_s: float | None, alpha: float
) -> Saturation:
    """`saturation_arrays` over requests.jsonl lines."""
    # Outstanding from the intended time, not the send: a request the client sent late (engine
    # lag on a busy machine) is backlog too, and the offered rate was not really offered.
    intended = np.array([ln["intended_s"] for ln in lines], dtype=np.float64)
    ended = np.array([ln["end_s"] if ln.get("end_s") is not None else ln["intended_s"] for ln in lines])
    ttft = np.array([ln["first_token_s"] - ln["intended_s"] if ln.get("first_token_s") is not None
                     else np.nan for ln in lines])  # fmt: skip
    return saturation_arrays(intended, ttft, ended, start_s, end_s, baseline_ttft_s, alpha)


def saturation_arrays(
    intended: np.ndarray,
    ttft: np.ndarray,
    ended: np.ndarray,
    start_s: float,
    end_s: float,
    baseline_ttft_s: float | None,
    alpha: float,
) -> Saturation:
    """Backlog growth and TTFT trend over [start_s, end_s), each with its interval.

    Open loop at rate λ into a server completing μ < λ per second leaves a backlog growing by
    (λ - μ) per second, and each request waits longer than the one before; a stable queue
    fluctuates but does not drift. Each trend is a least-squares slope over batch means
    (confidence.trend) and counts only when it is material:
      backlog: growth over the window above max(3, 10% of the window's arrivals);
      TTFT: a rise over the window above 3x the baseline TTFT + 50 ms (with the backlog growing).
    Saturated: a trend's interval lies above its threshold. Stable: both intervals lie below
    theirs. Otherwise undecided (a longer window narrows the intervals).
    `ttft` is from the intended send (NaN without a first token); `ended` is inf while in flight.
    """
    span = end_s - start_s
    in_win = (intended >= start_s) & (intended < end_s)
    arrivals = int(np.count_nonzero(in_win))
    live = ended > intended
    opened, closed = np.sort(intended[live]), np.sort(ended[live])

    def outstanding(t: np.ndarray) -> np.ndarray:
        """Requests intended by t and not ended by t."""
        return np.searchsorted(opened, t, side="right") - np.searchsorted(closed, t, side="right")

    b0, b1 = (int(x) for x in outstanding(np.array([start_s, end_s])))
    growth = rise = None
    if span > 0:
        grid = np.linspace(start_s, end_s, 64, endpoint=False)
        g = trend(grid, outstanding(grid).astype(np.float64), start_s, end_s, alpha)
        if g is not None:
            growth = tuple(round(x, 3) for x in g.over(span))
        ok = in_win & np.isfinite(ttft)
        r = trend(intended[ok], ttft[ok], start_s, end_s, alpha)
        if r is not None:
            rise = tuple(round(x * 1000, 1) for x in r.over(span))
    grow_limit = max(3.0, 0.1 * arrivals)
    rise_limit = (3 * (baseline_ttft_s or 0.0) + 0.05) * 1000
    reasons = []
    if growth is not None and growth[1] > grow_limit:
        reasons.append(f"backlog grew by {growth[0]:.0f} (at least {growth[1]:.0f}) over the window, "
                       f"{arrivals} arrivals")  # fmt: skip
    if rise is not None and growth is not None and rise[1] > rise_limit and growth[0] > 0:
        reasons.append(f"TTFT rose {rise[0]:.0f} ms (at least {rise[1]:.0f}) across the window")
    if reasons:
        verdict = "saturated"
    elif growth is not None and growth[2] <= grow_limit and (rise is None or rise[2] <= rise_limit):
        verdict = "stable"
    else:
        verdict = "undecided"
    return Saturation(arrivals, b0, b1, growth, rise, verdict, tuple(reasons))


def knee(points: Sequence[tuple[float, float]]) -> tuple[float, float] | None:
    """Knee of an increasing latency-vs-load curve (Kneedle: Satopää et al., 2011).

    Both axes are scaled to [0, 1] between the first and last point; the knee is the point
    farthest below the chord, i.e. maximising x_n - y_n: beyond it latency grows faster than
    load. None with fewer than three points or no point below the chord.
    """
    pts = sorted(points)
    if len(pts) < 3:
        return None
    (x0, y0), (x1, y1) = pts[0], pts[-1]
    if x1 <= x0 or y1 <= y0:
        return None
    best, best_d = None, 0.0
    for x, y in pts[1:-1]:
        d = (x - x0) / (x1 - x0) - (y - y0) / (y1 - y0)
        if d > best_d:
            best, best_d = (x, y), d
    return best


def peak_window_rate(
    events: Iterable[tuple[float, float]], window_s: float, quantile: float
) -> dict[str, Any]:
    """Rates of (arrival_s, weight) events per whole window of `window_s` over [0, D): the
    `quantile` (nearest rank) of the windows, their max and the mean. Weight 1 counts requests;
    a request's output tokens give its token demand.

    Same convention as `replay trace stats`: D = span * n / (n - 1) (one mean gap past the last
    arrival), empty windows count as zero, a trailing partial window is left out. A trace shorter
    than one window gives its mean rate over D (flagged `short`).
    """
    bins: dict[int, float] = {}
    n = 0
    total = 0.0
    last = 0.0
    for t, w in events:
        n += 1
        total += w
        last = max(last, t)
        k = int(t // window_s)
        bins[k] = bins.get(k, 0.0) + w
    if n < 2 or last <= 0:
        raise ReplayError("replicas: the trace needs at least two timed arrivals")
    duration = last * n / (n - 1)
    nwin = int(duration // window_s)
    mean = total / duration
    if nwin == 0:
        return {"windows": 0, "short": True, "peak": mean, "max": mean, "mean": mean, "duration_s": duration}
    per = np.array([bins.get(i, 0.0) for i in range(nwin)]) / window_s
    return {
        "windows": nwin,
        "short": False,
        "peak": float(np.percentile(per, quantile, method="inverted_cdf")),
        "max": float(per.max()),
        "mean": mean,
        "duration_s": duration,
    }


def trace_demand(path: str, window_s: float, quantile: float) -> dict[str, Any]:
    """Peak request and output-token rates of a trace file (any format `replay trace` reads)."""
    from replay.trace.formats import load_trace

    tf = load_trace(path)  # re-readable: two streaming passes, nothing held in memory
    sums = [0, 0, 0]

    def first_pass() -> Iterator[tuple[float, float]]:
        for r in tf:
            sums[0] += 1
            sums[1] += r.input_tokens
            sums[2] += r.output_tokens
            yield r.arrival_s, 1.0

    req_s = peak_window_rate(first_pass(), window_s, quantile)
    tok_s = peak_window_rate(((r.arrival_s, float(r.output_tokens)) for r in tf), window_s, quantile)
    n = sums[0]
    return {
        "source": str(path),
        "window_s": window_s,
        "quantile": quantile,
        "requests": n,
        "mean_input_tokens": sums[1] / n,
        "mean_output_tokens": sums[2] / n,
        "req_s": req_s,
        "output_tok_s": tok_s,
    }


def replica_estimate(
    demand: dict[str, Any], max_rate: float, output_tokens: int, input_tokens: int, headroom: float
) -> dict[str, Any]:
    """Replicas for a trace's peak, from the measured max-SLO rate of one replica.

    By requests: ceil(peak req/s x (1 + headroom) / max-SLO rate). By output tokens: the same
    with the trace's peak output tokens/s against max-SLO rate x the test's output length, which
    corrects for a trace whose outputs are longer or shorter than the test's. The larger wins.
    """
    peak = demand["req_s"]["peak"]
    by_req = replicas_needed(peak, max_rate, headroom)
    by_tok = replicas_needed(demand["output_tok_s"]["peak"], max_rate * output_tokens, headroom)
    need = None if by_req is None or by_tok is None else max(by_req, by_tok)
    assumptions = [
        f"the peak is the p{demand['quantile']:g} of {demand['window_s']:g}-second windows of the trace"
        + (" (the trace is shorter than one window: its mean rate)" if demand["req_s"]["short"] else ""),
        "replicas share load evenly (a balancer with no affinity) and scale linearly, with no shared "
        "bottleneck (network, storage, a common prefix cache)",
        "arrivals within a window are no burstier than the search's (Poisson unless set otherwise)",
        f"the per-replica rate was measured at {input_tokens} input / {output_tokens} output tokens; "
        f"the trace averages {demand['mean_input_tokens']:.0f} / {demand['mean_output_tokens']:.0f}, "
        "so the output-token estimate is also given and the larger is kept",
        f"{headroom:.0%} headroom on top of the peak",
    ]
    return {
        "demand": demand,
        "per_replica_req_s": max_rate,
        "headroom": headroom,
        "replicas_by_requests": by_req,
        "replicas_by_output_tokens": by_tok,
        "replicas": need,
        "assumptions": assumptions,
    }


def replicas_needed(peak_rate: float, per_replica_rate: float, headroom: float) -> int | None:
    """ceil(peak x (1 + headroom) / per-replica max-SLO rate); None when no rate met the SLO."""
    if per_replica_rate <= 0 or not math.isfinite(per_replica_rate):
        return None
    return max(1, math.ceil(peak_rate * (1 + headroom) / per_replica_rate - 1e-9))
