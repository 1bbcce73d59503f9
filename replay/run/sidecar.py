"""Once a second, beside the load: the server's Prometheus metrics and the resources of the
processes the tool started or hosts, into server_metrics.jsonl on the run clock.

Side channel only: a failed scrape is an empty sample, never a failed run. The summary keeps
peak / mean (and delta for counters) per key, accumulated as it goes so hours of samples cost
no memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

from replay.run.files import JsonlWriter
from replay.stats.scrape import MetricsScraper
from replay.stats.telemetry import ProcessTreeSampler

PERIOD_S = 1.0


class _Stats:
    __slots__ = ("peak", "total", "n", "first", "last")

    def __init__(self, v: float) -> None:
        self.peak = self.first = self.last = v
        self.total = v
        self.n = 1

    def add(self, v: float) -> None:
        self.peak = max(self.peak, v)
        self.total += v
        self.n += 1
        self.last = v


class Sidecar:
    def __init__(self, target: Any, run_dir: Path) -> None:
        url = getattr(target, "metrics_url", None)
        pids = getattr(target, "pids", None)
        self.scraper = MetricsScraper(url) if url else None
        self.procs = ProcessTreeSampler(pids) if callable(pids) else None
        self.path = run_dir / "server_metrics.jsonl"
        self.last: dict[str, float] = {}
        self._stats: dict[str, _Stats] = {}
        self._task: asyncio.Task[None] | None = None
        self._out: JsonlWriter | None = None
        self._t0 = 0.0

    @property
    def active(self) -> bool:
        return self.scraper is not None or self.procs is not None

    def start(self, t0: float) -> None:
        if not self.active:
            return
        self._out = JsonlWriter(self.path)
        self._t0 = t0
        self._task = asyncio.ensure_future(self._loop(t0))

    async def _loop(self, t0: float) -> None:
        k = 0
        while True:
            await self._sample(t0)
            k += 1
            await asyncio.sleep(max(0.0, t0 + k * PERIOD_S - time.perf_counter()))

    async def _sample(self, t0: float) -> None:
        row: dict[str, Any] = {}
        if self.scraper is not None:
            row.update(await self.scraper.sample())
        if self.procs is not None:
            # psutil walks /proc: cheap, but off the loop so a big process tree never stalls it.
            proc = await asyncio.to_thread(self.procs.sample)
            row.update({f"proc.{k}": v for k, v in proc.items()})
        self.last = {k: v for k, v in row.items() if isinstance(v, int | float)}
        for key, v in self.last.items():
            s = self._stats.get(key)
            if s is None:
                self._stats[key] = _Stats(float(v))
            else:
                s.add(float(v))
        assert self._out is not None
        self._out.write({"t_s": round(time.perf_counter() - t0, 3), **row})

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            # One last sample after the run's last request: counters' deltas (the summary's, and a
            # reader's attributing them to the run's last phase) cover the whole run, not all but
            # its last second.
            with contextlib.suppress(Exception):
                await self._sample(self._t0)
        if self._out is not None:
            self._out.close()
        if self.scraper is not None:
            await self.scraper.close()

    def summary(self) -> dict[str, Any]:
        if not self.active:
            return {}
        out: dict[str, Any] = {}
        for key, s in sorted(self._stats.items()):
            entry = {"peak": round(s.peak, 4), "mean": round(s.total / s.n, 4), "samples": s.n}
            if key.endswith("_total"):
                entry["delta"] = round(s.last - s.first, 4)
            out[key] = entry
        if self.scraper is not None:
            out["scrape"] = self.scraper.describe()
        return out
