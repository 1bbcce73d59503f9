import numpy as np

from replay.core.request import RequestRecord
from replay.stats import histogram as H
from replay.stats.recorder import Recorder
from replay.stats.summary import build_summary, console_table


def ok_record(
    i: int, ttft: float, itl: float, n: int, intended: float = 0.0, lag: float = 0.0
) -> RequestRecord:
    r = RequestRecord(id=i, intended_s=intended, requested_output_tokens=n)
    r.dispatch_s = intended
    r.sent_s = intended + lag
    t = r.sent_s + ttft
    for _ in range(n):
        r.add_chunk(t, 1)
        t += itl
    r.end_s = r.chunk_s[-1]
    r.status = "ok"
    r.usage_output_tokens = n
    r.finish_tokens()
    return r


def test_known_latencies_come_out_in_ms():
    rec = Recorder()
    for i in range(100):
        rec.add(ok_record(i, ttft=0.020 + i * 0.0001, itl=0.005, n=10, intended=i * 0.1, lag=0.003))
    hists = rec.close()
    ttft = H.summary_ms(hists["ttft"])
    truth = (0.020 + np.arange(100) * 0.0001) * 1000
    assert abs(ttft["p50"] - np.percentile(truth, 50)) < 0.05
    assert abs(ttft["max"] - truth.max()) < 0.05
    assert ttft["count"] == 100
    # Corrected TTFT adds the 3 ms the request waited before going out.
    assert abs(H.summary_ms(hists["ttft_intended"])["p50"] - ttft["p50"] - 3.0) < 0.05
    itl = H.summary_ms(hists["itl"])
    assert itl["count"] == 100 * 9 and abs(itl["p99"] - 5.0) < 0.01
    tpot = H.summary_ms(hists["tpot"])
    assert abs(tpot["mean"] - 5.0) < 0.01


def test_intervals_sum_to_total_and_merge_is_lossless():
    a, b, whole = Recorder(), Recorder(), Recorder()
    rng = np.random.default_rng(0)
    for i in range(300):
        r = ok_record(i, ttft=float(rng.uniform(0.01, 0.2)), itl=float(rng.uniform(0.001, 0.02)), n=5)
        (a if i % 2 else b).add(r)
        whole.add(r)
        if i % 50 == 0:
            a.roll()
    ta, tb, tw = a.close(), b.close(), whole.close()
    for m in ("ttft", "itl", "e2e"):
        merged = H.merge([H.decode(H.encode(ta[m])), H.decode(H.encode(tb[m]))])
        assert merged.get_total_count() == tw[m].get_total_count()
        for p in (50, 90, 99, 99.9, 100):
            assert merged.get_value_at_percentile(p) == tw[m].get_value_at_percentile(p)


def test_each_interval_holds_only_its_own_requests():
    """roll() reuses two histogram sets; an interval must never carry values of an earlier one."""
    rec = Recorder()
    for k in range(5):
        ttft = 0.010 * (k + 1)  # every interval has its own, distinct TTFT
        for i in range(20 + k):
            rec.add(ok_record(100 * k + i, ttft=ttft, itl=0.002, n=3))
        hists, counts = rec.roll()
        s = H.summary_ms(hists["ttft"])
        assert counts.ok == 20 + k and s["count"] == 20 + k
        assert abs(s["p50"] - ttft * 1000) < 0.05 and abs(s["max"] - ttft * 1000) < 0.05
        assert hists["itl"].get_total_count() == (20 + k) * 2
    assert rec.total["ttft"].get_total_count() == sum(20 + k for k in range(5))


def test_reset_equals_a_fresh_histogram():
    h = H.new()
    for v in (1, 999, 123_456, H.HIGHEST):
        h.record_value(v)
    H.reset(h)
    assert H.encode(h) == H.encode(H.new()) and h.get_total_count() == 0
    assert H.summary_ms(h)["p50"] is None
    fresh = H.new()
    for x in (h, fresh):
        x.record_value(5000)
    assert H.encode(h) == H.encode(fresh) and H.summary_ms(h) == H.summary_ms(fresh)
    assert (h.get_min_value(), h.get_max_value()) == (fresh.get_min_value(), fresh.get_max_value())


def test_accounting_and_summary_shape():
    rec = Recorder()
    rec.add(ok_record(0, 0.01, 0.001, 4))
    bad = RequestRecord(id=1, intended_s=0.1, status="error", error="http_503", error_detail="busy")
    bad.sent_s = 0.1
    rec.add(bad)
    rec.add(RequestRecord(id=2, intended_s=0.2, status="not_sent", error="stopped"))
    rec.add(RequestRecord(id=3, intended_s=0.3, status="unfinished", sent_s=0.31))
    rec.add(RequestRecord(id=4, intended_s=0.4, status="abandoned", sent_s=0.41, first_token_s=0.5,
                          end_s=0.6))
    hists = rec.close()
    assert rec.counts.accounted()
    s = build_summary(
        hists=hists,
        counts=rec.counts,
        config={"seed": 3},
        target={"kind": "fake"},
        selfcheck={
            "trustworthy": True,
            "reasons": [],
            "dispatch_lag_p99_ms": 0.1,
            "loop_lag_p99_ms": 0.2,
            "client_cpu_percent": 5.0,
        },
        versions={},
        offered_rate=10.0,
        partial=False,
        error_examples=rec.error_examples,
    )
    assert s["counts"] == {
        "scheduled": 5,
        "ok": 1,
        "errors": {"http_503": 1},
        "not_sent": {"stopped": 1},
        "unfinished": 1,
        "abandoned": 1,
        "abandoned_mid_stream": 1,
        "accounted": True,
    }
    for name in ("ttft", "itl", "tpot", "e2e", "ttft_intended", "e2e_intended", "send_lag"):
        assert set(s["metrics"][name]) >= {"p50", "p90", "p95", "p99", "p99.9", "max", "mean", "count"}
    assert s["error_examples"] == {"http_503": ["busy"]}
    assert H.decode(s["histograms"]["ttft"]).get_total_count() == 1
    table = console_table(s)
    assert "http_503=1" in table and "stopped=1" in table and "abandoned 1 (1 mid-stream)" in table


def test_fast_percentiles_equal_hdrh_exactly():
    rng = np.random.default_rng(5)
    for n in (1, 2, 17, 1000, 20_000):
        h = H.new()
        for v in rng.lognormal(9, 2, n).astype(int):
            h.record_value(int(min(max(v, 0), H.HIGHEST)))
        ps = (0.0, 1.0, 50.0, 90.0, 99.0, 99.9, 99.99, 100.0)
        assert H.percentiles(h, ps) == [h.get_value_at_percentile(p) for p in ps]
        assert abs(H.mean(h) - h.get_mean_value()) <= 1e-9 * h.get_mean_value()
        d = H.decode(H.encode(h))
        assert H.percentiles(d, ps) == H.percentiles(h, ps)
