"""The capacity arithmetic on inputs whose answer is known: knee, peak windows, replicas,
saturation signals, warm-up windows of an interval log, and the live watch's rank rule."""

from __future__ import annotations

import math

import numpy as np
import pytest

from replay.capacity.stats import (
    knee,
    peak_window_rate,
    replica_estimate,
    replicas_needed,
    saturation,
    trace_demand,
    window_hists,
)
from replay.capacity.watch import allowed_above
from replay.core.errors import ReplayError
from replay.run.files import IntervalLog
from replay.stats import histogram as H
from replay.stats.recorder import METRICS
from replay.trace.model import TraceRecord, make_header, write_trace
from replay.trace.stats import trace_stats


def test_knee_of_a_queueing_curve():
    # M/M/1-like latency 1/(1 - rho): flat, then a wall. The knee is where the wall starts.
    rho = [0.1, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    pts = [(r, 1 / (1 - r)) for r in rho]
    assert knee(pts)[0] == pytest.approx(0.8)
    assert knee(pts[:2]) is None  # too few points
    assert knee([(1, 5), (2, 4), (3, 3)]) is None  # not increasing


def test_peak_window_rate_known_arrivals_and_agreement_with_trace_stats():
    # 10 minutes: 1 req/s, except minute 3 at 5 req/s and minute 7 at 3 req/s.
    arr = []
    for minute in range(10):
        rate = {3: 5, 7: 3}.get(minute, 1)
        arr += [minute * 60 + i / rate for i in range(60 * rate)]
    arr.append(600.0)  # closes the tenth window (the trace lasts one mean gap past its last arrival)
    out = peak_window_rate(((t, 1.0) for t in arr), 60, 100)
    assert out["windows"] == 10 and out["max"] == 5.0 and out["peak"] == 5.0
    assert peak_window_rate(((t, 1.0) for t in arr), 60, 90)["peak"] == 3.0  # 9th of 10 windows
    assert peak_window_rate(((t, 1.0) for t in arr), 60, 50)["peak"] == 1.0
    recs = [TraceRecord(arrival_s=t, input_tokens=10, output_tokens=20) for t in arr]
    ts = trace_stats(recs)["rate_windows"]["60s"]
    assert peak_window_rate(((t, 1.0) for t in arr), 60, 99)["peak"] == ts["p99"]
    tok = peak_window_rate(((t, 20.0) for t in arr), 60, 100)
    assert tok["peak"] == 100.0
    short = peak_window_rate(((t, 1.0) for t in [0.0, 1.0, 2.0]), 60, 99)
    assert short["short"] and short["peak"] == pytest.approx(3 / 3.0)
    with pytest.raises(ReplayError):
        peak_window_rate(iter([(0.0, 1.0)]), 60, 99)


def test_replicas_from_a_trace_file(tmp_path):
    # 5 windows of 60 s at 2, 2, 8, 2, 2 req/s, outputs of 100 tokens; per replica 3 req/s at 50 tokens.
    arr = []
    for w, rate in enumerate((2, 2, 8, 2, 2)):
        arr += [w * 60 + i / rate for i in range(60 * rate)]
    path = tmp_path / "t.jsonl"
    write_trace(path, (TraceRecord(t, 10, 100) for t in arr), make_header("test"))
    demand = trace_demand(str(path), 60, 100)
    assert demand["req_s"]["peak"] == 8.0 and demand["output_tok_s"]["peak"] == 800.0
    assert demand["mean_output_tokens"] == 100
    est = replica_estimate(demand, max_rate=3.0, output_tokens=50, input_tokens=10, headroom=0.2)
    assert est["replicas_by_requests"] == math.ceil(8 * 1.2 / 3)  # 4
    assert est["replicas_by_output_tokens"] == math.ceil(800 * 1.2 / 150)  # 7: outputs twice as long
    assert est["replicas"] == 7
    assert any("headroom" in a for a in est["assumptions"])
    assert replicas_needed(10, 0, 0.2) is None
    assert replicas_needed(6, 3, 0.0) == 2  # exact multiples need no extra replica


def _ln(intended, sent, ft, end):
    return {"intended_s": intended, "sent_s": sent, "first_token_s": ft, "end_s": end, "status": "ok"}


def test_saturation_backlog_growth_versus_a_stable_queue():
    # Stable: 10 req/s, each served in 0.3 s -> about 3 outstanding all along.
    stable = [_ln(t, t, t + 0.1, t + 0.3) for t in np.arange(0, 10, 0.1)]
    s = saturation(stable, 2.0, 10.0, baseline_ttft_s=0.1, alpha=0.005)
    assert s.verdict == "stable" and abs(s.backlog_end - s.backlog_start) <= 1
    # Overloaded: arrivals 10/s, completions 5/s (FIFO, one at a time every 0.2 s).
    over, free = [], 0.0
    for t in np.arange(0, 10, 0.1):
        start = max(t, free)
        free = start + 0.2
        over.append(_ln(t, t, start + 0.05, free))
    s = saturation(over, 2.0, 10.0, baseline_ttft_s=0.05, alpha=0.005)
    assert s.verdict == "saturated" and s.backlog_end - s.backlog_start > 30
    # TTFT grows by 1 s per second of arrivals: 8 s over the window, and its interval is tight
    # (the growth is exact); the backlog by 5 a second, 40.
    est, low, high = s.ttft_rise_ms
    assert len(s.reasons) == 2 and est == pytest.approx(8000, rel=0.05) and high - low < 0.05 * est
    assert s.backlog_growth[0] == pytest.approx(40, rel=0.1)


def test_saturation_counts_a_client_that_sends_late_as_backlog():
    """The server answers every request 0.1 s after it is sent, but the client falls behind its
    schedule by 0.05 s per request sent: the sent-based queue stays at one, the offered rate was
    not delivered, and the backlog counted from intended times shows it."""
    late = [
        _ln(t, t + 0.05 * i, t + 0.05 * i + 0.05, t + 0.05 * i + 0.1)
        for i, t in enumerate(np.arange(0, 10, 0.1))
    ]
    s = saturation(late, 2.0, 10.0, baseline_ttft_s=0.05, alpha=0.005)
    # Request i ends at 0.15 i + 0.1 s: 8 outstanding at 2 s (i = 13..20), 33 at 10 s (i = 67..99).
    assert s.saturated and (s.backlog_start, s.backlog_end) == (8, 33)


def test_window_hists_drop_the_warmup_intervals(tmp_path):
    log = IntervalLog(tmp_path / "intervals.hlog", 0.0)
    for start, value_ms in ((0.0, 500), (1.0, 500), (2.0, 10), (3.0, 20)):
        h = {m: H.new() for m in METRICS}
        H.record_seconds(h["ttft"], value_ms / 1000)
        log.write(start, 1.0, h)
    log.close()
    w = window_hists(tmp_path, 2.0)["ttft"]
    assert w.get_total_count() == 2 and w.get_max_value() < 21_000
    assert window_hists(tmp_path, 0.0)["ttft"].get_total_count() == 4


@pytest.mark.parametrize("n", [1, 5, 37, 60, 99, 100, 101, 250, 1000])
@pytest.mark.parametrize("stat", ["p50", "p90", "p99", "p99.9", "max"])
def test_watch_rank_rule_matches_hdr_percentiles(n, stat):
    """k samples above a bound keep HDR's stat at or below it exactly when k <= allowed_above."""
    from replay.capacity.slo import STATS

    allowed = allowed_above(stat, n)
    for k in (allowed, allowed + 1):
        if k > n:
            continue
        h = H.new()
        for _ in range(n - k):
            h.record_value(1000)  # 1 ms, under the 2 ms bound
        for _ in range(k):
            h.record_value(5000)
        p = STATS[stat]
        v = h.get_max_value() if p is None else h.get_value_at_percentile(p)
        assert (v < 2000) == (k <= allowed), (n, stat, k, v)
