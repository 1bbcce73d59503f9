"""SLO parsing, aggregate verdicts and per-request goodput/attainment against hand-made truth."""

from __future__ import annotations

import orjson
import pytest

from replay.capacity.slo import goodput, parse_slo, read_requests
from replay.core.errors import ReplayError
from replay.core.request import RequestRecord
from replay.stats import histogram as H
from replay.stats.recorder import METRICS


@pytest.mark.parametrize(
    ("text", "metric", "stat", "op", "value"),
    [
        ("ttft_p99<=500ms", "ttft", "p99", "<=", 0.5),
        ("itl_p99 <= 50 ms", "itl", "p99", "<=", 0.05),
        ("e2e_intended_p90<=2s", "e2e_intended", "p90", "<=", 2.0),
        ("ttft_corrected_p99.9<1s", "ttft_intended", "p99.9", "<", 1.0),
        ("tpot_mean<=800us", "tpot", "mean", "<=", 0.0008),
        ("output_tps_p50>=20", "output_tps", "p50", ">=", 20.0),
        ("output_tps_p50>=20tok/s", "output_tps", "p50", ">=", 20.0),
        ("error_rate<=1%", "error_rate", None, "<=", 0.01),
        ("error_rate<=0.05", "error_rate", None, "<=", 0.05),
        ("E2E_MAX<=3S", "e2e", "max", "<=", 3.0),
    ],
)
def test_parse_good(text, metric, stat, op, value):
    (b,) = parse_slo(text).bounds
    assert (b.metric, b.stat, b.op) == (metric, stat, op)
    assert b.value == pytest.approx(value)


def test_parse_several_and_redundant_upper_bounds_are_accepted():
    slo = parse_slo("ttft_p99<=500ms, itl_p99<=50ms,error_rate<=1%,ttft_p50<=600ms")
    assert [b.metric for b in slo.bounds] == ["ttft", "itl", "error_rate", "ttft"]
    # A lower bound on max beside an upper bound on p99 is satisfiable (max may exceed p99).
    parse_slo("ttft_max>=1s,ttft_p99<=500ms")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty"),
        ("ttft_p99<=500ms,,itl_p99<=1s", "term 2 is empty"),
        ("bogus", "'bogus': expected METRIC_STAT"),
        ("latency_p99<=1s", "unknown metric 'latency'"),
        ("ttft_p75<=1s", "unknown statistic 'p75'"),
        ("ttft<=1s", "name a statistic"),
        ("ttft_p99<=500", "needs a unit"),
        ("ttft_p99<=5min", "unknown unit 'min'"),
        ("ttft_p99=1s", "not an equality"),
        ("ttft_p99<=0ms", "positive"),
        ("error_rate<=150%", "between 0 and 100%"),
        ("error_rate>=1%", "upper bound"),
        ("error_rate_p99<=1%", "no statistic"),
        ("output_tps_p50>=20ms", "unknown unit 'ms'"),
        ("ttft_p99<=1s,ttft_p99<=2s", "bounded twice"),
        ("ttft_p99<=100ms,ttft_p50>=200ms", "contradicts"),
        ("ttft_p99<=100ms,ttft_p99>=200ms", "contradicts"),
        ("e2e_max<=1s,e2e_mean>=2s", "contradicts"),
        ("itl_p99<100ms,itl_p90>=100ms", "contradicts"),
    ],
)
def test_parse_bad_one_line_error_naming_the_term(text, needle):
    with pytest.raises(ReplayError) as e:
        parse_slo(text)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg and msg.startswith("slo:")


def _hists(**values_ms):
    h = {m: H.new() for m in METRICS}
    for m, vals in values_ms.items():
        for v in vals:
            H.record_seconds(h[m], v / 1000)
    return h


def test_aggregate_verdict_uses_hdr_percentiles():
    # 100 TTFT samples 1..100 ms: p99 = 99 ms, p50 = 50 ms, max = 100 ms.
    h = _hists(ttft=range(1, 101), itl=[10] * 50)
    slo = parse_slo("ttft_p99<=99.5ms,ttft_p50<=49ms,itl_max<=10.1ms,error_rate<=2%")
    v = slo.evaluate(h, scheduled=100, failed=2)
    assert [c.ok for c in v.checks] == [True, False, True, True]
    assert not v.passed and v.failures() == ["ttft_p50<=49ms (measured 50.0 ms)"]
    assert slo.evaluate(h, scheduled=100, failed=3).checks[-1].ok is False
    # No sample of a bounded metric is never a pass.
    assert not parse_slo("tpot_p50<=1s").evaluate(h, 100, 0).passed


def _line(i, intended, sent=None, ft=None, end=None, n=0, itl=None, status="ok"):
    return {
        "id": i,
        "intended_s": intended,
        "dispatch_s": sent,
        "sent_s": sent,
        "first_token_s": ft,
        "end_s": end,
        "output_tokens": n,
        "itl_s": itl,
        "status": status,
    }


def test_itl_stats_are_the_requests_own_distribution():
    rec = RequestRecord(id=0, intended_s=0.0)
    # first chunk 2 tokens at t=1.0, then gaps of 0.1 (x8), one gap of 0.5, one chunk of 2 after 0.2
    t = 1.0
    rec.add_chunk(t, 2)
    for _ in range(8):
        t += 0.1
        rec.add_chunk(t, 1)
    t += 0.5
    rec.add_chunk(t, 1)
    t += 0.2
    rec.add_chunk(t, 2)
    gaps = sorted([0.0] + [0.1] * 8 + [0.5] + [0.1, 0.1])  # 12 samples: one per token after the first
    stats = dict(zip(("p50", "p90", "p95", "p99", "p99.9", "max", "mean"), rec.itl_stats(), strict=True))
    assert stats["p50"] == pytest.approx(0.1) and stats["p90"] == pytest.approx(0.1)
    assert stats["p95"] == pytest.approx(0.5) and stats["max"] == pytest.approx(0.5)
    assert stats["mean"] == pytest.approx(sum(gaps) / len(gaps), abs=1e-6)
    assert RequestRecord(id=1, intended_s=0.0).itl_stats() is None
    assert rec.to_json()["itl_s"] == rec.itl_stats()


def test_goodput_and_attainment_on_known_requests(tmp_path):
    """Ten requests intended at 0..9 s; the truth of which meet 'ttft<=100ms, itl p99<=20ms':
    0 warm-up (excluded from a window starting at 1 s); 1, 2, 3 meet; 4 TTFT 150 ms; 5 its own
    p99 ITL 30 ms; 6 error; 7 not sent; 8 meets; 9 meets but with one output token (no ITL)."""
    lines = [
        _line(0, 0.0, 0.0, 0.05, 1.0, 10, [0.01] * 7),
        _line(1, 1.0, 1.0, 1.05, 2.0, 10, [0.01] * 7),
        _line(2, 2.0, 2.0, 2.08, 3.0, 10, [0.015] * 7),
        _line(3, 3.0, 3.001, 3.09, 4.0, 10, [0.02] * 7),
        _line(4, 4.0, 4.0, 4.15, 5.0, 10, [0.01] * 7),
        _line(5, 5.0, 5.0, 5.05, 6.0, 10, [0.01, 0.01, 0.01, 0.03, 0.03, 0.03, 0.02]),
        _line(6, 6.0, 6.0, None, 6.5, 0, None, status="error"),
        _line(7, 7.0, status="not_sent"),
        _line(8, 8.0, 8.0, 8.02, 9.5, 10, [0.01] * 7),
        _line(9, 9.0, 9.0, 9.05, 9.05, 1, None),
    ]
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b"".join(orjson.dumps(ln) + b"\n" for ln in lines))
    slo = parse_slo("ttft_p99<=100ms,itl_p99<=20ms,error_rate<=5%")
    gp = goodput(read_requests(path), slo, start_s=1.0)
    assert (gp.scheduled, gp.ok, gp.failed, gp.met) == (9, 7, 2, 5)  # met: 1, 2, 3, 8, 9
    assert gp.attainment == pytest.approx(5 / 9, abs=1e-6)
    assert gp.span_s == pytest.approx(9.5 - 1.0)  # to the last end among counted requests
    assert gp.goodput_req_s == pytest.approx(5 / 8.5, abs=1e-4)
    whole = goodput(read_requests(path), slo)
    assert (whole.scheduled, whole.met) == (10, 6)
    # A bounded window divides by its own length: request 8 ends at 9.5 s, past the window.
    win = goodput(read_requests(path), slo, 1.0, 9.0)
    assert (win.scheduled, win.met, win.span_s) == (8, 4, pytest.approx(8.0))
    assert win.goodput_req_s == pytest.approx(4 / 8.0, abs=1e-4)
    # itl_max is judged on each request's own max gap: request 3 (20 ms) fails itl_max<20ms.
    assert goodput(read_requests(path), parse_slo("itl_max<20ms"), 1.0).met == 5  # 1,2,4,8,9


def test_bad_requests_file_is_one_line_error(tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b'{"intended_s": 1}\nnot json\n')
    with pytest.raises(ReplayError, match=r"requests.jsonl:2: not a requests.jsonl line"):
        list(read_requests(path))
