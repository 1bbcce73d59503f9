"""The capacity search's statistics, run against a simulated queue instead of a server.

No server, no clock: each step's requests come from tests/mdk_queue.py (a 4-slot FIFO queue with
deterministic 95 ms service, Poisson arrivals) and are fed to the search's own parts, the same
ones a live search uses: confidence.Tally (a step's intervals), stats.saturation_arrays,
watch.look_times (when a step is looked at), estimate.answer / next_rate (the answer and where to
step next). What this leaves out is everything about time (the client, the stub, the machine),
which is what the live bench (capacity_search.py) measures; what it shows is whether the
statistics are right: over many searches, how often the answer lands within 5% of the truth
and how often its interval holds it.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from mdk_queue import waits  # noqa: E402

from replay.capacity import estimate as E  # noqa: E402
from replay.capacity.confidence import Tally, combine, look_alpha  # noqa: E402
from replay.capacity.slo import parse_slo  # noqa: E402
from replay.capacity.stats import saturation_arrays  # noqa: E402
from replay.capacity.watch import look_times  # noqa: E402

K, SERVICE, TTFT = 4, 0.095, 0.020
SLO = parse_slo("ttft_p99<=100ms")
X_MAX = K / SERVICE  # what the closed-loop probe finds: the 4 slots busy all the time
PROBE_S = 4 * 3 + 4 * 1.5  # four 3 s probe levels and their overheads
STEP_OVERHEAD_S = 1.5  # run directory, drain, prefix-cache call


def sim_step(
    rate: float, warmup: float, longest: float, index: int, rng: np.random.Generator
) -> dict[str, Any]:
    """One step as the live watch judges it: looks at doubling lengths (plus the one extra look a
    bound beyond reach calls), the first decided one ends it."""
    total = warmup + longest
    arr = np.cumsum(rng.exponential(1 / rate, int(rate * total * 1.3) + 50))
    arr = arr[arr < total]
    ttft = waits(arr, K, SERVICE) + TTFT
    first_tok = arr + ttft
    bound = SLO.bounds[0].value
    looks = look_times(warmup, max(5.0, longest / 8), longest)
    alpha = look_alpha(len(looks) + 1)
    # The watch's beyond-reach rule, checked every 0.25 s: violations known by t (finished over the
    # bound, or in flight past it) outnumber what the p99 allows of the most requests the step may see.
    n_max = max(1, math.ceil(rate * longest * 1.25))
    allowed = n_max - int(0.99 * n_max + 0.5)
    counted = arr >= warmup
    extra = None
    for t in np.arange(warmup + 0.25, total, 0.25):
        known = counted & (arr < t) & (np.minimum(first_tok, t) - arr > bound)
        if int(np.count_nonzero(known)) > allowed:
            extra = float(t)
            break
    plan = sorted([*looks[:-1], *([extra] if extra is not None and extra < looks[-1] else [])]) + looks[-1:]
    for at in plan:
        last = at == plan[-1]
        win = (arr >= warmup) & (arr < at)
        a, f = arr[win], first_tok[win]
        done = np.ones(len(a), bool) if last else f <= at
        tally = Tally(SLO.bounds[0])
        for ai, fi, di in zip(a.tolist(), f.tolist(), done.tolist(), strict=True):
            if di:
                tally.add(fi, fi - ai)
        late = int(np.count_nonzero(~done & (at - a > bound)))
        lat = (f - a)[done] + SERVICE - TTFT  # end - intended
        judged = tally.judge(
            warmup, at, alpha, late, max(1.0, 2 * float(np.median(lat))) if len(lat) else 1.0
        )
        ended = np.where(done, f + SERVICE - TTFT, np.inf)
        sat = saturation_arrays(a, np.where(done, f - a, np.nan), ended, warmup, at, TTFT, alpha)
        verdict = combine([judged.verdict, sat.verdict_as_bound])
        if verdict != "undecided" or last:
            return {"index": index, "rate_req_s": rate, "verdict": verdict, "bounds": [judged.to_json()],
                    "saturation": sat.to_json(), "cost_s": at + STEP_OVERHEAD_S}  # fmt: skip
    raise AssertionError("unreachable")


def sim_search(rng: np.random.Generator, budget_s: float = 600.0, step_s: float = 62.0, warmup_s: float = 2.0,
               tolerance: float = 0.05) -> dict[str, Any]:  # fmt: skip
    """The live search's loop (search.py) over simulated steps."""
    used, steps, turn = PROBE_S, [], 0
    ceiling = float(f"{X_MAX:.4g}")
    r = 0.9 * ceiling  # the first step: the probe's throughput at the most streams meeting the SLO, clamped
    while True:
        longest = min(step_s - warmup_s, budget_s - used - warmup_s - STEP_OVERHEAD_S)
        if longest < 5:
            break
        steps.append(sim_step(float(f"{r:.4g}"), warmup_s, longest, len(steps), rng))
        used += steps[-1]["cost_s"]
        ans = E.answer(steps)
        lo, hi, _ = E.bracket(steps)
        if hi is None and E.highest_passing(steps) >= ceiling:
            ceiling = float(f"{1.5 * ceiling:.4g}")
        mid, low, high = ans["rate_req_s"], ans["low_req_s"], ans["high_req_s"]
        if mid and low and high is not None and high - low <= 2 * tolerance * mid:
            break
        r = E.next_rate(steps, ceiling, turn)
        turn += 1
    ans = E.answer(steps)
    ans["elapsed_s"] = used
    ans["steps"] = len(steps)
    return ans


def calibrate(n: int, truth: float, seed: int = 0) -> dict[str, Any]:
    """n simulated searches: the share within 5% of `truth`, the share whose interval holds it."""
    rng = np.random.default_rng(seed)
    rows = [sim_search(rng) for _ in range(n)]
    pts = np.array([r["rate_req_s"] if r["rate_req_s"] is not None else math.nan for r in rows])
    lo = np.array([r["low_req_s"] or 0.0 for r in rows])
    hi = np.array([r["high_req_s"] if r["high_req_s"] is not None else math.inf for r in rows])
    err = pts / truth - 1
    return {
        "searches": n,
        "truth_req_s": truth,
        "within_5pct": float(np.mean(np.abs(err) <= 0.05)),
        "three_of_three_expected": float(np.mean(np.abs(err) <= 0.05) ** 3),
        "interval_holds_truth": float(np.mean((lo <= truth) & (truth <= hi))),
        "error_pct_quantiles": {
            q: round(float(np.nanquantile(err, q / 100)) * 100, 2) for q in (5, 25, 50, 75, 95)
        },
        "interval_width_pct_median": round(float(np.median((hi - lo) / truth)) * 100, 1),
        "elapsed_s_median": float(np.median([r["elapsed_s"] for r in rows])),
    }
