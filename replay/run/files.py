"""A run directory's files, written as the run goes (each started afresh: a rerun into the same
directory replaces, never mixes) and flushed so a crash loses at most a moment.

requests.jsonl   one line per scheduled request, in completion order
timeseries.jsonl one row per interval (rates, in-flight, errors, server and resource metrics)
intervals.hlog   HdrHistogram interval log: one tagged histogram per metric per interval
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import IO, Any

import orjson
from hdrh.histogram import HdrHistogram

from replay.core.request import RequestRecord
from replay.stats import histogram as H
from replay.stats.recorder import Counts

FLUSH_EVERY_S = 1.0


class JsonlWriter:
    """Writes JSON lines to a new file; flushes at most once a second (and on close): a cheap hot path."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f: IO[bytes] = open(path, "wb")  # noqa: SIM115 - lives as long as the run
        self._last_flush = time.monotonic()
        self.lines = 0

    def write(self, obj: dict[str, Any]) -> None:
        self._f.write(orjson.dumps(obj) + b"\n")
        self.lines += 1
        now = time.monotonic()
        if now - self._last_flush >= FLUSH_EVERY_S:
            self._f.flush()
            self._last_flush = now

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            self._f.close()


class RequestLog(JsonlWriter):
    """requests.jsonl. `sample_every` > 1 keeps every Nth ok request (errors and not-sent always)."""

    def __init__(self, path: Path, sample_every: int = 1) -> None:
        super().__init__(path)
        self.sample_every = max(1, sample_every)
        self._seen_ok = 0

    def add(self, rec: RequestRecord) -> None:
        if rec.status == "ok" and self.sample_every > 1:
            self._seen_ok += 1
            if (self._seen_ok - 1) % self.sample_every:
                return
        self.write(rec.to_json())


class IntervalLog:
    """HdrHistogram interval log (format V1.3: '#[StartTime: ...]', 'Tag=...,start,length,max,hist')."""

    def __init__(self, path: Path, start_wall_s: float) -> None:
        self._f: IO[str] = open(path, "w")  # noqa: SIM115 - lives as long as the run
        self._f.write("#[Histogram log format version 1.3]\n")
        self._f.write(f"#[StartTime: {start_wall_s:.3f} (seconds since epoch)]\n")
        self._f.write('"StartTimestamp","Interval_Length","Interval_Max","Interval_Compressed_Histogram"\n')
        self._f.flush()

    def write(self, start_s: float, length_s: float, hists: dict[str, HdrHistogram]) -> None:
        for tag, h in hists.items():
            if h.get_total_count() == 0:
                continue
            max_ms = h.get_max_value() / 1000.0
            self._f.write(f"Tag={tag},{start_s:.3f},{length_s:.3f},{max_ms:.3f},{H.encode(h)}\n")
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def interval_row(
    start_s: float,
    length_s: float,
    counts: Counts,
    hists: dict[str, HdrHistogram],
    in_flight: int,
    waiting_for_cap: int,
) -> dict[str, Any]:
    """One timeseries.jsonl row: what one interval did (one process or all workers merged)."""
    ttft = H.summary_ms(hists["ttft"])
    itl = H.summary_ms(hists["itl"])
    probe = H.summary_ms(hists["probe_ttft"]) if counts.probe_scheduled else None
    return {
        "t_s": round(start_s + length_s, 3),
        "interval_s": round(length_s, 3),
        "scheduled": counts.scheduled,
        "ok": counts.ok,
        "errors": sum(counts.errors.values()),
        "error_kinds": dict(counts.errors),
        "not_sent": sum(counts.not_sent.values()),
        "unfinished": counts.unfinished,
        "abandoned": counts.abandoned,
        "req_s": round(counts.ok / length_s, 3) if length_s > 0 else None,
        "output_tok_s": round(counts.output_tokens / length_s, 1) if length_s > 0 else None,
        "in_flight": in_flight,
        "waiting_for_cap": waiting_for_cap,
        "ttft_p50_ms": ttft["p50"],
        "ttft_p99_ms": ttft["p99"],
        "itl_p50_ms": itl["p50"],
        "itl_p99_ms": itl["p99"],
        **({} if probe is None else {"probe_ttft_p50_ms": probe["p50"], "probe_ttft_p99_ms": probe["p99"]}),
    }
