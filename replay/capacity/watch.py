"""Live watch over one open-loop capacity step: it tallies every SLO bound as requests finish and
ends the step as soon as its verdict is decided, or extends it (up to its longest length) while not.

The watch sits between the engine and the target (a pass-through `Target`). For requests intended
after the warm-up it adds each finished request's values to one `confidence.Tally` per bound, and
at a few looks (doubling lengths, `looks`) judges the step: when every bound's confidence
interval lies on one side of it (and the saturation trends too), the step is decided and its
schedule ends there; otherwise it runs on, to its longest length, where it may end undecided.
The tallies are also the step's final record: `judge()` after the run gives the verdict.

Quicker ends for steps that are failing hard (a queue is building), so they cost seconds:
  - a percentile bound beyond reach (finished requests over the bound plus in-flight requests
    whose age already exceeds it outnumber what pXX allows of a generous upper estimate of the
    step's request count at its longest length) calls one extra look; near the bound that is
    noise, so the look, not the count, decides;
  - the backlog (requests in flight) grew since the warm-up by more than max(10, 25% of the
    expected arrivals), or most requests fail: a gross overload, which stops the step at once
    (judged afterwards on what it has). The backlog rule is looser than the post-hoc saturation
    check: a batching server's in-flight count also rises, and settles, as its latency grows
    with load (Little's law), and a live check must not mistake that for an unbounded queue.
Stopping means the schedule ends early (the rest is never sent); in-flight requests still drain.

Times: the watch sees absolute perf_counter stamps. The run's start t0 is estimated as the least
(dispatch - intended) seen; the engine never dispatches more than 0.2 ms early, so values
measured from the intended send time are within that of the recorded ones.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from replay.capacity.confidence import Judgement, Tally, combine, look_alpha
from replay.capacity.slo import ERROR_RATE, STATS, Bound, Slo
from replay.capacity.stats import Saturation, saturation_arrays
from replay.core.request import OK, Request, RequestRecord
from replay.core.target import Target

# Per-request metrics the watch can judge while a request is still running (age only grows).
_FROM_SENT = {"ttft": True, "e2e": False}  # metric -> measured to the first token (else to the end)
_DECIDABLE = ("ttft", "ttft_intended", "e2e", "e2e_intended")
CHECK_EVERY_S = 0.25
COUNT_MARGIN = 1.25  # window request count may exceed its expectation by this factor (Poisson noise)


def allowed_above(stat: str, n: int) -> int:
    """How many of n samples may exceed a bound on `stat` while the stat still meets it."""
    p = STATS[stat]
    if p is None:  # max
        return 0
    return n - int(p / 100 * n + 0.5)


def look_times(warmup_s: float, first_s: float, longest_s: float) -> list[float]:
    """Run-relative times of a step's looks: warm-up + first, 2 x first, ... up to the longest."""
    out, m = [], first_s
    while m < longest_s - 1e-9:
        out.append(warmup_s + m)
        m *= 2
    return [*out, warmup_s + longest_s]


class StepWatch:
    def __init__(
        self,
        inner: Target,
        slo: Slo,
        warmup_s: float,
        expected: float,
        looks: list[float] | None = None,
        baseline_ttft_s: float | None = None,
    ) -> None:
        """`expected`: arrivals expected after the warm-up at the step's longest length; `looks`:
        run-relative times to judge the step (none: only the quick stops)."""
        self.inner = inner
        self.name = inner.name
        self.warmup_s = warmup_s
        self.looks = sorted(looks or [])
        self.alpha = look_alpha(len(self.looks) + 1)  # + the one a quick stop may add
        self.baseline_ttft_s = baseline_ttft_s
        n_max = max(1, math.ceil(expected * COUNT_MARGIN))
        self.bounds: list[tuple[Bound, int]] = [
            (b, allowed_above(b.stat, n_max))
            for b in slo.bounds
            if b.metric in _DECIDABLE and b.upper and b.stat not in (None, "mean")
        ]
        self.tallies = [Tally(b) for b in slo.bounds]
        err = next((b for b in slo.bounds if b.metric == ERROR_RATE), None)
        # Without an error bound a step whose requests mostly fail is still not worth finishing.
        self.errors_allowed = int(err.value * n_max) if err else max(10, n_max // 2)
        self.violations = [0] * len(self.bounds)
        self.errors = 0
        self.in_flight: dict[int, RequestRecord] = {}
        self.abort_reason: str | None = None  # why the step stopped before its longest length
        self.stopped_at: float | None = None  # run-relative
        self.outstanding = 0  # every request in flight, warm-up included
        self.t0: float | None = None  # run start on perf_counter: least (dispatch - intended)
        self.backlog_start: int | None = None
        self.backlog_limit = max(10, math.ceil(0.25 * expected))
        # Per counted request, for the saturation trends: intended, TTFT from intended, end (run clock).
        self.intended: list[float] = []
        self.ttft_int: list[float] = []
        self.ended: list[float] = []
        self.open_intended: dict[int, float] = {}
        self.judged: list[dict[str, Any]] = []  # one entry per look
        self.decision: tuple[str, list[Judgement], Saturation] | None = None  # the look that decided

    # Target interface: the capacity search owns the inner target's lifecycle.
    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    def __getattr__(self, item: str) -> Any:  # vocab_size, metrics_url, pids and the like
        return getattr(self.inner, item)

    async def send(self, request: Request, record: RequestRecord) -> None:
        counted = request.intended_s >= self.warmup_s
        if record.dispatch_s is not None:
            t0 = record.dispatch_s - request.intended_s
            self.t0 = t0 if self.t0 is None else min(self.t0, t0)
        if counted:
            self.in_flight[request.id] = record
            self.open_intended[request.id] = request.intended_s
        self.outstanding += 1
        try:
            await self.inner.send(request, record)
        finally:
            self.outstanding -= 1
            if counted:
                self.in_flight.pop(request.id, None)
                self.open_intended.pop(request.id, None)
                self._finished(request, record)

    def _finished(self, req: Request, rec: RequestRecord) -> None:
        t0 = self.t0 or 0.0
        ok = rec.status == OK and rec.end_s is not None
        if not ok:
            self.errors += 1
        end = (rec.end_s if rec.end_s is not None else time.perf_counter()) - t0
        self.intended.append(req.intended_s)
        self.ended.append(end)
        first = rec.first_token_s
        self.ttft_int.append(first - t0 - req.intended_s if first is not None else math.nan)
        for tally in self.tallies:
            got = _values(rec, req.intended_s, tally.bound, t0, ok)
            if got is not None:
                tally.add(*got)
        if ok:
            for i, (b, _) in enumerate(self.bounds):
                got = _values(rec, req.intended_s, b, t0, ok)
                if got is not None and not b.holds(float(np.max(got[1]))):
                    self.violations[i] += 1

    # --- verdicts ----------------------------------------------------------------------------------

    def saturation(self, end_s: float, alpha: float | None = None) -> Saturation:
        now = time.perf_counter() - (self.t0 or 0.0)
        intended = np.array(self.intended + list(self.open_intended.values()))
        ended = np.array(self.ended + [math.inf] * len(self.open_intended))
        ttft = np.array(self.ttft_int + [math.nan] * len(self.open_intended))
        return saturation_arrays(
            intended, ttft, ended, self.warmup_s, min(end_s, now), self.baseline_ttft_s,
            self.alpha if alpha is None else alpha,
        )  # fmt: skip

    def judge(self, end_s: float, now: float | None = None) -> tuple[str, list[Judgement], Saturation]:
        """The step's verdict over [warm-up, end_s) on what has finished, plus, at a live look
        (`now`, perf_counter), the requests in flight that already break a bound by their age."""
        late = [self._late(b, now) if now is not None else 0 for b in (t.bound for t in self.tallies)]
        parts = [
            t.judge(self.warmup_s, end_s, self.alpha, extra)
            for t, extra in zip(self.tallies, late, strict=True)
        ]
        sat = self.saturation(end_s)
        verdict = combine([p.verdict for p in parts] + [sat.verdict_as_bound])
        return verdict, parts, sat

    def min_batch_s(self) -> float:
        """Batches for the batch means: at least a second and two median request latencies (a
        request's own time is the shortest memory a queue of them has)."""
        lat = np.array(self.ended) - np.array(self.intended)
        lat = lat[np.isfinite(lat)]
        return max(1.0, 2 * float(np.median(lat))) if len(lat) else 1.0

    def _late(self, b: Bound, now: float) -> int:
        """In-flight requests whose age already breaks upper bound b (they can only end over it)."""
        if not b.upper or b.metric not in _DECIDABLE:
            return 0
        to_first = b.metric.startswith("ttft")
        late = 0
        for rec in self.in_flight.values():
            if to_first and rec.first_token_s is not None:
                continue
            since = rec.sent_s if b.metric in _FROM_SENT else rec.dispatch_s
            if since is not None and now - since > b.value:
                late += 1
        return late

    def quick_stop(self, now: float) -> str | None:
        """A reason when the step is grossly overloaded (errors, a growing backlog), else None."""
        if self.errors > self.errors_allowed:
            return f"{self.errors} failed requests already exceed what the SLO allows"
        if self.t0 is not None and now - self.t0 >= self.warmup_s:
            if self.backlog_start is None:
                self.backlog_start = self.outstanding
            elif self.outstanding - self.backlog_start > self.backlog_limit:
                return f"backlog grew from {self.backlog_start} to {self.outstanding} requests in flight"
        return None

    def beyond_reach(self, now: float) -> str | None:
        """A percentile bound that the step could no longer pass even at its longest length (its
        violations, finished or in flight, outnumber what pXX allows of the most requests the step
        may see). Not a verdict by itself: near the bound that is noise; it calls for a look."""
        for i, (b, allowed) in enumerate(self.bounds):
            late = self._late(b, now)
            if self.violations[i] + late > allowed:
                return f"{self.violations[i] + late} requests already break {b.text} (at most {allowed} may)"
        return None

    def gate(self, schedule: Iterable[Request]) -> Iterator[Request]:
        """The step's schedule, ending early once the verdict is decided."""
        for req in schedule:
            if self.abort_reason is not None:
                return
            yield req

    async def monitor(self) -> None:
        looks = list(self.looks[:-1])  # the last look is the schedule's end: judged after the run
        spare = True  # the one extra look a bound beyond reach may call (see look_alpha above)
        while self.abort_reason is None:
            await asyncio.sleep(CHECK_EVERY_S)
            now = time.perf_counter()
            if self.t0 is None:
                continue
            rel = now - self.t0
            reason = self.quick_stop(now)
            if reason is not None:
                self.abort_reason, self.stopped_at = reason, rel
                return
            why = self.beyond_reach(now) if spare else None
            if why is not None:
                spare = False
                self._look(rel, now, why)
            elif looks and rel >= looks[0]:
                self._look(looks.pop(0), now, None)

    def _look(self, at: float, now: float, why: str | None) -> None:
        verdict, parts, sat = self.judge(at, now)
        self.judged.append({"at_s": round(at, 2), "verdict": verdict, **({"called_by": why} if why else {})})
        if verdict != "undecided":  # the step's verdict is this look's: later arrivals are not judged
            self.decision = (verdict, parts, sat)
            self.stopped_at = at
            self.abort_reason = f"decided ({verdict}) at {at - self.warmup_s:.0f} s" + (
                f": {why}" if why else ""
            )


def _values(rec: RequestRecord, intended_s: float, b: Bound, t0: float, ok: bool) -> tuple[float, Any] | None:
    """(event time on the run clock, the request's value(s) for bound b), or None when it has none.

    A request that ended without a first token (a timeout, a cut connection) still counts for a
    TTFT or E2E bound when it had already waited past the bound: its value is at least that wait.
    """
    m = b.metric
    if m == ERROR_RATE:
        end = rec.end_s if rec.end_s is not None else time.perf_counter()
        return end - t0, 0.0 if ok else 1.0
    at = t0 + intended_s
    since = {"ttft": rec.sent_s, "e2e": rec.sent_s, "ttft_intended": at, "e2e_intended": at}.get(m)
    if since is not None:
        stamp = rec.first_token_s if m.startswith("ttft") else rec.end_s
        if ok and stamp is not None:
            return stamp - t0, stamp - since
        waited = (rec.end_s if rec.end_s is not None else time.perf_counter()) - since
        return (since + waited - t0, waited) if b.upper and waited > b.value else None
    if not ok:
        return None
    if m == "itl":
        gaps = rec.itls()
        if not len(gaps):
            return None
        # Each gap at the time its chunk arrived (itls() order: chunk j's k_j gaps, then the first
        # chunk's extra zero gaps): a stall that delays every stream at once is one event.
        k = np.asarray(rec.chunk_tokens[1:], dtype=np.int64)
        at = np.repeat(np.asarray(rec.chunk_s[1:], dtype=np.float64), k)
        at = np.concatenate((at, np.full(len(gaps) - len(at), rec.chunk_s[0]))) - t0
        return at, gaps
    if m == "send_lag" and rec.sent_s is not None:
        return rec.sent_s - t0, rec.sent_s - t0 - intended_s
    if m == "dispatch_lag" and rec.dispatch_s is not None:
        return rec.dispatch_s - t0, rec.dispatch_s - t0 - intended_s
    if m in ("tpot", "output_tps"):
        # The engine counts output tokens after send() returns: use what was streamed.
        n = rec.streamed_tokens()
        if n < 2 or rec.end_s is None or rec.first_token_s is None:
            return None
        tpot = (rec.end_s - rec.first_token_s) / (n - 1)
        if m == "tpot":
            return rec.end_s - t0, tpot
        return (rec.end_s - t0, 1.0 / tpot) if tpot > 0 else None
    return None
