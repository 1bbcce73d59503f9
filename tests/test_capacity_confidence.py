"""How sure a capacity step is, checked against truths that do not come from the code under test:
closed-form binomial limits, and a simulated 4-slot queue (tests/mdk_queue.py) whose violation
fraction at its p99 limit is known from a long run."""

from __future__ import annotations

import math

import numpy as np
import pytest
from mdk_queue import poisson, ttft_exceedance, waits

from replay.capacity.confidence import (
    Tally,
    allowed_fraction,
    cluster_sizes,
    combine,
    exact_interval,
    look_alpha,
    t_score,
    trend,
)
from replay.capacity.estimate import answer, bracket, fit_crossing, next_rate
from replay.capacity.slo import parse_slo
from replay.capacity.stats import saturation_arrays

K, SERVICE, TTFT, BOUND = 4, 0.095, 0.020, 0.100  # the stub of the acceptance test: p99 TTFT <= 100 ms
P99 = parse_slo("ttft_p99<=100ms").bounds[0]


def test_exact_interval_matches_closed_forms():
    # k = 0: the upper limit solves (1 - p)^n = alpha; k = n: the lower limit solves p^n = alpha.
    lo, hi = exact_interval(0, 300, 0.025)
    assert lo == 0 and hi == pytest.approx(1 - 0.025 ** (1 / 300), rel=1e-9)
    lo, hi = exact_interval(50, 50, 0.025)
    assert hi == 1 and lo == pytest.approx(0.025 ** (1 / 50), rel=1e-9)
    # k = 1 of n: the lower limit solves 1 - (1 - p)^n = alpha. Wilson's would be ~7x higher here.
    lo, _ = exact_interval(1, 10, 0.005)
    assert lo == pytest.approx(1 - (1 - 0.005) ** (1 / 10), rel=1e-9)
    # The rule of three: no violation among n samples bounds the fraction near 3.7/n (97.5%).
    assert exact_interval(0, 1000, 0.025)[1] == pytest.approx(3.69 / 1000, rel=0.01)


def test_allowed_fractions_and_t_scores():
    b = parse_slo("ttft_p99<=1s,itl_p90<=50ms,output_tps_p50>=20,error_rate<=2%,e2e_max<=5s").bounds
    assert [round(allowed_fraction(x), 6) for x in b] == [0.01, 0.1, 0.5, 0.02, 0.0]
    assert t_score(0.025, 10) == pytest.approx(2.228, abs=0.005)  # tables: t(0.975, 10)
    assert t_score(0.025, 4) == pytest.approx(2.776, abs=0.02)
    assert look_alpha(5) == pytest.approx(0.005)
    assert combine(["pass", "pass"]) == "pass" and combine(["pass", "undecided"]) == "undecided"
    assert combine(["undecided", "fail"]) == "fail"


def test_cluster_sizes_merge_violations_close_in_time():
    assert cluster_sizes([(5.0, 1), (0.0, 2), (0.5, 1), (3.0, 1), (5.9, 4)], gap_s=1.0) == [3, 1, 5]


def test_independent_samples_have_no_inflation_and_bursts_do():
    rng = np.random.default_rng(1)
    t = np.sort(rng.uniform(0, 100, 4000))
    iid = Tally(P99)
    for ti, v in zip(t, rng.exponential(0.02, len(t)), strict=True):
        iid.add(ti, v)
    assert iid.dispersion(0, 100) < 2  # independent samples: ~1 (16 batch means: noisy)
    # Violations in bursts of 8 at the same moment: the inflation is about the burst size.
    burst = Tally(P99)
    for i, ti in enumerate(t):
        burst.add(ti, 0.5 if (i // 8) % 50 == 0 else 0.01)
    assert burst.k == 80 and 6 <= burst.dispersion(0, 100) <= 10
    j = burst.judge(0, 100, 0.025)
    # 2% violations; as independent samples the interval would exclude 1%, as 10 bursts it does not.
    assert j.estimate == pytest.approx(0.02) and j.verdict == "undecided" and j.low < 0.01 < j.high
    # A stall: 30 streams in flight read their late tokens at one instant, five times over 100 s.
    stalls = Tally(P99)
    for i, ti in enumerate(t):
        stalls.add(ti, 0.01)
        if i % 800 == 0:
            stalls.add(np.full(30, ti + 0.0001), np.full(30, 0.5))
    assert stalls.k == 150 and 20 <= stalls.dispersion(0, 100) <= 35


def _window(rate: float, seconds: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    arr = poisson(rate, seconds + 5.0, rng)
    ttft = waits(arr, K, SERVICE) + TTFT
    keep = arr >= 5.0
    return arr[keep], ttft[keep]


def test_step_interval_is_calibrated_on_a_queue_at_its_p99_limit():
    """At 23.4 req/s the simulated queue's TTFT exceeds 100 ms for ~1% of requests (truth from
    one long run). Over 200 independent 60 s windows the step's 95% interval on the violation
    fraction must cover that truth ~95% of the time. Violations come in bursts of ~6 here, so
    the plain binomial interval (every request independent) covers far less: the reason for D."""
    truth = ttft_exceedance(23.4, K, SERVICE, TTFT, BOUND, seconds=20_000, seed=7)
    assert 0.008 < truth < 0.013
    rng = np.random.default_rng(2024)
    covered = naive = decided_wrong = 0
    reps = 200
    for _ in range(reps):
        arr, ttft = _window(23.4, 60.0, rng)
        tally = Tally(P99)
        for a, v in zip(arr.tolist(), ttft.tolist(), strict=True):
            tally.add(a + v, v)
        j = tally.judge(5.0, 65.0, 0.025)
        covered += j.low <= truth <= j.high
        lo, hi = exact_interval(tally.k, tally.n, 0.025)
        naive += lo <= truth <= hi
        decided_wrong += (j.verdict == "pass") != (truth <= 0.01) and j.verdict != "undecided"
    print(f"coverage {covered / reps:.1%}, binomial {naive / reps:.1%}, wrong verdicts {decided_wrong}")
    assert covered / reps >= 0.92
    assert naive / reps <= 0.85
    assert decided_wrong / reps <= 0.03


def test_saturation_trends_decide_only_beyond_their_noise():
    """A stable queue (M/D/4 at 60% load) is judged stable; at 110% of capacity the backlog and
    TTFT trends are judged saturated within 30 s; a short window of the stable one is not
    judged saturated (its intervals are wide, not its verdict)."""
    rng = np.random.default_rng(5)
    for rate, seconds, want in ((25.0, 60.0, "stable"), (46.3, 30.0, "saturated")):
        arr = poisson(rate, seconds + 5, rng)
        w = waits(arr, K, SERVICE)
        ended = arr + w + SERVICE
        s = saturation_arrays(arr, w + TTFT, ended, 5.0, 5.0 + seconds, TTFT, 0.005)
        assert s.verdict == want, (rate, s)
    arr = poisson(25.0, 8.0, rng)
    w = waits(arr, K, SERVICE)
    short = saturation_arrays(arr, w + TTFT, arr + w + SERVICE, 5.0, 8.0, TTFT, 0.005)
    assert short.verdict in ("stable", "undecided")
    # trend() on a noiseless line: slope exact, interval collapsed onto it.
    x = np.linspace(0, 10, 200)
    tr = trend(x, 3 * x + 1, 0, 10, 0.025)
    assert tr is not None and tr.slope == pytest.approx(3) and tr.high - tr.low < 1e-9


def test_fitted_crossing_recovers_a_known_curve():
    """Violation counts drawn from a known log-linear curve, e(r) = 0.01 exp(0.3 (r - 23)):
    the fit's crossing of 1% is near 23 and its 95% interval contains it."""
    rng = np.random.default_rng(3)
    rates = [20.0, 21.5, 22.0, 24.0, 24.5, 26.0]
    n = [3000] * len(rates)
    k = [rng.poisson(m * 0.01 * math.exp(0.3 * (r - 23))) for r, m in zip(rates, n, strict=True)]
    c = fit_crossing("b", rates, n, k, 1.0, 0.01)
    assert c is not None and abs(c.rate - 23) < 1.0 and c.low < 23 < c.high
    assert fit_crossing("b", [20.0, 20.0], [100, 100], [1, 2], 1.0, 0.01) is None  # one rate: no slope
    assert fit_crossing("b", [20.0, 22.0], [100, 100], [0, 0], 1.0, 0.01) is None  # nothing to fit


def _step(rate, verdict, n=1000, k=0, allowed=0.01, d=1.0):
    return {"rate_req_s": rate, "verdict": verdict, "saturation": {"backlog_growth": None, "arrivals": n},
            "bounds": [{"bound": "ttft_p99<=100ms", "n": n, "k": k, "allowed": allowed, "dispersion": d,
                        "estimate": k / n}]}  # fmt: skip


def test_answer_brackets_and_fits():
    # Pass/fail only, no violations below the fail: the interval is the bracket, the estimate its middle.
    steps = [_step(10, "pass"), _step(12, "fail", k=900), _step(11, "pass"), _step(11.5, "fail", k=800)]
    a = answer(steps)
    assert (a["low_req_s"], a["high_req_s"], a["method"]) == (11, 11.5, "bracket")
    assert a["rate_req_s"] == 11.25
    # A pass above a fail is noted; the bracket keeps the fail.
    lo, hi, notes = bracket([*steps, _step(12.5, "pass")])
    assert (lo, hi) == (11, 11.5) and notes
    # Untrusted steps never count.
    assert bracket([_step(30, "untrusted")]) == (0.0, None, [])
    # Undecided steps around 1% violations: a fitted crossing inside the bracket.
    steps = [_step(15, "pass", k=1), _step(30, "fail", k=300), _step(22, "undecided", 3000, 20),
             _step(24, "undecided", 3000, 45), _step(23, "undecided", 3000, 31)]  # fmt: skip
    a = answer(steps)
    assert a["method"] == "fit" and 22 < a["rate_req_s"] < 24
    assert 15 <= a["low_req_s"] < a["rate_req_s"] < a["high_req_s"] <= 30
    # Where next: alternately just below and just above the crossing.
    assert next_rate(steps, 40, 0) < a["rate_req_s"] < next_rate(steps, 40, 1)
