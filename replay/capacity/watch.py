"""Live watch over one open-loop capacity step: ends it as soon as its verdict is already decided.

A step that is failing its SLO is usually failing hard (a queue is building), and running it to
the end only spends the search's time budget. The watch sits between the engine and the target
(a pass-through `Target`) and counts, for requests intended after the warm-up, the ones that
already violate a decidable bound: finished requests over the bound, plus in-flight requests
whose age already exceeds it (they can only end over it). A percentile bound pXX tolerates
N - round(XX% of N) samples above it (HdrHistogram's rank rule), N being the window's request
count; the watch uses a generous upper estimate of N, so it stops a step only when no outcome
of the remaining requests could make it pass. It also stops a step whose backlog (requests in
flight) has grown since the warm-up by more than max(10, 25% of the window's expected arrivals):
a gross overload, which would otherwise run to the end and then drain a long queue. The bound is
deliberately looser than the post-hoc saturation check (10%, stats.saturation): a
batching server's in-flight count also rises, and then settles, as its latency grows with load
(Little's law), and a live check must not mistake that for an unbounded queue. Stopping means
the schedule ends early (the rest is never sent); in-flight requests still drain.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

from replay.capacity.slo import ERROR_RATE, STATS, Bound, Slo
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


class StepWatch:
    def __init__(self, inner: Target, slo: Slo, warmup_s: float, expected: float) -> None:
        self.inner = inner
        self.name = inner.name
        self.warmup_s = warmup_s
        n_max = max(1, math.ceil(expected * COUNT_MARGIN))
        self.bounds: list[tuple[Bound, int]] = [
            (b, allowed_above(b.stat, n_max))
            for b in slo.bounds
            if b.metric in _DECIDABLE and b.upper and b.stat not in (None, "mean")
        ]
        err = next((b for b in slo.bounds if b.metric == ERROR_RATE), None)
        # Without an error bound a step whose requests mostly fail is still not worth finishing.
        self.errors_allowed = int(err.value * n_max) if err else max(10, n_max // 2)
        self.violations = [0] * len(self.bounds)
        self.errors = 0
        self.in_flight: dict[int, RequestRecord] = {}
        self.abort_reason: str | None = None
        self.outstanding = 0  # every request in flight, warm-up included
        self.t0: float | None = None  # run start on perf_counter, from the first dispatch
        self.backlog_start: int | None = None
        self.backlog_limit = max(10, math.ceil(0.25 * expected))

    # Target interface: the capacity search owns the inner target's lifecycle.
    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    def __getattr__(self, item: str) -> Any:  # vocab_size and the like
        return getattr(self.inner, item)

    async def send(self, request: Request, record: RequestRecord) -> None:
        counted = request.intended_s >= self.warmup_s
        if self.t0 is None and record.dispatch_s is not None:
            self.t0 = record.dispatch_s - request.intended_s
        if counted:
            self.in_flight[request.id] = record
        self.outstanding += 1
        try:
            await self.inner.send(request, record)
        finally:
            self.outstanding -= 1
            if counted:
                self.in_flight.pop(request.id, None)
                self._finished(record)

    def _finished(self, rec: RequestRecord) -> None:
        if rec.status != OK:
            self.errors += 1
            return
        for i, (b, _) in enumerate(self.bounds):
            v = _value(rec, b.metric)
            if v is not None and not b.holds(v):
                self.violations[i] += 1

    def decided(self, now: float) -> str | None:
        """A reason when the step can no longer pass, else None."""
        if self.errors > self.errors_allowed:
            return f"{self.errors} failed requests already exceed what the SLO allows"
        if self.t0 is not None and now - self.t0 >= self.warmup_s:
            if self.backlog_start is None:
                self.backlog_start = self.outstanding
            elif self.outstanding - self.backlog_start > self.backlog_limit:
                return f"backlog grew from {self.backlog_start} to {self.outstanding} requests in flight"
        for i, (b, allowed) in enumerate(self.bounds):
            to_first = b.metric.startswith("ttft")
            late = 0
            for rec in self.in_flight.values():
                if to_first and rec.first_token_s is not None:
                    continue
                since = rec.sent_s if b.metric in _FROM_SENT else rec.dispatch_s
                if since is not None and now - since > b.value:
                    late += 1
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
        while self.abort_reason is None:
            await asyncio.sleep(CHECK_EVERY_S)
            self.abort_reason = self.decided(time.perf_counter())


def _value(rec: RequestRecord, metric: str) -> float | None:
    """A finished request's value on absolute stamps; the intended-based ones start at dispatch,
    which trails the intended time only by timer lateness (so this errs towards passing)."""
    end = rec.first_token_s if metric.startswith("ttft") else rec.end_s
    since = rec.sent_s if metric in _FROM_SENT else rec.dispatch_s
    if end is None or since is None:
        return None
    return end - since
