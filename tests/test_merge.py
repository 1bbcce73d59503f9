"""Merging workers: lossless histograms, interval alignment, request files, worker self-check."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import orjson

from replay.core.request import RequestRecord
from replay.run.files import IntervalLog, JsonlWriter
from replay.scaleout.merge import (
    IntervalMerger,
    merge_counts,
    merge_hists,
    merge_request_files,
    merged_selfcheck,
    worker_entries,
)
from replay.scaleout.shard import IntervalReport, WorkerResult, encode_all
from replay.stats import histogram as H
from replay.stats.recorder import METRICS, Counts, Recorder
from replay.stats.selfcheck import Bounds


def fake_records(n: int, seed: int = 1) -> list[RequestRecord]:
    """Records with heavy-tailed latencies, errors and not-sent ones, run-relative seconds."""
    rng = np.random.default_rng(seed)
    out = []
    t = 0.0
    for i in range(n):
        t += rng.exponential(0.01)
        rec = RequestRecord(id=i, intended_s=t, input_tokens=32, requested_output_tokens=20)
        u = rng.random()
        if u < 0.03:
            rec.status, rec.error = "not_sent", "stopped"
        elif u < 0.08:
            rec.dispatch_s = rec.sent_s = t + rng.exponential(0.001)
            rec.status, rec.error, rec.error_detail = "error", "http_500", f"boom {i % 3}"
            rec.end_s = rec.sent_s + 0.01
        else:
            rec.dispatch_s = t + rng.exponential(0.0005)
            rec.sent_s = rec.dispatch_s + rng.exponential(0.0002)
            ft = rec.sent_s + rng.lognormal(np.log(0.05), 0.8)
            rec.status = "ok"
            for k in range(int(rng.integers(1, 40))):
                rec.add_chunk(ft + k * rng.lognormal(np.log(0.01), 0.5), int(rng.integers(1, 3)))
            rec.end_s = rec.chunk_s[-1]
            rec.finish_tokens()
        if i % 17 == 0:
            rec.klass = "probe"  # the probe stream's histograms merge like the rest
        elif i % 23 == 0 and rec.status == "ok":
            rec.status = "abandoned"
        out.append(rec)
    return out


def result_of(w: int, recorder: Recorder, cpu: float = 50.0, loop_lag_ms: float = 0.5) -> WorkerResult:
    hists = dict(recorder.close())
    loop = H.new()
    for _ in range(100):
        H.record_seconds(loop, loop_lag_ms / 1000)
    hists["loop_lag"] = loop
    return WorkerResult(
        index=w,
        host="h",
        pid=w,
        hists=encode_all(hists),
        counts=recorder.counts,
        error_examples=recorder.error_examples,
        cpu_percent=cpu,
        stopped=False,
        elapsed_s=1.0,
        target={},
        requests_lines=0,
    )


def test_merged_histograms_equal_one_recorder_exactly() -> None:
    recs = fake_records(6000)
    one = Recorder()
    for r in recs:
        one.add(r)
    whole = one.close()
    for n in (2, 3, 5):
        parts = [Recorder() for _ in range(n)]
        for r in recs:
            parts[r.id % n].add(r)
        results = [result_of(w, p) for w, p in enumerate(parts)]
        merged = merge_hists([r.hists for r in results])
        for m in METRICS:
            a, b = whole[m], merged[m]
            assert a.get_total_count() == b.get_total_count() > 0, m
            assert (a.get_min_value(), a.get_max_value()) == (b.get_min_value(), b.get_max_value()), m
            for p in (1, 10, 50, 90, 99, 99.9, 99.99, 100):
                assert a.get_value_at_percentile(p) == b.get_value_at_percentile(p), (m, p)
        counts = merge_counts([r.counts for r in results])
        assert (counts.scheduled, counts.ok, counts.errors, counts.not_sent) == (
            one.counts.scheduled,
            one.counts.ok,
            one.counts.errors,
            one.counts.not_sent,
        )
        assert counts.output_tokens == one.counts.output_tokens and counts.accounted()
        assert counts.last_end_s == one.counts.last_end_s
        c1 = one.counts
        assert (counts.abandoned, counts.abandoned_mid_stream) == (c1.abandoned, c1.abandoned_mid_stream)
        assert c1.abandoned > 0
        assert (counts.probe_scheduled, counts.probe_ok) == (c1.probe_scheduled, c1.probe_ok) > (0, 0)


def test_selfcheck_names_the_worker_that_fell_behind() -> None:
    recs = fake_records(600)
    parts = [Recorder() for _ in range(3)]
    for r in recs:
        parts[r.id % 3].add(r)
    # Worker 2's loop lagged 40 ms; the merged p99 of three workers would still look fine.
    results = [
        result_of(0, parts[0]),
        result_of(1, parts[1]),
        result_of(2, parts[2], cpu=99.0, loop_lag_ms=40),
    ]
    for r in results[:2]:
        r.hists["loop_lag"] = H.encode(_hist_ms([0.5] * 1000))
    results[2].hists["loop_lag"] = H.encode(_hist_ms([40.0] * 20 + [0.5] * 980))
    hists = merge_hists([r.hists for r in results])
    assert H.summary_ms(hists["loop_lag"])["p99"] < 10  # hidden in the merge...
    entries = worker_entries(results, Bounds(dispatch_lag_p99_ms=50.0, loop_lag_p99_ms=10.0))
    assert [e["fell_behind"] for e in entries] == [False, False, True]
    sc = merged_selfcheck(hists, entries, [], Bounds(dispatch_lag_p99_ms=50.0))
    assert not sc["trustworthy"] and sc["workers_behind"] == [2]  # ...but named per worker
    assert any(r.startswith("worker 2 (h): event-loop lag p99") for r in sc["reasons"])
    assert sc["client_cpu_percent"] == 50.0 + 50.0 + 99.0
    lost = merged_selfcheck(hists, entries[:2], ["worker 2 lost: exited"], Bounds(dispatch_lag_p99_ms=50.0))
    assert not lost["trustworthy"] and "worker 2 lost: exited" in lost["reasons"]


def _hist_ms(values: list[float]):
    h = H.new()
    for v in values:
        H.record_seconds(h, v / 1000)
    return h


def _report(w: int, k: int, ttft_ms: list[float], length: float = 1.0, ok: int = 0) -> IntervalReport:
    c = Counts(scheduled=ok, ok=ok, output_tokens=10 * ok)
    return IntervalReport(
        w, k, length, {"ttft": H.encode(_hist_ms(ttft_ms))}, c, in_flight=1, waiting_for_cap=0
    )


def test_interval_merger_waits_for_every_worker_and_keeps_order(tmp_path: Path) -> None:
    hlog = IntervalLog(tmp_path / "i.hlog", 0.0)
    ts = JsonlWriter(tmp_path / "t.jsonl")
    m = IntervalMerger(2, hlog, ts, interval_s=1.0)
    m.add(_report(0, 0, [10, 20], ok=2))
    m.add(_report(0, 1, [30], ok=1))
    assert m.written == 0  # worker 1 has not reported interval 0 yet
    m.add(_report(1, 0, [40], ok=1))
    assert m.written == 1
    # Worker 1 has nothing for interval 1 (the merger must not wait for it) and ends first.
    m.add(_report(1, 2, [50], length=0.4, ok=1))
    assert m.written == 2
    m.worker_done(1)
    m.add(_report(0, 2, [60], length=0.3, ok=1))
    m.worker_done(0)
    ts.close()
    hlog.close()
    rows = [orjson.loads(line) for line in (tmp_path / "t.jsonl").read_bytes().splitlines()]
    assert [r["t_s"] for r in rows] == [1.0, 2.0, 2.4]
    assert [r["ok"] for r in rows] == [3, 1, 2]
    assert [r["workers"] for r in rows] == [2, 1, 2]
    assert rows[0]["in_flight"] == 2 and abs(rows[0]["ttft_p50_ms"] - 20.0) <= 0.02  # HDR: 3 digits
    # Each row holds only its own interval (the merger reuses one histogram set).
    assert [round(r["ttft_p50_ms"]) for r in rows] == [20, 30, 50]
    assert [round(r["ttft_p99_ms"]) for r in rows] == [40, 30, 60]
    tags = [
        line.split(",")[0]
        for line in (tmp_path / "i.hlog").read_text().splitlines()
        if line.startswith("Tag=")
    ]
    assert tags == ["Tag=ttft"] * 3


def test_merge_request_files_interleaves_by_end_time(tmp_path: Path) -> None:
    recs = fake_records(900, seed=4)
    parts = [tmp_path / f"requests-w{w}.jsonl" for w in range(3)]
    for w, p in enumerate(parts):
        mine = [r for r in recs if r.id % 3 == w]
        # Completion order within a worker: by end time, never-sent requests at their intended time.
        mine.sort(key=lambda r: (r.end_s if r.end_s is not None else r.intended_s, r.id))
        p.write_bytes(b"".join(orjson.dumps(r.to_json()) + b"\n" for r in mine))
    out = tmp_path / "requests.jsonl"
    assert merge_request_files(parts, out) == 900
    rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert Counter(r["id"] for r in rows) == Counter(range(900))
    keys = [(r["end_s"] if r["end_s"] is not None else r["intended_s"]) for r in rows]
    assert keys == sorted(keys)
    assert not any(p.exists() for p in parts)
