"""Python's cyclic garbage collector, paced so that it never holds the event loop for long.

Why: left to itself the collector runs a full (oldest-generation) collection whenever the objects
that survived into that generation have grown by a quarter, and a full collection visits every one
of them. An overloaded run holds thousands of requests in flight (each a task, a coroutine frame, a
record, futures); measured with 10,000 in flight: full collections of 14, 30 and 46 ms on the
loop, one per second, in the middle of the measurement (`make stress RATE=200` on the embedded
target: stalls up to 49 ms, "mostly our code on the loop").

So during a run automatic collection is off, and the pacer collects on the loop itself:
  - the young generations every YOUNG_EVERY_S: their cost follows what was allocated since, a
    fraction of a millisecond at 200 req/s;
  - a full collection at most every FULL_EVERY_S, only when its predicted cost (the last full
    collection's time, scaled by how many requests are in flight now against then) is under
    FULL_BUDGET_S (2 ms); else it is deferred, and counted. Garbage that only a full collection frees
    (reference cycles among long-lived objects: rare here, records are plain data) waits until the
    load eases or the run ends, when the collector is switched back on and runs once, off the clock.
Set-up objects are frozen first (gc.freeze): no collection visits them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable
from typing import Any

YOUNG_EVERY_S = 0.1
FULL_EVERY_S = 10.0
FULL_BUDGET_S = 0.002  # measured: 1.5 ms with ~150 in flight (200 req/s x 0.66 s)
FULL_RETRY_S = 1.0  # a deferred full collection is reconsidered this often
FULL_S_PER_IN_FLIGHT = 5e-6  # 46 ms with 10,000 in flight (see above): the guess before a measurement


class GcPacer:
    """`start()` on the run's loop once set-up is done; `stop()` when the measured part has ended."""

    def __init__(self, in_flight: Callable[[], int]) -> None:
        self._in_flight = in_flight
        self._task: asyncio.Task[None] | None = None
        self._was_enabled = False
        self.young_runs = 0
        self.young_max_s = 0.0
        self.full_runs = 0
        self.full_max_s = 0.0
        self.full_deferred = 0
        self._last_full_s: float | None = None  # duration of the last full collection
        self._last_full_in_flight = 0

    def start(self) -> None:
        gc.collect()
        gc.freeze()
        self._was_enabled = gc.isenabled()
        gc.disable()
        self._task = asyncio.ensure_future(self._pace())

    async def _pace(self) -> None:
        perf = time.perf_counter
        next_full = perf() + FULL_EVERY_S
        while True:
            await asyncio.sleep(YOUNG_EVERY_S)
            now = perf()
            if now >= next_full:
                if self._full_affordable():
                    next_full = now + FULL_EVERY_S
                    n = self._in_flight()
                    gc.collect(2)
                    took = perf() - now
                    self.full_runs += 1
                    self.full_max_s = max(self.full_max_s, took)
                    self._last_full_s, self._last_full_in_flight = took, n
                    continue
                next_full = now + FULL_RETRY_S
            gc.collect(1)
            took = perf() - now
            self.young_runs += 1
            self.young_max_s = max(self.young_max_s, took)

    def _full_affordable(self) -> bool:
        last, n = self._last_full_s, self._in_flight()
        if last is None:  # no measurement yet: the measured cost per request in flight
            predicted = n * FULL_S_PER_IN_FLIGHT
        else:
            predicted = last * (n + 1) / (self._last_full_in_flight + 1)
        if predicted <= FULL_BUDGET_S:
            return True
        self.full_deferred += 1
        return False

    async def stop(self) -> None:
        """Pacing ends; the collector is switched back on as it was before start(), and collects what
        piled up by itself, after the measurements."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._was_enabled:
            gc.enable()

    def to_json(self) -> dict[str, Any]:
        return {
            "young_runs": self.young_runs,
            "young_max_ms": round(self.young_max_s * 1e3, 3),
            "full_runs": self.full_runs,
            "full_max_ms": round(self.full_max_s * 1e3, 3),
            "full_deferred": self.full_deferred,
        }
