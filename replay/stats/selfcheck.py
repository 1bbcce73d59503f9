"""Is the generator itself keeping up? If not, its latencies include its own queueing.

Three signals: dispatch lag (how late the engine woke for each request against its intended
time), event-loop lag (how late a periodic timer fires: a busy loop delays every read of every
stream, inflating TTFT and ITL), and stalls: any single loop-lag sample above `stall_ms`. A p99
hides a 35 ms stall every 10 s, yet every stream in flight during it read its tokens late; so
stalls are judged by their maximum, and the requests in flight during one are counted and named.
Client CPU is reported beside them.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
from hdrh.histogram import HdrHistogram

from replay.core.request import RequestRecord
from replay.stats import histogram as H

PROBE_INTERVAL_S = 0.01
MAX_STALLS_KEPT = 10_000  # windows kept for matching requests; beyond it only counted
MAX_TOUCHED_IDS = 20
WORST_KEPT = 5  # the longest stalls kept with their times


@dataclass(frozen=True, slots=True)
class Bounds:
    dispatch_lag_p99_ms: float = 5.0
    loop_lag_p99_ms: float = 10.0
    stall_ms: float = 5.0  # one loop-lag sample above this is a stall: counted, its requests named
    # A stall above this fails the check. Measured: an idle 2-core machine running the stub beside
    # the client shows 5-8 ms scheduler stalls now and then; what bent figures was 35-400 ms.
    stall_fail_ms: float = 15.0


class Stalls:
    """Windows (run-relative seconds) in which the loop was unavailable, and the requests they touched.

    A window is [the probe's previous wake, the late wake]: it contains the whole stall, so a
    request counted as touched may have been just outside it, never the other way round. After a
    stall the loop may run a request's last read before the probe's late wake reports the stall,
    so requests finished in the last `RECENT_S` are kept and matched again when a window arrives."""

    RECENT_S = 1.0

    def __init__(self, stall_ms: float) -> None:
        self.stall_s = stall_ms / 1e3
        self.count = 0
        self.max_s = 0.0
        self.total_s = 0.0
        self._starts: list[float] = []
        self._ends: list[float] = []
        self._recent: deque[list[Any]] = deque()  # [id, sent_s, end_s, counted]
        self.touched = 0
        self.touched_ids: list[int] = []
        # Where the stall windows' time went, by the scheduler's accounts of the loop's thread: running
        # (our code on the loop), runnable but waiting for a CPU (another process had it: the machine
        # is busy), or neither (blocked: a blocking call on the loop, or the GIL held by our other
        # threads, whose running time is counted apart). Only the waiting is not the tool's doing.
        self.ran_s = 0.0
        self.waited_s = 0.0
        self.blocked_s = 0.0
        self.other_s = 0.0
        self.max_window: dict[str, float] = {}  # the worst stall's window and its accounts (s)
        self.worst: list[tuple[float, float, float, float]] = []  # (lag, start, ran, waited), top WORST_KEPT

    def add(
        self, start_s: float, end_s: float, lag_s: float, cpu: tuple[float, float, float] | None = None
    ) -> None:
        """A stall in the window [start_s, end_s]; `cpu`: what the scheduler says of that window (see
        `LoopLagMonitor._probe`): seconds the loop's thread ran, waited runnable for a CPU, and the
        process's other threads ran."""
        self.count += 1
        self.total_s += lag_s
        if len(self.worst) < WORST_KEPT or lag_s > self.worst[-1][0]:
            ran_w, waited_w = (cpu[0], cpu[1]) if cpu is not None else (0.0, 0.0)
            self.worst = sorted([*self.worst, (lag_s, start_s, ran_w, waited_w)], reverse=True)[:WORST_KEPT]
        if cpu is not None:
            window = max(end_s - start_s, 0.0)
            ran, waited, other = (min(max(x, 0.0), window) for x in cpu)
            self.ran_s += ran
            self.waited_s += waited
            self.other_s += other
            # The rest of the window: the loop's thread neither ran nor waited for a CPU. Beyond the
            # probe's own sleep that is a blocking call on the loop (sleep, disk, a lock, the GIL).
            self.blocked_s += max(window - ran - waited - PROBE_INTERVAL_S, 0.0)
            if lag_s > self.max_s:
                self.max_window = {"window": window, "loop_thread_ran": ran, "other_threads_ran": other,
                                   "loop_thread_waited_for_cpu": waited}  # fmt: skip
        self.max_s = max(self.max_s, lag_s)
        if len(self._starts) < MAX_STALLS_KEPT:
            self._starts.append(start_s)
            self._ends.append(end_s)
        for item in self._recent:
            if not item[3] and item[1] <= end_s and item[2] >= start_s:
                self._count(item)

    def check(self, rec: RequestRecord) -> None:
        """Count `rec` (run-relative times) if it was in flight during any stall."""
        if rec.sent_s is None:
            return
        # No end: still in flight when the run gave up on it (unfinished), so in flight until now.
        end = rec.end_s if rec.end_s is not None else float("inf")
        item = [rec.id, rec.sent_s, end, False]
        # Windows are appended in time order: the first one ending after the send, if it starts
        # before the request ended, overlaps it.
        i = bisect.bisect_right(self._ends, rec.sent_s)
        if i < len(self._starts) and self._starts[i] <= end:
            self._count(item)
        recent = self._recent
        recent.append(item)
        horizon = end if rec.end_s is not None else rec.sent_s
        while recent and recent[0][2] < horizon - self.RECENT_S:
            recent.popleft()

    def _count(self, item: list[Any]) -> None:
        item[3] = True
        self.touched += 1
        if len(self.touched_ids) < MAX_TOUCHED_IDS:
            self.touched_ids.append(item[0])

    def to_json(self) -> dict[str, Any]:
        return {
            "threshold_ms": round(self.stall_s * 1e3, 3),
            "count": self.count,
            "max_ms": round(self.max_s * 1e3, 3),
            "total_ms": round(self.total_s * 1e3, 3),
            "requests_touched": self.touched,
            "touched_ids": list(self.touched_ids),
            "causes_ms": {
                "loop_thread_ran": round(self.ran_s * 1e3, 3),
                "loop_thread_waited_for_cpu": round(self.waited_s * 1e3, 3),
                "loop_thread_blocked": round(self.blocked_s * 1e3, 3),
                "other_threads_ran": round(self.other_s * 1e3, 3),
            },
            "worst_window_ms": {k: round(v * 1e3, 3) for k, v in self.max_window.items()},
            # When they happened (run-relative s): ties a stall to what the run was doing then.
            "worst": [
                {"at_s": round(at, 3), "lag_ms": round(lag * 1e3, 3), "loop_thread_ran_ms": round(r * 1e3, 3),
                 "loop_thread_waited_ms": round(wt * 1e3, 3)}
                for lag, at, r, wt in self.worst
            ],  # fmt: skip
        }


def _thread_schedstat() -> Callable[[], tuple[float, float]]:
    """A reader of the calling thread's (ran, waited runnable for a CPU) seconds: Linux's per-thread
    schedstat (one ~0.5 us pread), else its CPU clock with no waiting known."""
    try:
        fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        os.pread(fd, 64, 0).split()[1]
    except (OSError, IndexError):
        return lambda: (time.thread_time(), 0.0)

    def read() -> tuple[float, float]:
        ran, waited = os.pread(fd, 64, 0).split()[:2]
        return int(ran) / 1e9, int(waited) / 1e9

    return read


class LoopLagMonitor:
    """Samples event-loop lag every 10 ms into an HDR histogram until stopped; keeps stall windows."""

    def __init__(self, bounds: Bounds | None = None) -> None:
        self.hist = H.new()
        self.stalls = Stalls((bounds or Bounds()).stall_ms)
        self._task: asyncio.Task[None] | None = None
        self._proc = psutil.Process()
        self._cpu0 = 0.0
        self._wall0 = 0.0
        self._t0 = 0.0
        self.cpu_percent = 0.0

    def start(self, t0: float | None = None) -> None:
        """`t0`: the run's start on the perf_counter clock; stall windows are stored relative to it."""
        t = self._proc.cpu_times()
        self._cpu0 = t.user + t.system
        self._wall0 = time.perf_counter()
        self._t0 = self._wall0 if t0 is None else t0
        self._task = asyncio.ensure_future(self._probe())

    async def _probe(self) -> None:
        stall_s = self.stalls.stall_s
        process_cpu = time.process_time
        sched = _thread_schedstat()  # this (the loop's) thread: ran and waited-for-CPU seconds
        while True:
            t = time.perf_counter()
            ran0, waited0 = sched()
            c_proc = process_cpu()
            await asyncio.sleep(PROBE_INTERVAL_S)
            now = time.perf_counter()
            lag = now - t - PROBE_INTERVAL_S
            H.record_seconds(self.hist, lag)
            if lag > stall_s:
                ran, waited = sched()
                ran -= ran0
                other = process_cpu() - c_proc - ran
                self.stalls.add(t - self._t0, now - self._t0, lag, (ran, waited - waited0, other))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        t = self._proc.cpu_times()
        wall = time.perf_counter() - self._wall0
        if wall > 0:
            self.cpu_percent = 100.0 * (t.user + t.system - self._cpu0) / wall


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
    if loop_lag.get_total_count():
        worst = loop_lag.get_max_value() / 1000.0
        if worst > bounds.stall_fail_ms:
            reasons.append(f"event-loop stall of {worst:.1f} ms (max) exceeds {bounds.stall_fail_ms:g} ms")
    return (not reasons, reasons)


def stall_reason(stalls: dict[str, Any]) -> str | None:
    """One line naming how many requests the stalls touched, for the summary's reasons."""
    if not stalls.get("count"):
        return None
    ids = ", ".join(str(i) for i in stalls.get("touched_ids", [])[:5])
    more = "" if stalls["requests_touched"] <= 5 else ", ..."
    line = (f"{stalls['count']} stall(s) over {stalls['threshold_ms']:g} ms touched "
            f"{stalls['requests_touched']} request(s) in flight (ids {ids}{more})")  # fmt: skip
    if stalls.get("worst"):
        line += "; the longest at " + ", ".join(f"{w['at_s']:.1f} s" for w in stalls["worst"][:3])
    return line + (f"; {cause}" if (cause := stall_cause(stalls)) else "")


CAUSE_WORDS = {
    "loop_thread_ran": "mostly our code on the loop",
    "other_threads_ran": "mostly our other threads",
    "loop_thread_waited_for_cpu": "mostly waiting for a CPU: the machine is busy",
    "loop_thread_blocked": "mostly a blocking call on the loop",
}


def stall_main_cause(stalls: dict[str, Any]) -> str | None:
    """The `causes_ms` key that took most of the stalls' time (None: no stalls or no accounts)."""
    c = stalls.get("causes_ms") or {}
    best = max(CAUSE_WORDS, key=lambda k: c.get(k, 0.0))
    return best if c.get(best, 0.0) > 0 else None


def stall_cause(stalls: dict[str, Any]) -> str | None:
    """Whose doing the stalls were, from the scheduler's accounts of the loop's thread in their windows."""
    key = stall_main_cause(stalls)
    if key is None:
        return None
    c = stalls["causes_ms"]
    keys = ("loop_thread_ran", "loop_thread_waited_for_cpu", "loop_thread_blocked", "other_threads_ran")
    ran, waited, blocked, other = (c.get(k, 0.0) for k in keys)
    main = CAUSE_WORDS[key]
    return (f"in those windows the loop's thread ran {ran:.0f} ms, waited {waited:.0f} ms for a CPU and was "
            f"blocked {blocked:.0f} ms; our other threads ran {other:.0f} ms ({main})")  # fmt: skip
