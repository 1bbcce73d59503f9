"""The vectorised recording paths agree bucket for bucket with hdrh's own record_value (the truth
here is hdrh's independent pure-Python implementation, not ours)."""

from __future__ import annotations

import random

import numpy as np

from replay.core.request import RequestRecord
from replay.stats import histogram as H


def test_record_seconds_many_matches_hdrh_bucket_for_bucket():
    rng = random.Random(7)
    edges = [0.0, -1.0, 0.4e-6, 0.5e-6, 0.6e-6, 1e-6, 2.047e-3, 2.048e-3, 2.049e-3, 4.095e-3,
             3599.9, 3600.0, 9e9]  # fmt: skip
    values = edges * 20 + [10 ** rng.uniform(-7, 3.6) for _ in range(100_000)]
    hdrh, scalar, vectorised = H.new(), H.new(), H.new()
    for v in values:
        hdrh.record_value(min(max(int(round(v * 1e6)), 0), H.HIGHEST))  # hdrh's own pure-Python path
        H.record_seconds(scalar, v)
    H.record_seconds_many(vectorised, np.array(values))
    for ours in (scalar, vectorised):
        assert list(ours.counts) == list(hdrh.counts)
        assert ours.get_total_count() == hdrh.get_total_count() == len(values)
        assert (ours.min_value, ours.max_value) == (hdrh.min_value, hdrh.max_value)
        assert H.summary_ms(ours) == H.summary_ms(hdrh)
    counted = H.new()
    H.record_seconds(counted, 0.0123, 7)
    assert counted.get_total_count() == 7 and counted.get_count_at_value(12300) == 7


def test_itl_runs_are_the_same_samples_as_itls():
    """Few chunks take the plain-Python runs; their samples, percentiles and histogram buckets must be
    those of the vectorised path."""
    rng = random.Random(3)
    for trial in range(300):
        rec = RequestRecord(id=trial, intended_s=0.0)
        t = 1.0
        for _ in range(rng.randint(1, 16)):
            t += rng.choice([0.0, 0.0, rng.uniform(1e-5, 0.05)])
            rec.add_chunk(t, rng.choice([1, 1, 2, 5, 250]))
        runs = rec.itl_runs()
        assert runs is not None
        expanded = sorted(g for g, c in runs for _ in range(c))
        assert np.allclose(expanded, np.sort(rec.itls()), rtol=0, atol=1e-12)
        by_runs, by_array = H.new(), H.new()
        for g, c in runs:
            H.record_seconds(by_runs, g, c)
        H.record_seconds_many(by_array, rec.itls())
        assert list(by_runs.counts) == list(by_array.counts)
        gaps = np.sort(rec.itls())
        if len(gaps):
            n = len(gaps)
            ranks = [max(0, -(-q * n // 100) - 1) for q in (50, 90, 95, 99)]
            want = [round(float(gaps[r]), 6) for r in ranks]
            assert rec.itl_stats()[:4] == want and rec.itl_stats()[5] == round(float(gaps[-1]), 6)
            assert abs(rec.itl_stats()[6] - float(gaps.mean())) <= 1e-6


def test_itls_one_sample_per_token_after_the_first():
    rec = RequestRecord(id=1, intended_s=0.0)
    # 3 tokens at 1.00 s, then 1 after 10 ms, 2 after 20 ms (10 ms each), 1 after 30 ms.
    for t, k in ((1.00, 3), (1.01, 1), (1.03, 2), (1.06, 1)):
        rec.add_chunk(t, k)
    want = [0.01, 0.01, 0.01, 0.03, 0.0, 0.0]
    assert np.allclose(rec.itls(), want)
    s = sorted(want)  # nearest-rank by hand: p50 of 6 values is the 3rd
    assert rec.itl_stats() == [round(x, 6) for x in (s[2], s[5], s[5], s[5], s[5], s[5], sum(s) / 6)]
    assert len(RequestRecord(id=2, intended_s=0.0).itls()) == 0
