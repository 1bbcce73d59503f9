"""Resource use of a server's process tree, sampled once a second, and peak/mean summaries.

Why: a capacity figure means little without what it cost (memory, CPU, GPU). The sampler is
cheap (one /proc read per process; no smaps walk) so it can run beside a load test.

- rss_bytes: sum of RSS over the tree. Pages shared between forked processes are counted once
  per process, so this is an upper bound on the tree's resident memory.
- cpu_pct: CPU time used by the tree over the last interval / wall time, x100 (200 = two cores
  busy). Computed from cpu_times deltas, so a process found mid-run is counted from its next
  sample, and one that started within the interval from its birth. Absent on the first sample.
- gpu_*: device-level, over all visible GPUs, via pynvml (nvidia-ml-py) when importable and a
  GPU exists; absent otherwise. gpu_proc_mem_bytes is the tree's own use, when the driver can map
  our pids (it cannot inside some containers: then absent).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import psutil


class _NVML:
    """pynvml handles, or nothing. Initialised once; any NVML failure disables GPU telemetry."""

    def __init__(self) -> None:
        self.nv: Any = None
        self.handles: list[Any] = []
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            n = pynvml.nvmlDeviceGetCount()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(n)]
            self.nv = pynvml if self.handles else None
        except Exception:  # no module, no driver, no device
            self.nv = None

    def sample(self, pids: set[int]) -> dict[str, float]:
        if self.nv is None:
            return {}
        nv = self.nv
        out: dict[str, float] = {}
        try:
            used = total = util = 0.0
            proc_mem = 0.0
            mapped = False
            for h in self.handles:
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                used += float(mem.used)
                total += float(mem.total)
                util += float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
                with contextlib.suppress(Exception):
                    for p in nv.nvmlDeviceGetComputeRunningProcesses(h):
                        if p.pid in pids and p.usedGpuMemory is not None:
                            proc_mem += float(p.usedGpuMemory)
                            mapped = True
            out["gpu_mem_used_bytes"] = used
            out["gpu_mem_total_bytes"] = total
            out["gpu_util_pct"] = util / len(self.handles)
            if mapped:
                out["gpu_proc_mem_bytes"] = proc_mem
        except Exception:
            return {}
        return out


class ProcessTreeSampler:
    """`sample()` -> {"rss_bytes", "cpu_pct", "num_procs", gpu keys...} for the pids `pids_fn` gives."""

    def __init__(self, pids_fn: Callable[[], Iterable[int]], gpu: bool = True) -> None:
        self.pids_fn = pids_fn
        self._procs: dict[int, psutil.Process] = {}
        self._cpu: dict[int, float] = {}  # pid -> user+system seconds at the last sample
        self._last_t: float | None = None
        self._last_wall: float | None = None
        self._gpu = _NVML() if gpu else None

    @property
    def has_gpu(self) -> bool:
        return self._gpu is not None and self._gpu.nv is not None

    def _proc(self, pid: int) -> psutil.Process | None:
        p = self._procs.get(pid)
        if p is None:
            try:
                p = psutil.Process(pid)
            except psutil.Error:
                return None
            self._procs[pid] = p
        return p

    def sample(self) -> dict[str, float]:
        now = time.perf_counter()
        wall = time.time()
        pids = set(self.pids_fn())
        rss = 0.0
        cpu_delta = 0.0
        n = 0
        cpu_now: dict[int, float] = {}
        for pid in pids:
            p = self._proc(pid)
            if p is None:
                continue
            try:
                with p.oneshot():
                    mem = p.memory_info()
                    ct = p.cpu_times()
                    born = p.create_time()
            except psutil.Error:
                self._procs.pop(pid, None)
                continue
            n += 1
            rss += float(mem.rss)
            used = ct.user + ct.system
            cpu_now[pid] = used
            if pid in self._cpu:
                cpu_delta += max(0.0, used - self._cpu[pid])
            elif self._last_wall is not None and born >= self._last_wall:
                cpu_delta += used  # started within this interval: all its CPU time is new
        for gone in set(self._procs) - pids:
            del self._procs[gone]
        out: dict[str, float] = {"rss_bytes": rss, "num_procs": float(n)}
        if self._last_t is not None and now > self._last_t:
            out["cpu_pct"] = 100.0 * cpu_delta / (now - self._last_t)
        self._cpu = cpu_now
        self._last_t = now
        self._last_wall = wall
        if self._gpu is not None:
            out.update(self._gpu.sample(pids))
        return out


def summarize_series(
    rows: Iterable[Mapping[str, Any]], skip: Iterable[str] = ("t", "t_s", "time", "ts")
) -> dict[str, dict[str, float]]:
    """Per numeric key: peak, mean and sample count over the rows that have it; for counters
    (keys ending in _total) also delta = last - first, the amount within the series."""
    skipped = set(skip)
    acc: dict[str, list[float]] = {}
    for row in rows:
        for k, v in row.items():
            if k in skipped or isinstance(v, bool) or not isinstance(v, int | float):
                continue
            if math.isfinite(v):
                acc.setdefault(k, []).append(float(v))
    out: dict[str, dict[str, float]] = {}
    for k, vals in acc.items():
        s: dict[str, float] = {"peak": max(vals), "mean": sum(vals) / len(vals), "samples": float(len(vals))}
        if k.endswith("_total"):
            s["delta"] = vals[-1] - vals[0]
        out[k] = s
    return out
