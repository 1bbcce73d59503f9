"""One shard of a run: the same engine, recorder and self-check as one process, driven by a start
time fixed elsewhere, reporting its intervals and its result as plain, picklable data.

A worker process (`replay.scaleout.workers`) or a Ray actor (`replay.scaleout.ray_executor`) hosts a
`ShardRunner`; the parent merges the reports (`replay.scaleout.merge`). Histograms cross process
boundaries only in HDR's compressed encoding, so the parent's decode-add merge is lossless.

Splitting: worker w of n keeps the requests with `id % n == w` of the one seeded schedule every
worker rebuilds, so the union of all workers' intended send times is exactly the single-process
schedule: no shard owns a time range (no bursts at boundaries), and each shard is a thinning of
the same arrival process (no rate distortion).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from replay.core.request import Request, RequestRecord
from replay.core.target import Target
from replay.engine.open_loop import Engine, EngineOptions
from replay.run.config import RunConfig
from replay.run.files import RequestLog
from replay.run.gc_pacer import GcPacer
from replay.run.offloop import OffLoop
from replay.schedule import arrivals
from replay.schedule import synthetic as schedule
from replay.schedule.arrivals import ArrivalSpec
from replay.schedule.prompts import DEFAULT_HIGH_ID, DEFAULT_LOW_ID, PromptBuilder
from replay.schedule.vocab import id_range
from replay.stats import histogram as H
from replay.stats.recorder import Counts, Recorder
from replay.stats.selfcheck import LoopLagMonitor

ScheduleFactory = Callable[[int, int], Iterable[Request]]  # (worker index, worker count) -> its requests
TargetFactory = Callable[[], Target]  # picklable; builds one worker's own target (client)


@dataclass(frozen=True)
class SyntheticSchedule:
    """The CLI's synthetic schedule as a picklable recipe; `(w, n)` gives worker w's share."""

    arrival: ArrivalSpec
    seed: int
    input_tokens: int
    output_tokens: int
    duration_s: float | None
    max_requests: int | None
    low_id: int = DEFAULT_LOW_ID
    high_id: int = DEFAULT_HIGH_ID
    closed_loop: bool = False  # intended times are all 0: streams send back to back

    @classmethod
    def from_config(cls, cfg: RunConfig, vocab_size: int | None = None) -> SyntheticSchedule:
        """Exactly what `replay.cli.main` builds for `cfg` (same prompt id range for the target's
        vocabulary)."""
        low, high = id_range(vocab_size)
        return cls(
            arrival=cfg.arrival_spec(),
            seed=cfg.seed,
            input_tokens=cfg.input_tokens,
            output_tokens=cfg.output_tokens,
            duration_s=cfg.duration_s,
            max_requests=cfg.requests,
            low_id=low,
            high_id=high,
            closed_loop=bool(cfg.concurrency),
        )

    def __call__(self, index: int = 0, count: int = 1) -> Iterator[Request]:
        offsets = itertools.repeat(0.0) if self.closed_loop else arrivals.offsets(self.arrival, self.seed)
        return schedule.synthetic(
            offsets,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            prompts=PromptBuilder(self.seed, self.low_id, self.high_id),
            duration_s=self.duration_s,
            max_requests=self.max_requests,
            shard=None if count == 1 else (index, count),
        )


@dataclass(frozen=True)
class FilteredSchedule:
    """Any whole schedule (a picklable zero-argument factory, e.g. a trace replay) cut by request id."""

    whole: Callable[[], Iterable[Request]]

    def __call__(self, index: int = 0, count: int = 1) -> Iterator[Request]:
        return (r for r in self.whole() if r.id % count == index)


def split_cap(cap: int | None, index: int, count: int) -> int | None:
    """Worker `index`'s share of a global concurrency cap; the shares sum to `cap` (each at least 1)."""
    if cap is None:
        return None
    return max(1, cap // count + (1 if index < cap % count else 0))


@dataclass(frozen=True)
class ShardSpec:
    index: int
    count: int
    cfg: RunConfig
    target_factory: TargetFactory
    schedule: ScheduleFactory
    requests_path: str  # this worker's own requests file (the parent merges them)


@dataclass
class IntervalReport:
    """Interval k of one worker: [k * interval_s, k * interval_s + length_s) from the shared t0."""

    worker: int
    k: int
    length_s: float
    hists: dict[str, str]  # metric -> HDR encoding
    counts: Counts
    in_flight: int
    waiting_for_cap: int
    rss_mb: float = 0.0
    cpu_percent: float = 0.0  # this worker's CPU over the interval (100 = one core)


@dataclass
class WorkerResult:
    index: int
    host: str
    pid: int
    hists: dict[str, str]  # whole run, every recorder metric plus loop_lag
    counts: Counts
    error_examples: dict[str, list[str]]
    cpu_percent: float
    stopped: bool
    elapsed_s: float
    target: dict[str, Any]
    requests_lines: int
    extra: dict[str, Any] = field(default_factory=dict)  # executor-specific (Ray node, clock offset)


def encode_all(hists: dict[str, Any]) -> dict[str, str]:
    return {name: H.encode(h) for name, h in hists.items()}


class ShardRunner:
    """Hosts one worker's share: `await prepare()`, `await run(t0)`, `await close()`.

    `t0` is a `time.perf_counter()` value on this host. `stop()` / `cancel()` mirror the first and
    second signal of a one-process run and must be called on the runner's own event loop.
    """

    def __init__(self, spec: ShardSpec, on_interval: Callable[[IntervalReport], None]) -> None:
        self.spec = spec
        self.on_interval = on_interval
        self.target: Target | None = None
        self._schedule: Iterator[Request] | None = None
        self.recorder = Recorder()
        self.engine: Engine | None = None
        self.stopped = False
        self.t0 = 0.0
        self._started_target = False
        self._requests: RequestLog | None = None
        self._next_k = 0  # the interval now open
        self._proc = psutil.Process()
        self.monitor = LoopLagMonitor()
        self.offloop = OffLoop("replay-shard")

    async def prepare(self) -> None:
        """Build and start this worker's target and schedule before the shared start time is fixed."""
        self.target = self.spec.target_factory()
        try:
            await self.target.start()
        except BaseException:
            await self.target.close()
            raise
        self._started_target = True
        self._requests = RequestLog(Path(self.spec.requests_path))
        self._schedule = schedule.primed(self.spec.schedule(self.spec.index, self.spec.count))
        cfg, w, n = self.spec.cfg, self.spec.index, self.spec.count
        from replay.run.runner import max_in_flight

        opts = EngineOptions(
            concurrency_cap=split_cap(cfg.concurrency_cap, w, n),
            drain_timeout_s=cfg.drain_timeout_s,
            worker=w,
            max_in_flight=max_in_flight(cfg, n),
            follow_up=getattr(self.spec.schedule, "follow_up", None),  # a session's later turns
            remainder=getattr(self.spec.schedule, "remainder", None),
        )
        if cfg.concurrency:  # closed loop: this worker's share of the streams
            from replay.engine.closed_loop import ClosedLoopEngine

            streams = split_cap(cfg.concurrency, w, n) or 1
            self.engine = ClosedLoopEngine(self.target, self._sink, opts, streams, cfg.duration_s)
        else:
            self.engine = Engine(self.target, self._sink, opts)
        await self.engine.prime(self._schedule)  # the first requests made ready before the clock

    def _sink(self, rec: RequestRecord) -> None:
        self.recorder.add(rec)
        assert self._requests is not None
        self._requests.add(rec)
        self.monitor.stalls.check(rec)

    def stop(self) -> None:
        self.stopped = True
        if self.engine is not None:
            self.engine.stop()

    def cancel(self) -> None:
        if self.engine is not None:
            self.engine.cancel_in_flight()

    async def _report(self, k: int, length_s: float) -> None:
        """O(1) on the loop (swap histogram sets); encoding and the process readings on the worker
        thread, then the report goes out from the loop."""
        hists, counts = self.recorder.swap()
        st = self.engine.state if self.engine else None
        in_flight = st.in_flight if st else 0
        waiting = st.waiting_for_cap if st else 0
        report = await self.offloop.run(self._build_report, k, length_s, hists, counts, in_flight, waiting)
        self.on_interval(report)

    def _build_report(
        self, k: int, length_s: float, hists: dict[str, Any], counts: Counts, in_flight: int, waiting: int
    ) -> IntervalReport:
        report = IntervalReport(
            worker=self.spec.index,
            k=k,
            length_s=length_s,
            hists={m: H.encode(h) for m, h in hists.items() if h.get_total_count()},
            counts=counts,
            in_flight=in_flight,
            waiting_for_cap=waiting,
            rss_mb=round(self._proc.memory_info().rss / 2**20, 1),
            cpu_percent=round(self._proc.cpu_percent(), 1),
        )
        self.recorder.absorb(hists)
        return report

    async def _ticker(self) -> None:
        """Close interval k at t0 + (k + 1) * interval_s: every worker's interval k is the same window."""
        step = self.spec.cfg.interval_s
        while True:
            k = self._next_k
            await asyncio.sleep(max(0.0, self.t0 + (k + 1) * step - time.perf_counter()))
            await self._report(k, step)
            self._next_k = k + 1

    async def run(self, t0: float) -> WorkerResult:
        assert self.engine is not None and self._schedule is not None, "prepare() first"
        assert self._requests is not None
        self.t0 = t0
        # Set-up objects leave the collector's view (no ~10 ms full collections over them); from
        # here collection is paced (run.gc_pacer).
        pacer = GcPacer(lambda: self.engine.state.in_flight if self.engine else 0)
        pacer.start()
        self._proc.cpu_percent()  # prime: the first interval reports CPU from here
        monitor = self.monitor
        monitor.start(t0)
        ticker = asyncio.ensure_future(self._ticker())
        try:
            await self.engine.run(self._schedule, t0)
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            await self.offloop.idle()
            await monitor.stop()
            await pacer.stop()
            # The open interval closes now (a little longer than interval_s if the ticker was late).
            elapsed = time.perf_counter() - t0
            k = self._next_k
            await self._report(k, max(elapsed - k * self.spec.cfg.interval_s, 1e-3))
            self.offloop.close()
            self._requests.close()
        hists = dict(self.recorder.close())
        hists["loop_lag"] = monitor.hist
        return WorkerResult(
            index=self.spec.index,
            host=socket.gethostname(),
            pid=os.getpid(),
            hists=encode_all(hists),
            counts=self.recorder.counts,
            error_examples=self.recorder.error_examples,
            cpu_percent=round(monitor.cpu_percent, 1),
            stopped=self.stopped,
            elapsed_s=round(elapsed, 3),
            target=self.target.describe() if self.target else {},
            requests_lines=self._requests.lines,
            extra={"stalls": monitor.stalls.to_json(), "gc": pacer.to_json()},
        )

    async def close(self) -> None:
        if self.target is not None and self._started_target:
            self._started_target = False
            await self.target.close()
