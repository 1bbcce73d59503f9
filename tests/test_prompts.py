"""Prefix-block prompts: shared hash ids give byte-identical prefixes, nothing else is shared."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import orjson
import pytest

from replay.core.errors import ReplayError
from replay.core.request import Request
from replay.schedule import prompts as prompts_mod
from replay.schedule.prompts import DEFAULT_HIGH_ID, DEFAULT_LOW_ID, PromptBuilder
from replay.trace.formats import load_trace

ROOT = Path(__file__).resolve().parents[1]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def test_existing_api_unchanged():
    pb = PromptBuilder(7)
    a = pb.token_ids(3, 50)
    assert a == PromptBuilder(7).token_ids(3, 50) and len(a) == 50
    assert all(DEFAULT_LOW_ID <= x < DEFAULT_HIGH_ID for x in a)
    assert pb.token_ids(4, 50) != a


@pytest.mark.parametrize("n", [1, 15, 16, 17, 40, 48, 60, 100])
def test_lengths_exact(n):
    pb = PromptBuilder(1)
    assert len(pb.prefix_token_ids(0, n, (5, 6, 7), 16)) == n
    assert len(pb.prefix_token_ids(0, n, (), 16)) == n


def test_shared_hash_ids_share_exactly_their_blocks():
    pb = PromptBuilder(0)
    a = pb.prefix_token_ids(0, 64, (1, 2, 3, 4), 16)
    b = pb.prefix_token_ids(1, 64, (1, 2, 9, 10), 16)
    c = pb.prefix_token_ids(2, 64, (8, 2, 3, 4), 16)
    assert a[:32] == b[:32]
    assert common_prefix(a, b) < 33  # a random block can match the other's first id by chance only
    assert a[16:] == c[16:] and a[:16] != c[:16]  # same blocks later, but the prefix differs first
    assert a[:16] == pb.block(1, 16).tolist()


def test_no_hash_ids_means_no_shared_prefix():
    pb = PromptBuilder(0)
    seqs = [pb.prefix_token_ids(i, 64, (), 16) for i in range(20)]
    assert max(common_prefix(x, y) for i, x in enumerate(seqs) for y in seqs[i + 1 :]) <= 1


def test_truncation_and_unique_remainder():
    pb = PromptBuilder(0)
    full = pb.prefix_token_ids(0, 48, (1, 2, 3), 16)
    cut = pb.prefix_token_ids(1, 40, (1, 2, 3), 16)
    assert cut == full[:40]  # blocks covering more than L are cut at L
    longer_a = pb.prefix_token_ids(2, 60, (1, 2, 3), 16)
    longer_b = pb.prefix_token_ids(3, 60, (1, 2, 3), 16)
    assert longer_a[:48] == longer_b[:48] == full
    assert longer_a[48:] == pb.token_ids(2, 12) and longer_a[48:] != longer_b[48:]


def test_too_few_blocks_is_an_error_when_full_coverage_is_required():
    pb = PromptBuilder(0)
    with pytest.raises(ReplayError, match=r"request 5: too few prefix blocks: 2 x 16 tokens cover 32"):
        pb.prefix_token_ids(5, 33, (1, 2), 16, require_full_coverage=True)
    assert len(pb.prefix_token_ids(5, 32, (1, 2), 16, require_full_coverage=True)) == 32


def test_blocks_depend_on_block_size_and_seed():
    assert PromptBuilder(0).block(1, 16).tolist() != PromptBuilder(0).block(1, 32)[:16].tolist()
    assert PromptBuilder(0).block(1, 16).tolist() != PromptBuilder(1).block(1, 16).tolist()


def test_blocks_stable_across_processes_and_hash_seeds():
    """Python's hash() is salted per process; blocks must not be."""
    code = (
        "from replay.schedule.prompts import PromptBuilder; "
        "print(PromptBuilder(3).block(123456, 8).tolist())"
    )
    outs = set()
    for salt in ("1", "2"):
        env = {"PYTHONHASHSEED": salt, "PYTHONPATH": str(ROOT)}
        outs.add(
            subprocess.run(
                [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
            ).stdout
        )
    assert outs == {str(PromptBuilder(3).block(123456, 8).tolist()) + "\n"}


def test_cache_eviction_changes_nothing(monkeypatch):
    ref = [PromptBuilder(0).prefix_token_ids(i, 64, (i % 5, 7, i), 16) for i in range(30)]
    monkeypatch.setattr(prompts_mod, "_CACHE_TOKENS", 40)
    pb = PromptBuilder(0)
    assert [pb.prefix_token_ids(i, 64, (i % 5, 7, i), 16) for i in range(30)] == ref
    assert pb._cached_tokens <= 48


def test_for_request_and_mooncake_sample_sharing():
    recs = list(load_trace(ROOT / "traces/samples/mooncake_fast25_conversation_sample.jsonl"))
    pb = PromptBuilder(0)
    reqs = [
        Request(
            i,
            r.arrival_s,
            r.input_tokens,
            r.output_tokens,
            prefix_hash_ids=r.hash_ids,
            prefix_block_size=r.block_size,
        )
        for i, r in enumerate(recs[:4])
    ]
    ids = [pb.for_request(q, require_full_coverage=True) for q in reqs]
    assert [len(x) for x in ids] == [r.input_tokens for r in recs[:4]]
    # The sample's first four requests all start with hash id 0 and nothing else in common.
    for i in range(1, 4):
        assert ids[0][:512] == ids[i][:512]
        assert common_prefix(ids[0], ids[i]) < 513


def test_prompt_pieces_render_the_same_ids_as_json():
    pb = PromptBuilder(5)
    for n, hashes in [(1000, (1, 2, 3)), (1536, (1, 2, 3)), (2000, (1, 2)), (20_000, ()), (0, ())]:
        ids = pb.prompt(9, n, hashes, 512)
        assert len(ids) == n
        ref = PromptBuilder(5).prefix_token_ids(9, n, hashes, 512)
        assert orjson.loads(ids.json()) == ids.tolist() == ref
        assert orjson.loads(ids.json(b'{"prompt":[', b"]}")) == {"prompt": ids.tolist()}


def test_unique_ids_are_one_draw_of_the_request_generator():
    # The documented definition, unchanged by making the ids in chunks: rng([seed, id]) drawn once.
    for n in (1, 8191, 8192, 8193, 30_000):
        ref = np.random.default_rng([4, 17]).integers(DEFAULT_LOW_ID, DEFAULT_HIGH_ID, size=n).tolist()
        assert PromptBuilder(4).token_ids(17, n) == ref


def test_a_block_is_made_once_and_shared_by_every_prompt_naming_it():
    pb = PromptBuilder(0)
    a, b = pb.prompt(0, 1024, (7, 8), 512), pb.prompt(1, 1024, (7, 9), 512)
    assert a.pieces[0] is b.pieces[0] and a.pieces[1] is not b.pieces[1]
    steps = list(a.steps())  # one step per piece not yet made
    assert len(steps) == 2 and all(p.ready for p in a.pieces)
    assert len(list(b.steps())) == 1  # block 7 was made for a
