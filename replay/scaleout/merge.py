"""Merging the workers of one run into the files and summary one process would have written.

Histograms: every worker uses the one HDR configuration (`replay.stats.histogram`), so decode-add is
exact: the merged histogram equals the histogram of all workers' values recorded in one place.
Intervals: workers share t0 and close interval k at the same instants, so interval k of the run
is the decode-add of every worker's interval k (written as soon as all workers reported it).
Requests: each worker writes its own file in completion order; `merge_request_files` interleaves
them into one requests.jsonl ordered by end time (intended time for requests never sent).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
from hdrh.histogram import HdrHistogram

from replay.run.config import RunConfig
from replay.run.files import IntervalLog, JsonlWriter, interval_row
from replay.run.runner import EXIT_INTERRUPTED, EXIT_NO_SUCCESS, EXIT_OK, EXIT_UNTRUSTED, RunResult, versions
from replay.scaleout.shard import IntervalReport, WorkerResult
from replay.stats import histogram as H
from replay.stats.drift import DriftTracker
from replay.stats.recorder import METRICS, Counts
from replay.stats.saturation import SaturationTracker
from replay.stats.selfcheck import WORST_KEPT, Bounds, verdict
from replay.stats.summary import build_summary

ALL_METRICS = (*METRICS, "loop_lag")


def merge_hists(
    encoded: list[dict[str, str]], into: dict[str, HdrHistogram] | None = None
) -> dict[str, HdrHistogram]:
    """Decode-add per metric; a metric no worker recorded is an empty histogram. With `into`,
    that set is emptied and reused (per-interval merges must not churn the C heap)."""
    if into is None:
        out = {m: H.new() for m in ALL_METRICS}
    else:
        out = into
        for h in out.values():
            H.reset(h)
    for enc in encoded:
        for m, text in enc.items():
            if text:
                out.setdefault(m, H.new()).decode_and_add(text)
    return out


def merge_counts(counts: list[Counts]) -> Counts:
    out = Counts()
    for c in counts:
        out.merge(c)
    return out


def merge_examples(results: list[WorkerResult]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in results:
        for kind, ex in r.error_examples.items():
            have = out.setdefault(kind, [])
            have.extend(e for e in ex if e not in have and len(have) < 5)
    return out


def _p99_ms(h: HdrHistogram) -> float | None:
    return H.summary_ms(h)["p99"]


def worker_entries(results: list[WorkerResult], bounds: Bounds) -> list[dict[str, Any]]:
    """Per-worker self-check: send/dispatch/loop lag p99, CPU, and whether it fell behind."""
    out = []
    for r in sorted(results, key=lambda r: r.index):
        hs = merge_hists([r.hists])
        ok, reasons = verdict(hs["dispatch_lag"], hs["loop_lag"], bounds)
        entry: dict[str, Any] = {
            "index": r.index,
            "host": r.host,
            "pid": r.pid,
            "scheduled": r.counts.scheduled,
            "ok": r.counts.ok,
            "output_tokens": r.counts.output_tokens,
            "send_lag_p99_ms": _p99_ms(hs["send_lag"]),
            "dispatch_lag_p99_ms": _p99_ms(hs["dispatch_lag"]),
            "loop_lag_p99_ms": _p99_ms(hs["loop_lag"]),
            "cpu_percent": r.cpu_percent,
            "elapsed_s": r.elapsed_s,
            "stopped": r.stopped,
            "fell_behind": not ok,
            "reasons": reasons,
        }
        entry.update(r.extra)
        out.append(entry)
    return out


def merged_selfcheck(
    hists: dict[str, HdrHistogram], entries: list[dict[str, Any]], lost: list[str], bounds: Bounds
) -> dict[str, Any]:
    """The one-process self-check over merged histograms, failed also by any single worker that fell
    behind (a merged p99 can hide one slow worker among fast ones) or was lost."""
    ok, reasons = verdict(hists["dispatch_lag"], hists["loop_lag"], bounds)
    behind = [e["index"] for e in entries if e["fell_behind"]]
    for e in entries:
        reasons.extend(f"worker {e['index']} ({e['host']}): {why}" for why in e["reasons"])
    reasons.extend(lost)
    loop_lag = H.summary_ms(hists["loop_lag"])
    stalls = merged_stalls([e.get("stalls") or {} for e in entries])
    return {
        "trustworthy": ok and not behind and not lost,
        "reasons": reasons,
        "dispatch_lag_p99_ms": _p99_ms(hists["dispatch_lag"]),
        "loop_lag_p99_ms": loop_lag["p99"],
        "loop_lag_max_ms": loop_lag["max"],
        "stalls": stalls,
        # Sum over workers, as `top` shows it: 200 = two cores busy.
        "client_cpu_percent": round(sum(e["cpu_percent"] for e in entries), 1),
        "workers_behind": behind,
    }


def merged_stalls(each: list[dict[str, Any]]) -> dict[str, Any]:
    """Stalls over all workers: counts and requests touched add up, the worst is the max."""
    out: dict[str, Any] = {"threshold_ms": Bounds().stall_ms, "count": 0, "max_ms": 0.0, "total_ms": 0.0,
                           "requests_touched": 0, "touched_ids": []}  # fmt: skip
    for s in each:
        if not s:
            continue
        out["threshold_ms"] = s.get("threshold_ms", out["threshold_ms"])
        out["count"] += s.get("count", 0)
        out["max_ms"] = max(out["max_ms"], s.get("max_ms", 0.0))
        out["total_ms"] = round(out["total_ms"] + s.get("total_ms", 0.0), 3)
        out["requests_touched"] += s.get("requests_touched", 0)
        out["touched_ids"].extend(s.get("touched_ids", [])[: 20 - len(out["touched_ids"])])
        for k, v in (s.get("causes_ms") or {}).items():
            causes = out.setdefault("causes_ms", {})
            causes[k] = round(causes.get(k, 0.0) + v, 3)
        if s.get("max_ms", 0.0) >= out["max_ms"] and s.get("worst_window_ms"):
            out["worst_window_ms"] = s["worst_window_ms"]
        out.setdefault("worst", []).extend(s.get("worst", []))
    out["worst"] = sorted(out.get("worst", []), key=lambda w: -w["lag_ms"])[:WORST_KEPT]
    return out


class IntervalMerger:
    """Writes interval k (intervals.hlog + a timeseries row) once every live worker has reported
    k or moved past it, so the files grow during the run as with one process."""

    def __init__(
        self,
        workers: int,
        hlog: IntervalLog,
        timeseries: JsonlWriter,
        interval_s: float,
        row_extra: Callable[[], dict[str, Any]] | None = None,  # e.g. the server sidecar's last sample
        on_row: Callable[[dict[str, Any]], None] | None = None,  # e.g. the live display
    ) -> None:
        self.row_extra = row_extra
        self.on_row = on_row
        self.hlog = hlog
        self.timeseries = timeseries
        self.interval_s = interval_s
        self._last_k = dict.fromkeys(range(workers), -1)
        self._done: set[int] = set()
        self._pending: dict[int, list[IntervalReport]] = {}
        self.drift = DriftTracker(interval_s)
        self.saturation = SaturationTracker(interval_s)
        self._hists = {m: H.new() for m in ALL_METRICS}  # one set, reused for every interval
        self.rss_peak_mb = 0.0  # peak over intervals of the workers' summed RSS
        self.written = 0

    def add(self, rep: IntervalReport) -> None:
        self._pending.setdefault(rep.k, []).append(rep)
        self._last_k[rep.worker] = max(self._last_k[rep.worker], rep.k)
        self._flush()

    def worker_done(self, worker: int) -> None:
        """No more reports will come from `worker` (finished or lost)."""
        self._done.add(worker)
        self._flush()

    def _ready(self, k: int) -> bool:
        return all(last >= k or w in self._done for w, last in self._last_k.items())

    def _flush(self) -> None:
        # Each worker reports in increasing k, so the smallest pending k is the next to write.
        while self._pending:
            k = min(self._pending)
            if not self._ready(k):
                return
            self._write(k, self._pending.pop(k))

    def _write(self, k: int, reps: list[IntervalReport]) -> None:
        merged = merge_hists([r.hists for r in reps], into=self._hists)
        hists = {m: h for m, h in merged.items() if m != "loop_lag"}
        counts = merge_counts([r.counts for r in reps])
        start = k * self.interval_s
        length = max(r.length_s for r in reps)
        self.hlog.write(start, length, hists)
        rss = sum(r.rss_mb for r in reps)
        row = interval_row(
            start,
            length,
            counts,
            hists,
            sum(r.in_flight for r in reps),
            sum(r.waiting_for_cap for r in reps),
        )
        row.update(
            {
                "workers": len(reps),
                # Summed over workers, as for one process with that many cores.
                "client.rss_mb": round(rss, 1),
                "client.cpu_percent": round(sum(r.cpu_percent for r in reps), 1),
            }
        )
        if self.row_extra is not None:
            row.update(self.row_extra())
        self.rss_peak_mb = max(self.rss_peak_mb, rss)
        self.drift.add(hists, row)
        self.saturation.add(row)
        self.timeseries.write(row)
        self.timeseries.flush()
        self.written += 1
        if self.on_row is not None:
            self.on_row(row)


def _order_key(line: bytes) -> tuple[float, int]:
    d = orjson.loads(line)
    t = d.get("end_s")
    return (d["intended_s"] if t is None else t, d["id"])


def _keyed(path: Path) -> Iterator[tuple[tuple[float, int], bytes]]:
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                yield _order_key(line), line if line.endswith(b"\n") else line + b"\n"


def merge_request_files(parts: list[Path], out: Path, remove_parts: bool = True) -> int:
    """Stream-merge the workers' requests files into `out` by end time; returns the line count.

    Each part is in its worker's completion order, which is end-time order up to the instant between
    a target's last byte and the engine's sink, so the merge needs no sort and constant memory.
    """
    n = 0
    with open(out, "wb") as f:
        for _, line in heapq.merge(*(_keyed(p) for p in parts if p.exists()), key=lambda kv: kv[0]):
            f.write(line)
            n += 1
    if remove_parts:
        for p in parts:
            p.unlink(missing_ok=True)
    return n


def finish_run(
    *,
    cfg: RunConfig,
    run_dir: Path,
    results: list[WorkerResult],
    lost: list[str],
    offered_rate: float | None,
    interrupted: bool,
    target: dict[str, Any],
    executor: dict[str, Any],
    merger: IntervalMerger | None = None,
    server: dict[str, Any] | None = None,
    bounds: Bounds | None = None,
    display: dict[str, Any] | None = None,
) -> RunResult:
    """Merge the workers' results into summary.json, in the one-process form plus a `workers` section."""
    bounds = bounds or Bounds()
    hists = merge_hists([r.hists for r in results])
    counts = merge_counts([r.counts for r in results])
    entries = worker_entries(results, bounds)
    selfcheck = merged_selfcheck(hists, entries, lost, bounds)
    selfcheck["display"] = display or {"mode": "off"}  # the parent's live display (live.Feed.cost)
    partial = interrupted or bool(lost) or any(r.stopped for r in results)
    summary = build_summary(
        hists=hists,
        counts=counts,
        config=cfg.to_json(),
        target=target,
        selfcheck=selfcheck,
        versions=versions(),
        offered_rate=offered_rate,
        partial=partial,
        error_examples=merge_examples(results),
        extra={
            "workers": {**executor, "count": executor.get("count", len(results)), "each": entries},
            "drift": merger.drift.verdict() if merger else {"verdict": "too_short", "detail": "no intervals"},
            "saturation": merger.saturation.verdict(
                offered_rate, cfg.duration_s, counts.unfinished, scheduled=counts.scheduled
            )
            if merger
            else None,
            "client": {"rss_peak_mb": round(merger.rss_peak_mb, 1) if merger else None},
            "server": server or {},
        },
    )
    (run_dir / "summary.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    if interrupted:
        code = EXIT_INTERRUPTED
    elif lost or partial:  # a worker died or was stopped on its own: the figures are incomplete
        code = EXIT_UNTRUSTED
    elif counts.scheduled and counts.ok == 0:
        code = EXIT_NO_SUCCESS
    elif cfg.strict and not selfcheck["trustworthy"]:
        code = EXIT_UNTRUSTED
    else:
        code = EXIT_OK
    return RunResult(summary=summary, run_dir=run_dir, exit_code=code)
