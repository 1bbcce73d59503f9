"""Splitting one schedule over workers: the union of the shards is exactly the one-process schedule."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from replay.core.request import Request
from replay.run.config import RunConfig
from replay.scaleout.shard import FilteredSchedule, SyntheticSchedule, split_cap
from replay.schedule import arrivals
from replay.schedule import synthetic as schedule
from replay.schedule.prompts import DEFAULT_HIGH_ID, PromptBuilder

CONFIGS = [
    RunConfig(target="x", rate=300.0, duration_s=20.0, seed=3),
    RunConfig(target="x", rate=50.0, duration_s=30.0, arrival="gamma", burstiness=0.3, seed=11),
    RunConfig(target="x", rate=10.0, ramp_to=400.0, duration_s=25.0, seed=5),
    RunConfig(target="x", rate=80.0, duration_s=None, requests=1500, arrival="constant", seed=1),
]


def one_process(cfg: RunConfig, vocab: int) -> list[Request]:
    """The schedule exactly as replay.cli.main builds it for one process."""
    return list(
        schedule.synthetic(
            arrivals.offsets(cfg.arrival_spec(), cfg.seed),
            input_tokens=cfg.input_tokens,
            output_tokens=cfg.output_tokens,
            prompts=PromptBuilder(cfg.seed, 256, min(vocab, DEFAULT_HIGH_ID)),
            duration_s=cfg.duration_s,
            max_requests=cfg.requests,
        )
    )


def key(r: Request) -> tuple:
    return (r.id, r.intended_s, r.input_tokens, r.output_tokens, tuple(r.prompt_token_ids or ()))


@pytest.mark.parametrize("cfg", CONFIGS, ids=["poisson", "gamma", "ramp", "constant-count"])
@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_union_of_shards_is_exactly_the_schedule(cfg: RunConfig, n: int) -> None:
    whole = one_process(cfg, 5000)
    recipe = SyntheticSchedule.from_config(cfg, vocab_size=5000)
    shards = [list(recipe(w, n)) for w in range(n)]
    union = sorted((key(r) for s in shards for r in s), key=lambda k: k[0])
    assert union == [key(r) for r in whole]  # same ids, bit-identical times and prompts
    for w, s in enumerate(shards):
        assert all(r.id % n == w for r in s)
        ts = [r.intended_s for r in s]
        assert ts == sorted(ts)  # each worker dispatches its share in time order


@pytest.mark.parametrize("n", [2, 4])
def test_every_shard_spans_the_run_at_its_share_of_the_rate(n: int) -> None:
    # Shards interleave over the whole run (no worker owns a time range, so there is no burst where
    # one shard hands over to the next), and each carries 1/n of the requests in every window.
    cfg = CONFIGS[0]
    recipe = SyntheticSchedule.from_config(cfg)
    whole = one_process(cfg, 30_000)
    windows = np.arange(0.0, cfg.duration_s + 1e-9, 2.0)
    total, _ = np.histogram([r.intended_s for r in whole], windows)
    for w in range(n):
        counts, _ = np.histogram([r.intended_s for r in recipe(w, n)], windows)
        # Round-robin by id: in any window a shard's count is within 1 of total/n.
        assert np.all(np.abs(counts - total / n) <= 1.0)


def _trace_schedule(n: int) -> list[Request]:
    rng = np.random.default_rng(9)
    t = np.cumsum(rng.exponential(0.01, n))
    return [
        Request(id=i, intended_s=float(x), input_tokens=10 + i % 7, output_tokens=5) for i, x in enumerate(t)
    ]


def test_filtered_schedule_splits_any_schedule_by_id() -> None:
    whole = _trace_schedule(1000)
    recipe = FilteredSchedule(functools.partial(_trace_schedule, 1000))
    for n in (1, 3):
        union = sorted((r for w in range(n) for r in recipe(w, n)), key=lambda r: r.id)
        assert [(r.id, r.intended_s, r.input_tokens) for r in union] == [
            (r.id, r.intended_s, r.input_tokens) for r in whole
        ]


@pytest.mark.parametrize("cap,n", [(1, 1), (10, 3), (7, 2), (64, 4), (2, 3)])
def test_split_cap_shares_sum_to_the_cap(cap: int, n: int) -> None:
    shares = [split_cap(cap, w, n) for w in range(n)]
    assert all(s is not None and s >= 1 for s in shares)
    if cap >= n:
        assert sum(shares) == cap and max(shares) - min(shares) <= 1
    else:  # fewer slots than workers: every worker still needs one to send at all
        assert shares == [1] * n
    assert split_cap(None, 0, 2) is None


def test_primed_schedule_is_the_same_schedule_with_its_first_step_taken() -> None:
    """The runner and each worker prime their schedule before t0: same requests, nothing lost,
    and the generator set-up (6-11 ms) already paid when primed() returns."""
    cfg = CONFIGS[0]
    made: list[int] = []

    def counted():  # noqa: ANN202
        for r in SyntheticSchedule.from_config(cfg, 8192)():
            made.append(r.id)
            yield r

    it = schedule.primed(counted())
    assert made == [0]
    assert [key(r) for r in it] == [key(r) for r in one_process(cfg, 8192)]
    assert list(schedule.primed(iter(()))) == []
