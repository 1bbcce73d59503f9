"""The in-process transformers target against the real tiny model and transformers' continuous batching.

Truth here is the request itself: output length is forced, so every request must stream exactly
what it asked for, and the input count must be the prompt we built.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from replay.core import errors
from replay.core.errors import ReplayError
from replay.core.request import ERROR, OK, Request, RequestRecord, record_for
from replay.core.target import Target
from replay.targets import tiny_model
from replay.targets.transformers_local import TransformersLocalTarget, TransformersTargetConfig

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return tiny_model.build()


@pytest.fixture
async def target(model_dir: Path) -> AsyncIterator[TransformersLocalTarget]:
    t = TransformersLocalTarget(
        TransformersTargetConfig(model_dir=str(model_dir), warmup_requests=2, kv_cache_gib=0.125)
    )
    await t.start()
    try:
        yield t
    finally:
        await t.close()


def _req(i: int, n_in: int, n_out: int, vocab: int, seed: int = 0) -> Request:
    rng = random.Random(seed * 100_003 + i)
    ids = [rng.randrange(4, vocab) for _ in range(n_in)]
    return Request(id=i, intended_s=0.0, input_tokens=n_in, output_tokens=n_out, prompt_token_ids=ids)


async def _run(target: TransformersLocalTarget, reqs: list[Request], in_flight: int) -> list[RequestRecord]:
    sem = asyncio.Semaphore(in_flight)
    recs = [record_for(r) for r in reqs]

    async def one(r: Request, rec: RequestRecord) -> None:
        async with sem:
            rec.sent_s = time.perf_counter()
            rec.status = OK
            await target.send(r, rec)
            rec.finish_tokens()

    await asyncio.gather(*(one(r, rec) for r, rec in zip(reqs, recs, strict=True)))
    return recs


def _assert_exact(rec: RequestRecord, n_in: int, n_out: int) -> None:
    assert rec.status == OK, (rec.error, rec.error_detail)
    assert rec.usage_output_tokens == n_out and rec.output_tokens == n_out
    assert rec.streamed_tokens() == sum(rec.chunk_tokens) == n_out
    assert rec.usage_input_tokens == n_in and rec.input_tokens == n_in
    assert rec.sent_s is not None and rec.first_token_s is not None and rec.end_s is not None
    assert rec.sent_s < rec.first_token_s <= rec.chunk_s[-1] <= rec.end_s
    assert rec.chunk_s == sorted(rec.chunk_s)


async def test_describe_and_protocol_before_start(model_dir: Path) -> None:
    t = TransformersLocalTarget(TransformersTargetConfig(model_dir=str(model_dir)))
    assert isinstance(t, Target)
    assert t.vocab_size == tiny_model.PARAMS["vocab_size"]  # known before start, for the prompt builder
    assert t.pids() == [os.getpid()]
    with pytest.raises(ReplayError, match="not a model directory"):
        TransformersLocalTarget(TransformersTargetConfig(model_dir=str(model_dir / "nope")))


async def test_exact_lengths_and_plausible_timings(target: TransformersLocalTarget) -> None:
    n_out = 16
    reqs = [_req(i, 8 + 5 * i, n_out, target.vocab_size) for i in range(20)]
    recs = await _run(target, reqs, in_flight=4)
    for r, rec in zip(reqs, recs, strict=True):
        _assert_exact(rec, r.input_tokens, n_out)
        ttft = rec.ttft()
        assert ttft is not None and 0 < ttft < 5.0
        itls = rec.itls()
        assert len(itls) == n_out - 1
        assert all(0 < x < 1.0 for x in itls), itls  # one token per update: every gap is real
    d = target.describe()
    assert d["warmup_s"] is not None and d["batching"]["num_blocks"] > 0
    if d["device"] == "cpu":  # CPU defaults; on an accelerator transformers sizes these itself
        assert d["dtype"] == "float32" and d["batching"]["max_batch_tokens"] == 512


async def test_eos_is_ignored(model_dir: Path, tmp_path: Path) -> None:
    """Make the model's EOS the very token greedy decoding emits first: output length must not change."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    prompt = [11, 22, 33, 44, 55]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        first = int(model(torch.tensor([prompt])).logits[0, -1].argmax())
    copy = tmp_path / "eos-model"
    shutil.copytree(model_dir, copy)
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((copy / name).read_text())
        cfg["eos_token_id"] = first
        (copy / name).write_text(json.dumps(cfg))
    t = TransformersLocalTarget(
        TransformersTargetConfig(model_dir=str(copy), warmup_requests=0, kv_cache_gib=0.125)
    )
    await t.start()
    try:
        req = Request(id=1, intended_s=0.0, input_tokens=5, output_tokens=8, prompt_token_ids=prompt)
        [rec] = await _run(t, [req], in_flight=1)
    finally:
        await t.close()
    _assert_exact(rec, 5, 8)


async def test_many_in_flight_do_not_block_the_loop(target: TransformersLocalTarget) -> None:
    """Hundreds of concurrent sends: all exact, and the event loop keeps ticking meanwhile."""
    lags: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        while not done.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - t - 0.01)

    tick = asyncio.ensure_future(ticker())
    reqs = [_req(i, 16, 4, target.vocab_size, seed=1) for i in range(200)]
    recs = await _run(target, reqs, in_flight=200)
    done.set()
    await tick
    for rec in recs:
        _assert_exact(rec, 16, 4)
    assert lags and max(lags) < 0.5, max(lags)


async def test_prompt_text_is_tokenized(target: TransformersLocalTarget, model_dir: Path) -> None:
    from transformers import AutoTokenizer

    text = "Tell me a story about a tiny llama."
    n_in = len(AutoTokenizer.from_pretrained(model_dir).encode(text))
    req = Request(id=1, intended_s=0.0, input_tokens=0, output_tokens=5, prompt_text=text)
    [rec] = await _run(target, [req], in_flight=1)
    _assert_exact(rec, n_in, 5)


async def test_bad_requests_fail_alone(target: TransformersLocalTarget) -> None:
    """Input that would crash the shared generation loop is refused per request; the target lives on."""
    v = target.vocab_size
    bad = [
        Request(id=1, intended_s=0.0, input_tokens=3, output_tokens=4, prompt_token_ids=[5, v, 6]),
        Request(id=2, intended_s=0.0, input_tokens=3, output_tokens=0, prompt_token_ids=[5, 6, 7]),
        Request(id=3, intended_s=0.0, input_tokens=0, output_tokens=4, prompt_token_ids=[]),
        _req(4, 2000, 100, v),  # beyond max_position_embeddings (2048)
    ]
    recs = await _run(target, bad, in_flight=4)
    for rec in recs:
        assert rec.status == ERROR and rec.error == errors.TARGET_ERROR and rec.error_detail
        assert rec.end_s is not None and rec.first_token_s is None
    assert "outside the vocabulary" in (recs[0].error_detail or "")
    assert "exceed the context limit 2048" in (recs[3].error_detail or "")
    [ok] = await _run(target, [_req(5, 10, 3, v)], in_flight=1)
    _assert_exact(ok, 10, 3)


async def test_cancel_cancels_the_backend_request(target: TransformersLocalTarget) -> None:
    req = _req(1, 12, 1500, target.vocab_size)
    rec = record_for(req)
    task = asyncio.ensure_future(target.send(req, rec))
    for _ in range(500):  # wait for the first token, bounded
        if rec.chunk_s:
            break
        await asyncio.sleep(0.01)
    assert rec.chunk_s
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not target._pending
    scheduler = target._manager.batch_processor.scheduler
    for _ in range(200):  # the loop drops it at its next step
        if not scheduler.active_requests and not scheduler.waiting_requests:
            break
        await asyncio.sleep(0.01)
    assert not scheduler.active_requests and not scheduler.waiting_requests
    assert rec.streamed_tokens() < 1500
    [ok] = await _run(target, [_req(2, 10, 3, target.vocab_size)], in_flight=1)
    _assert_exact(ok, 10, 3)


async def test_backend_crash_maps_to_target_error(target: TransformersLocalTarget) -> None:
    """Fault injection: the generation step raises. In-flight and later requests fail with detail."""
    manager = target._manager
    real_step = manager._generation_step
    req = _req(1, 12, 400, target.vocab_size)
    rec = record_for(req)
    task = asyncio.ensure_future(target.send(req, rec))
    while not rec.chunk_s:
        await asyncio.sleep(0.01)

    def boom() -> None:
        raise RuntimeError("injected kernel failure")

    manager._generation_step = boom
    await asyncio.wait_for(task, timeout=30)
    manager._generation_step = real_step
    assert rec.status == ERROR and rec.error == errors.TARGET_ERROR
    assert "injected kernel failure" in (rec.error_detail or "")
    assert 0 < rec.streamed_tokens() < 400
    [after] = await _run(target, [_req(2, 10, 3, target.vocab_size)], in_flight=1)
    assert after.status == ERROR and after.error == errors.TARGET_ERROR
    assert "not accepting" in (after.error_detail or "")


async def test_close_fails_requests_in_flight(model_dir: Path) -> None:
    t = TransformersLocalTarget(
        TransformersTargetConfig(model_dir=str(model_dir), warmup_requests=0, kv_cache_gib=0.125)
    )
    await t.start()
    req = _req(1, 12, 1500, t.vocab_size)
    rec = record_for(req)
    task = asyncio.ensure_future(t.send(req, rec))
    while not rec.chunk_s:
        await asyncio.sleep(0.01)
    await asyncio.wait_for(t.close(), timeout=60)
    await asyncio.wait_for(task, timeout=5)
    assert rec.status == ERROR and rec.error == errors.TARGET_ERROR
    with pytest.raises(ReplayError, match="before start"):
        await t.send(_req(2, 4, 2, t.vocab_size), record_for(req))
