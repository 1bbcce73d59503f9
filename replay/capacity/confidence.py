"""How sure one capacity step is: a confidence interval for each SLO bound from the step's samples.

A percentile bound `pXX <= B` holds when at most a fraction a = 1 - XX/100 of the samples exceed B
(`pXX >= B`: at most XX/100 fall below it; `error_rate <= r`: a = r). So each bound is a question
about one proportion, the step's violation fraction e, and the step's samples estimate it: k
violations among n samples. This is the order-statistic (distribution-free) CI of the percentile
turned around: the p99's interval excludes B exactly when e's interval excludes 1%.

Samples within a step are not independent: a queue that is long stays long for a while, so
violations come in bursts, and a binomial interval over requests is too narrow near saturation
(on a 4-slot queue at its p99 limit the violations come in bursts of ~6; the binomial interval
would be 2.4x too narrow). The step's effective sample size is n / D, where D, the variance
inflation, is the larger of
  - batch means: the variance of the sums of the values (clipped to a band next to the bound,
    where their swings are the ones that make or unmake violations) over sub-windows of at least
    a second (and two typical request latencies), against what independent samples would give;
    it sees queue episodes and slow drifts. Taken at its 90% upper confidence bound (chi-square
    with batches - 1 degrees of freedom), since a short window has few batches and a step with
    one burst in it must not read as a step with none;
  - bursts at one instant: violations less than CLUSTER_GAP_S apart (one client or server stall
    that delays every stream in flight, read back together) form one event, and a compound count
    of events of sizes s has variance inflation sum(s^2) / sum(s), pulled towards the
    batch-means figure with few events (PRIOR_EVENTS pseudo-events) and divided by what
    independent violations at the same rate would show.
On the effective counts (k/D, n/D) the interval for e is the exact (Clopper-Pearson) one. A step passes
a bound when the interval's top is within a, fails it when its bottom is above a, and is
undecided otherwise. tests/test_capacity_confidence.py checks the coverage against a simulated
M/D/4 queue (independent of this code) at its p99 limit.

A step is looked at a few times as it runs (at doubling lengths); each look spends an equal share
of the error budget (Bonferroni), so stopping at the first decided look keeps the stated error.

Saturation verdicts get the same treatment: TTFT from the intended send and the backlog are
regressed on time over batch means, and a trend counts only when its interval clears the
materiality threshold (or, for "stable", stays below it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from replay.capacity.slo import ERROR_RATE, STATS, Bound

ALPHA = 0.05  # a step's verdict on a bound is wrong with at most this probability (half each way)
CLUSTER_GAP_S = 0.005  # violations this close are one burst: read together after one stall
PRIOR_EVENTS = 3.0
BIN_S = 0.25  # time resolution of the batch sums
MIN_BATCH_S = 1.0
MAX_BATCHES = 64
D_CONFIDENCE = 0.9  # the batch-means inflation is taken at this upper confidence bound
BAND = 0.5  # the batch means see values within this fraction of the bound (see Tally.clip)


def z_score(alpha: float) -> float:
    """One-sided standard normal quantile: P(Z > z) = alpha."""
    return NormalDist().inv_cdf(1.0 - alpha)


def t_score(alpha: float, df: int) -> float:
    """One-sided Student t quantile (Cornish-Fisher expansion; within 0.5% for df >= 3)."""
    z = z_score(alpha)
    if df <= 0:
        return math.inf
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    return z + g1 / df + g2 / df**2 + g3 / df**3


def look_alpha(looks: int) -> float:
    """One-sided error per look when a step may stop at any of `looks` looks."""
    return ALPHA / 2 / max(1, looks)


def exact_interval(k: float, n: float, alpha: float) -> tuple[float, float]:
    """Clopper-Pearson interval for a proportion, each side with error `alpha`; k and n may be
    fractional (effective counts). Exact rather than Wilson's: with a burst or two in a short
    window (k/D near 1) Wilson's lower end is several times too high."""
    from scipy.special import betaincinv  # the one use of scipy: not imported by reports

    if n <= 0:
        return 0.0, 1.0
    k = min(max(k, 0.0), n)
    lo = 0.0 if k <= 0 else float(betaincinv(k, n - k + 1, alpha))
    hi = 1.0 if k >= n else float(betaincinv(k + 1, n - k, 1 - alpha))
    return lo, hi


def allowed_fraction(b: Bound) -> float:
    """The largest violation fraction with which the bound still holds."""
    if b.metric == ERROR_RATE:
        return b.value
    p = STATS.get(b.stat or "max")
    if p is None:  # max (no sample may break it) or mean (judged on the mean, see Tally.judge)
        return 0.0
    return 1 - p / 100 if b.upper else p / 100


def chi2_quantile(p: float, df: int) -> float:
    """Lower p-quantile of chi-square with df degrees of freedom."""
    from scipy.special import gammaincinv

    return 2.0 * float(gammaincinv(df / 2.0, p))


def samples_to_pass(b: Bound, alpha: float, dispersion: float = 1.5) -> int:
    """Samples a step needs before it can possibly pass bound b (none of them violating):
    (1 - a)^(n/D) <= alpha. A p99 needs ~530 independent samples at alpha = 0.5%."""
    a = allowed_fraction(b)
    if b.stat in ("max", "mean") or not 0 < a < 1:
        return 0
    return math.ceil(dispersion * math.log(alpha) / math.log(1 - a))


def cluster_sizes(times: list[tuple[float, int]], gap_s: float = CLUSTER_GAP_S) -> list[int]:
    """Sizes of the runs of (time, violations) whose members are within gap_s of the one before."""
    sizes: list[int] = []
    last = -math.inf
    for t, k in sorted(times):
        if sizes and t - last <= gap_s:
            sizes[-1] += k
        else:
            sizes.append(k)
        last = t
    return sizes


@dataclass(frozen=True, slots=True)
class Judgement:
    bound: str
    verdict: str  # "pass" | "fail" | "undecided"
    n: int
    k: int
    allowed: float
    dispersion: float  # D: n / D is the effective sample size
    estimate: float | None  # violation fraction (or the mean, for a mean bound)
    low: float | None  # its interval
    high: float | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Tally:
    """One bound's samples over a step window, added as requests finish (cheap per sample)."""

    def __init__(self, bound: Bound) -> None:
        self.bound = bound
        self.allowed = allowed_fraction(bound)
        self.n = 0
        self.k = 0
        self.events: list[tuple[float, int]] = []  # (time, violations) for the cluster sizes
        self.bins: dict[int, list[float]] = {}  # time bin -> [count, sum, sum of squares] (clipped)
        self.total = 0.0  # of clipped values, for the batch means
        self.total_sq = 0.0
        # Percentile bounds: the batch means see the values clipped to a band next to the bound:
        # beyond it they count the same however far (one huge outlier must not dominate the
        # variance), and far inside it their swings cannot make violations (a queue whose
        # latencies wander at a tenth of the bound is no less sure of a p50 for it).
        self.clip = bound.metric != ERROR_RATE and bound.stat != "mean"

    def _violates(self, v: np.ndarray) -> np.ndarray:
        if self.bound.metric == ERROR_RATE:
            return v > 0.5
        b, x = self.bound, self.bound.value
        return {"<=": v > x, "<": v >= x, ">=": v < x, ">": v <= x}[b.op]

    def add(self, t: float | np.ndarray, values: np.ndarray | list[float] | float) -> None:
        """Samples observed at time(s) t on the run clock: one request's values (one TTFT, or all
        its ITL gaps, each at its own time)."""
        v = np.atleast_1d(np.asarray(values, dtype=np.float64))
        if v.size == 0:
            return
        bad = self._violates(v)
        nbad = int(np.count_nonzero(bad))
        self.n += int(v.size)
        self.k += nbad
        b = self.bound
        c = v
        if self.clip:  # only values near the bound (within BAND of it) vary; the rest sit at its edges
            x = b.value
            c = np.clip(v, (1 - BAND) * x, x) if b.upper else np.clip(v, x, (1 + BAND) * x)
        if np.ndim(t) == 0:
            if nbad:
                self.events.append((float(t), nbad))
            self._bin(int(float(t) // BIN_S), float(v.size), float(c.sum()), float(np.dot(c, c)))
        else:
            tt = np.asarray(t, dtype=np.float64)
            if nbad:
                at, cnt = np.unique(tt[bad], return_counts=True)
                self.events += [(float(x), int(y)) for x, y in zip(at, cnt, strict=True)]
            keys, inv = np.unique((tt // BIN_S).astype(np.int64), return_inverse=True)
            cnt = np.bincount(inv)
            s1 = np.bincount(inv, weights=c)
            s2 = np.bincount(inv, weights=c * c)
            for j, key in enumerate(keys.tolist()):
                self._bin(key, float(cnt[j]), float(s1[j]), float(s2[j]))

    def _bin(self, key: int, cnt: float, s1: float, s2: float) -> None:
        self.total += s1
        self.total_sq += s2
        cell = self.bins.get(key)
        if cell is None:
            self.bins[key] = [cnt, s1, s2]
        else:
            cell[0] += cnt
            cell[1] += s1
            cell[2] += s2

    def batch_sums(self, start_s: float, end_s: float, batches: int) -> tuple[np.ndarray, np.ndarray]:
        """(counts, sums) of the clipped values over `batches` equal sub-windows of [start_s, end_s)."""
        n = np.zeros(batches)
        s = np.zeros(batches)
        span = max(end_s - start_s, 1e-9)
        for key, (cnt, tot, _) in self.bins.items():
            j = min(batches - 1, max(0, int(((key + 0.5) * BIN_S - start_s) / span * batches)))
            n[j] += cnt
            s[j] += tot
        return n, s

    def batch_dispersion(self, start_s: float, end_s: float, min_batch_s: float = MIN_BATCH_S) -> float:
        """Batch-means variance inflation at its upper confidence bound (1 with too few samples)."""
        m = int(min(MAX_BATCHES, max(2, (end_s - start_s) // max(MIN_BATCH_S, min_batch_s))))
        if self.n < 2 * m:
            return 1.0
        mean = self.total / self.n
        var = self.total_sq / self.n - mean * mean
        if var <= 1e-18 * max(1.0, mean * mean):
            return 1.0
        n, s = self.batch_sums(start_s, end_s, m)
        d_hat = float(((s - n * mean) ** 2).sum() / (m - 1) / (self.n / m * var))
        return max(1.0, d_hat * (m - 1) / chi2_quantile(1 - D_CONFIDENCE, m - 1))

    def dispersion(self, start_s: float, end_s: float, min_batch_s: float = MIN_BATCH_S) -> float:
        d_batch = self.batch_dispersion(start_s, end_s, min_batch_s)
        sizes = cluster_sizes(self.events, CLUSTER_GAP_S)
        s1, s2 = sum(sizes), sum(x * x for x in sizes)
        d_burst = (s2 + d_batch * PRIOR_EVENTS) / (s1 + PRIOR_EVENTS)
        # Independent violations at rate r also fall within the gap of one another now and then:
        # runs of them have inflation (1 + q) / (1 - q), q = 1 - exp(-r gap); only bursts beyond that count.
        q = 1 - math.exp(-len(self.events) / max(end_s - start_s, 1e-9) * CLUSTER_GAP_S)
        return max(1.0, d_batch, d_burst * (1 - q) / (1 + q))

    def judge(
        self, start_s: float, end_s: float, alpha: float, late: int = 0, min_batch_s: float = MIN_BATCH_S
    ) -> Judgement:
        """Verdict on [start_s, end_s) with one-sided error `alpha` each way; `late`: samples not
        yet finished that already violate the bound (counted as violations); `min_batch_s`: the
        shortest batch for the batch means (at least the queue's memory: a few latencies)."""
        b = self.bound
        d = self.dispersion(start_s, end_s, min_batch_s)
        n, k = self.n + late, self.k + late
        if n == 0:
            return Judgement(b.text, "undecided", 0, 0, self.allowed, d, None, None, None)
        if b.stat == "max":  # no interval for a maximum: any violation fails it, none passes it
            return Judgement(b.text, "fail" if k else "pass", n, k, 0.0, d, k / n, None, None)
        if b.stat == "mean":
            return self._judge_mean(start_s, end_s, alpha, d, min_batch_s)
        lo, hi = exact_interval(k / d, n / d, alpha)
        verdict = "pass" if hi <= self.allowed else "fail" if lo > self.allowed else "undecided"
        return Judgement(b.text, verdict, n, k, self.allowed, round(d, 3), k / n, lo, hi)

    def _judge_mean(
        self, start_s: float, end_s: float, alpha: float, d: float, min_batch_s: float
    ) -> Judgement:
        """A mean bound: batch means t-interval (values are not clipped for the mean itself)."""
        m = int(min(MAX_BATCHES, max(2, (end_s - start_s) // max(MIN_BATCH_S, min_batch_s))))
        n, s = self.batch_sums(start_s, end_s, m)
        keep = n > 0
        if keep.sum() < 3:
            return Judgement(self.bound.text, "undecided", self.n, self.k, 0.0, d, None, None, None)
        means = s[keep] / n[keep]
        m = float(np.average(means, weights=n[keep]))
        se = float(np.std(means, ddof=1) / math.sqrt(keep.sum()))
        t = t_score(alpha, int(keep.sum()) - 1)
        lo, hi = m - t * se, m + t * se
        ok_hi, ok_lo = (self.bound.holds(hi), self.bound.holds(lo))
        verdict = "pass" if ok_hi and ok_lo else "fail" if not ok_hi and not ok_lo else "undecided"
        return Judgement(self.bound.text, verdict, self.n, self.k, 0.0, d, m, lo, hi)


def combine(verdicts: list[str]) -> str:
    """A step fails when any part fails, passes when every part passes, else is undecided."""
    if "fail" in verdicts:
        return "fail"
    if verdicts and all(v == "pass" for v in verdicts):
        return "pass"
    return "undecided"


@dataclass(frozen=True, slots=True)
class Trend:
    slope: float  # per second
    low: float
    high: float

    def over(self, seconds: float) -> tuple[float, float, float]:
        return self.slope * seconds, self.low * seconds, self.high * seconds


def trend(
    x: np.ndarray, y: np.ndarray, start_s: float, end_s: float, alpha: float, batches: int = 8
) -> Trend | None:
    """Least-squares slope of y over x on batch means of `batches` sub-windows, with a t interval
    (batch means are close to independent when a batch is longer than the queue's memory)."""
    if len(x) < 2 * batches or end_s <= start_s:
        return None
    j = np.minimum(((x - start_s) / (end_s - start_s) * batches).astype(int), batches - 1)
    cnt = np.bincount(j, minlength=batches)
    keep = cnt > 0
    if keep.sum() < 4:
        return None
    ym = np.bincount(j, weights=y, minlength=batches)[keep] / cnt[keep]
    xm = np.bincount(j, weights=x, minlength=batches)[keep] / cnt[keep]
    xc = xm - xm.mean()
    sxx = float(xc @ xc)
    if sxx <= 0:
        return None
    slope = float(xc @ (ym - ym.mean()) / sxx)
    resid = ym - ym.mean() - slope * xc
    df = int(keep.sum()) - 2
    se = math.sqrt(float(resid @ resid) / df / sxx)
    t = t_score(alpha, df)
    return Trend(slope, slope - t * se, slope + t * se)
