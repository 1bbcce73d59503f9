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
    one_by_one, vectorised = H.new(), H.new()
    for v in values:
        H.record_seconds(one_by_one, v)
    H.record_seconds_many(vectorised, np.array(values))
    assert list(vectorised.counts) == list(one_by_one.counts)
    assert vectorised.get_total_count() == one_by_one.get_total_count() == len(values)
    assert (vectorised.min_value, vectorised.max_value) == (one_by_one.min_value, one_by_one.max_value)
    assert H.summary_ms(vectorised) == H.summary_ms(one_by_one)


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
