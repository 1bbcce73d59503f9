"""Trace schedules: known arrivals in, exact intended times out."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

from replay.core.errors import ReplayError
from replay.engine.open_loop import Engine
from replay.run.runner import run_in_uvloop
from replay.schedule.from_trace import parse_window, schedule_from_trace, trace_timing
from replay.schedule.prompts import PromptBuilder
from replay.targets.fake import FakeTarget
from replay.trace.formats import load_trace
from replay.trace.model import HASH_ID_LIMIT, TraceRecord

SAMPLES = Path(__file__).resolve().parents[1] / "traces" / "samples"
TIMES = [0.0, 1.0, 3.0, 6.0]  # N = 4, span 6, D = 6 * 4/3 = 8, mean rate 0.5/s


def recs(times=TIMES, **kw):
    # input_tokens = index, so each request maps back to its record
    return [TraceRecord(t, i + 1, 2, source_line=i + 1, **kw) for i, t in enumerate(times)]


def sched(records=None, **kw):
    kw.setdefault("prompts", None)
    return list(schedule_from_trace(recs() if records is None else records, **kw))


def times(reqs):
    return [r.intended_s for r in reqs]


def test_plain_replay_keeps_arrivals_and_ids_in_send_order():
    out = sched()
    assert times(out) == TIMES
    assert [r.id for r in out] == [0, 1, 2, 3]
    assert [r.input_tokens for r in out] == [1, 2, 3, 4]


def test_speedup_compresses_time():
    assert times(sched(speedup=2)) == [0.0, 0.5, 1.5, 3.0]
    assert times(sched(speedup=0.5)) == [0.0, 2.0, 6.0, 12.0]


def test_timing_and_rate_rescale():
    t = trace_timing(recs())
    assert (t.count, t.duration_s, t.mean_rate) == (4, 8.0, 0.5)
    # rate 2 = 4 x the trace's 0.5/s: every gap shrinks 4-fold
    assert times(sched(rate=2.0)) == [0.0, 0.25, 0.75, 1.5]
    assert times(sched(rate=0.25)) == [0.0, 2.0, 6.0, 12.0]


def test_rate_keeps_order_and_relative_gaps_on_a_real_trace():
    tf = load_trace(SAMPLES / "azure_llm_2023_conv_sample.csv")
    orig = np.array([r.arrival_s for r in tf])
    timing = trace_timing(tf)
    assert timing.count == 200
    assert timing.duration_s == pytest.approx(orig[-1] * 200 / 199)
    out = list(schedule_from_trace(tf, rate=50.0, prompts=None))
    got = np.array(times(out))
    assert [r.id for r in out] == list(range(200))
    assert np.all(np.diff(got) >= 0)
    assert [r.input_tokens for r in out] == [r.input_tokens for r in tf]  # same order as the trace
    scale = timing.mean_rate / 50.0
    assert got == pytest.approx(orig * scale, abs=1e-12)  # every gap scaled by one factor
    # the scaled schedule's own mean rate, by the same definition, is exactly 50/s
    assert 200 / (got[-1] * 200 / 199) == pytest.approx(50.0, rel=1e-12)


def test_window_cuts_and_rebases_to_start():
    assert times(sched(window=(1.0, 6.0))) == [0.0, 2.0]
    assert times(sched(window=(0.5, 6.0))) == [0.5, 2.5]  # the silence after START is kept
    assert times(sched(window=(3.0, math.inf))) == [0.0, 3.0]
    assert [r.input_tokens for r in sched(window=(1.0, 6.0))] == [2, 3]
    assert trace_timing(recs(), (1.0, 6.0)).duration_s == 5.0
    # 2 arrivals in 5 s is 0.4/s: rate 0.8 halves every gap
    assert times(sched(window=(1.0, 6.0), rate=0.8)) == [0.0, 1.0]


def test_loop_lays_passes_back_to_back():
    out = sched(loop=True, max_requests=10)
    assert times(out) == [0, 1, 3, 6, 8, 9, 11, 14, 16, 17]
    assert [r.id for r in out] == list(range(10))
    out = sched(loop=True, window=(1.0, 6.0), max_requests=6)
    assert times(out) == [0, 2, 5, 7, 10, 12]
    out = sched(loop=True, speedup=2, duration_s=8.0)  # period 8 -> 4 s after scaling
    assert times(out) == [0, 0.5, 1.5, 3, 4, 4.5, 5.5, 7]


def test_loop_gives_each_pass_fresh_prefixes_and_sessions():
    rs = recs(hash_ids=(3, 4), block_size=16, session_id="s")
    for r in rs:
        r.input_tokens = 32
    out = sched(rs, loop=True, max_requests=9)
    assert [r.prefix_hash_ids for r in out[:4]] == [(3, 4)] * 4
    assert out[4].prefix_hash_ids == (3 + HASH_ID_LIMIT, 4 + HASH_ID_LIMIT)
    assert out[8].prefix_hash_ids == (3 + 2 * HASH_ID_LIMIT, 4 + 2 * HASH_ID_LIMIT)
    assert [r.session_id for r in (out[0], out[4], out[8])] == ["s", "s#1", "s#2"]
    pb = PromptBuilder(0)
    ids = list(schedule_from_trace(rs, loop=True, max_requests=5, prompts=pb))
    assert ids[0].prompt_token_ids == ids[1].prompt_token_ids  # same blocks within a pass
    assert ids[4].prompt_token_ids[0] != ids[0].prompt_token_ids[0]


def test_duration_and_count_cut():
    assert times(sched(duration_s=3.0)) == [0.0, 1.0]  # exclusive end
    assert times(sched(max_requests=3)) == [0.0, 1.0, 3.0]
    assert sched(max_requests=0) == []


def test_jitter_stays_inside_each_bucket_and_is_seeded():
    base = np.repeat(np.arange(0, 30, 3.0), 7)  # Mooncake-like: 7 arrivals per 3 s bucket
    rs = recs(list(base))
    a = sched(rs, jitter_bucket_s=3.0, seed=1)
    assert len(a) == len(rs)
    got = np.array(times(a))
    assert np.all(np.diff(got) >= 0)  # still in send order
    src = np.array([base[r.input_tokens - 1] for r in a])
    assert np.all((got >= src) & (got < src + 3.0))
    assert len(set(got.tolist())) == len(got)  # the bursts are spread out
    assert times(sched(rs, jitter_bucket_s=3.0, seed=1)) == times(a)
    assert times(sched(rs, jitter_bucket_s=3.0, seed=2)) != times(a)
    # with speedup the bucket is in trace time: [t, t + 3) / 2
    b = sched(rs, jitter_bucket_s=3.0, seed=1, speedup=2.0)
    assert times(b) == pytest.approx((got / 2).tolist())


def test_jitter_on_the_mooncake_sample_across_loop_seams():
    tf = load_trace(SAMPLES / "mooncake_fast25_conversation_sample.jsonl")
    timing = trace_timing(tf)
    out = list(
        schedule_from_trace(tf, jitter_bucket_s=3.0, loop=True, max_requests=500, seed=0, prompts=None)
    )
    got = np.array(times(out))
    assert len(out) == 500 and np.all(np.diff(got) >= 0)
    assert got[-1] > 2 * timing.duration_s  # reached the third pass


def test_bad_knobs_are_one_line_errors():
    with pytest.raises(ReplayError, match="either --speedup or --rate"):
        sched(speedup=2, rate=3)
    with pytest.raises(ReplayError, match="loop: needs --duration or --requests"):
        sched(loop=True)
    with pytest.raises(ReplayError, match="speedup: must be a positive"):
        sched(speedup=0)
    with pytest.raises(ReplayError, match="window: needs 0 <= START < END"):
        sched(window=(5, 2))
    with pytest.raises(ReplayError, match="window 7:9 contains no requests"):
        sched(window=(7, 9), rate=1)
    with pytest.raises(ReplayError, match="no time span"):
        sched(recs([0.0, 0.0]), rate=1)
    with pytest.raises(ReplayError, match="line 2 arrives at 1 s, before the previous one"):
        sched(recs([3.0, 1.0]))


def test_parse_window():
    assert parse_window("10:20") == (10.0, 20.0)
    assert parse_window("10:") == (10.0, math.inf)
    assert parse_window(":5") == (0.0, 5.0)
    with pytest.raises(ReplayError, match="START:END"):
        parse_window("10")


def test_one_shot_iterator_is_buffered_for_the_extra_pass():
    assert times(schedule_from_trace(iter(recs()), rate=2.0, prompts=None)) == [0.0, 0.25, 0.75, 1.5]


def test_prompts_filled_with_exact_lengths_and_text_kept():
    rs = recs()
    rs[1].prompt_text = "hello"
    rs[2].prompt_token_ids = [9, 9, 9]
    out = sched(rs, prompts=PromptBuilder(0))
    assert [len(r.prompt_token_ids or []) for r in out] == [1, 0, 3, 4]
    assert out[1].prompt_text == "hello" and out[1].prompt_token_ids is None
    assert out[2].prompt_token_ids == [9, 9, 9]


def test_replay_against_fake_target_sends_on_the_scaled_trace_times():
    """Acceptance: actual send offsets match the trace's scaled arrivals within 2 ms at p99, on
    uvloop (the loop `replay run` uses)."""
    tf = load_trace(SAMPLES / "azure_llm_2023_conv_sample.csv")
    speedup = 25.0  # 61 s of trace in ~2.5 s
    expected = np.array([r.arrival_s for r in tf]) / speedup
    reqs = list(schedule_from_trace(tf, speedup=speedup, prompts=None))
    for r in reqs:
        r.output_tokens = 4
    got: list = []

    async def go() -> None:
        target = FakeTarget(ttft_s=0.005, itl_s=0.001)
        await target.start()
        await Engine(target, got.append).run(reqs, time.perf_counter() + 0.05)
        await target.close()

    run_in_uvloop(go())
    got.sort(key=lambda r: r.id)
    sent = np.array([r.sent_s for r in got])
    assert len(sent) == 200 and all(r.status == "ok" for r in got)
    err_ms = np.abs(sent - expected) * 1000
    assert np.percentile(err_ms, 99) < 2.0, np.percentile(err_ms, [50, 99, 100])
