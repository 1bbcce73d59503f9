"""Is the generator itself keeping up? If not, its latencies include its own queueing.

Two signals: dispatch lag (how late the engine woke for each request against its intended
time) and event-loop lag (how late a periodic timer fires: a busy loop delays every read of
every stream, inflating TTFT and ITL). Client CPU is reported beside them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import psutil
from hdrh.histogram import HdrHistogram

from replay.stats import histogram as H

PROBE_INTERVAL_S = 0.01


class LoopLagMonitor:
    """Samples event-loop lag every 10 ms into an HDR histogram until stopped."""

    def __init__(self) -> None:
        self.hist = H.new()
        self._task: asyncio.Task[None] | None = None
        self._proc = psutil.Process()
        self._cpu0 = 0.0
        self._wall0 = 0.0
        self.cpu_percent = 0.0

    def start(self) -> None:
        t = self._proc.cpu_times()
        self._cpu0 = t.user + t.system
        self._wall0 = time.perf_counter()
        self._task = asyncio.ensure_future(self._probe())

    async def _probe(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(PROBE_INTERVAL_S)
            H.record_seconds(self.hist, time.perf_counter() - t - PROBE_INTERVAL_S)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        t = self._proc.cpu_times()
        wall = time.perf_counter() - self._wall0
        if wall > 0:
            self.cpu_percent = 100.0 * (t.user + t.system - self._cpu0) / wall


@dataclass(frozen=True, slots=True)
class Bounds:
    dispatch_lag_p99_ms: float = 5.0
    loop_lag_p99_ms: float = 10.0


def verdict(dispatch_lag: HdrHistogram, loop_lag: HdrHistogram, bounds: Bounds) -> tuple[bool, list[str]]:
    """(trustworthy, reasons). Empty histograms cannot fail the check."""
    reasons = []
    checks = (
        ("dispatch lag", dispatch_lag, bounds.dispatch_lag_p99_ms),
        ("event-loop lag", loop_lag, bounds.loop_lag_p99_ms),
    )
    for label, h, bound in checks:
        if h.get_total_count() == 0:
            continue
        p99 = H.percentiles(h, (99.0,))[0] / 1000.0
        if p99 > bound:
            reasons.append(f"{label} p99 {p99:.1f} ms exceeds {bound:g} ms")
    return (not reasons, reasons)
