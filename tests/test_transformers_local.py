"""The transformers target against the real tiny model and transformers' continuous batching, served
from its own process.

Truth here is the request itself (output length is forced, so every request must stream exactly
what it asked for, and the input count must be the prompt we built), the operating system (which
process runs the model, on which cores, whether it is still alive) and our own clock reads
bracketing the model process's.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from replay.core import errors
from replay.core.errors import ReplayError
from replay.core.request import ERROR, OK, Request, RequestRecord, record_for
from replay.core.target import Target
from replay.targets import model_wire, tiny_model
from replay.targets.transformers_local import TransformersLocalTarget, TransformersTargetConfig

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return tiny_model.build()


@pytest.fixture
async def target(model_dir: Path, tmp_path: Path) -> AsyncIterator[TransformersLocalTarget]:
    t = TransformersLocalTarget(
        TransformersTargetConfig(model_dir=str(model_dir), warmup_requests=2, kv_cache_gib=0.125),
        log_path=tmp_path / "model.log",
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
    assert t.pids() == []  # nothing runs before start()
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
        assert d["batching"]["max_requests_per_batch"] == 32


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
    for _ in range(200):  # the model process drops it at its next step
        stats = await target.backend_stats()
        if not stats["active"] and not stats["waiting"] and not stats["admitted"]:
            break
        await asyncio.sleep(0.01)
    assert stats["active"] == stats["waiting"] == stats["admitted"] == stats["backlog"] == 0, stats
    assert rec.streamed_tokens() < 1500
    [ok] = await _run(target, [_req(2, 10, 3, target.vocab_size)], in_flight=1)
    _assert_exact(ok, 10, 3)


async def test_backend_crash_maps_to_target_error(target: TransformersLocalTarget) -> None:
    """Fault injection: the model process's next generation step raises. In-flight and later
    requests fail as target errors with the backend's detail; the process itself lives on."""
    req = _req(1, 12, 400, target.vocab_size)
    rec = record_for(req)
    task = asyncio.ensure_future(target.send(req, rec))
    while not rec.chunk_s:
        await asyncio.sleep(0.01)
    assert target._link is not None
    target._link.write([model_wire.FAULT, "step"])
    await asyncio.wait_for(task, timeout=30)
    assert rec.status == ERROR and rec.error == errors.TARGET_ERROR
    assert "injected kernel failure" in (rec.error_detail or "")
    assert 0 < rec.streamed_tokens() < 400
    for _ in range(100):  # the model process's watchdog reports the dead generation loop
        if target._dead:
            break
        await asyncio.sleep(0.05)
    [after] = await _run(target, [_req(2, 10, 3, target.vocab_size)], in_flight=1)
    assert after.status == ERROR and after.error == errors.TARGET_ERROR
    assert "generation thread stopped" in (after.error_detail or "")
    assert target.pids() and psutil.pid_exists(target.pids()[0])


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


async def test_model_runs_in_its_own_process_on_its_own_cores(target: TransformersLocalTarget) -> None:
    """The OS says: the model is a child process of ours, pinned away from the lowest core (the
    generator's) when there are several, with one torch thread per core it has."""
    [pid] = target.pids()
    assert pid != os.getpid()
    child = psutil.Process(pid)
    assert child.ppid() == os.getpid()
    assert "replay.targets.model_process" in " ".join(child.cmdline())
    mine = sorted(os.sched_getaffinity(0))
    expected = mine[1:] if len(mine) > 1 else mine
    assert sorted(child.cpu_affinity()) == expected
    d = target.describe()
    assert d["pid"] == pid and d["cores"] == expected and d["torch_threads"] == len(expected)
    assert child.num_threads() >= 3  # reader, transformers' generation thread, sender


_CLIENT_RUN = """
import asyncio, sys
from replay.core.request import Request, record_for
from replay.targets.transformers_local import TransformersLocalTarget, TransformersTargetConfig

async def main():
    t = TransformersLocalTarget(TransformersTargetConfig(model_dir=sys.argv[1], kv_cache_gib=0.125))
    await t.start()
    r = Request(id=1, intended_s=0.0, input_tokens=3, output_tokens=4, prompt_text="a tiny llama")
    rec = record_for(r)
    await t.send(r, rec)
    await t.close()
    print(rec.status, rec.usage_output_tokens, "torch" in sys.modules, "transformers" in sys.modules)

asyncio.run(main())
"""


def test_the_client_never_imports_torch(model_dir: Path) -> None:
    """A run through the target from a fresh interpreter leaves torch and transformers unimported there."""
    r = subprocess.run(
        [sys.executable, "-c", _CLIENT_RUN, str(model_dir)], capture_output=True, text=True, timeout=240
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["ok", "4", "False", "False"], r.stdout


async def test_token_times_are_on_our_clock(target: TransformersLocalTarget) -> None:
    """perf_counter is CLOCK_MONOTONIC, one clock for every process on the host: each of the model
    process's reads falls between two of ours, and every token it stamps falls between our send and
    our receipt of the last update."""
    for _ in range(20):
        a = time.perf_counter()
        t = await target._link.rpc(model_wire.PING)  # type: ignore[union-attr]
        b = time.perf_counter()
        assert a <= t <= b, (a, t, b)
    for i in range(5):
        req = _req(i, 16, 8, target.vocab_size, seed=2)
        rec = record_for(req)
        rec.status = OK
        await target.send(req, rec)
        received = time.perf_counter()
        rec.finish_tokens()
        _assert_exact(rec, 16, 8)
        assert rec.sent_s is not None and rec.end_s is not None
        assert rec.sent_s < rec.chunk_s[0] and rec.end_s <= received
    assert target.clock_check is not None and target.clock_check["bracket_ms"] < 50


async def test_killed_model_process_fails_requests_by_kind(target: TransformersLocalTarget) -> None:
    """SIGKILL the model process mid-stream: in-flight and later requests fail as target_died at once
    (no waiting on timeouts), close() is clean, and no process is left behind."""
    [pid] = target.pids()
    reqs = [_req(i, 12, 400, target.vocab_size) for i in range(3)]
    recs = [record_for(r) for r in reqs]
    tasks = [asyncio.ensure_future(target.send(r, rec)) for r, rec in zip(reqs, recs, strict=True)]
    while not all(rec.chunk_s for rec in recs):
        await asyncio.sleep(0.01)
    t_kill = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=5)
    assert time.perf_counter() - t_kill < 2.0
    for rec in recs:
        assert rec.status == ERROR and rec.error == errors.TARGET_DIED, (rec.error, rec.error_detail)
        assert "SIGKILL" in (rec.error_detail or "") or "closed its socket" in (rec.error_detail or "")
    [after] = await _run(target, [_req(9, 10, 3, target.vocab_size)], in_flight=1)
    assert after.status == ERROR and after.error == errors.TARGET_DIED
    await target.close()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert target.pids() == []


async def _run_schedule(
    target: TransformersLocalTarget, out: Path, rate: float, duration: float, drain_s: float
) -> dict:
    from replay.run.config import RunConfig
    from replay.run.runner import execute
    from replay.schedule import arrivals
    from replay.schedule import synthetic as schedule
    from replay.schedule.prompts import PromptBuilder

    cfg = RunConfig(
        target="transformers",
        rate=rate,
        duration_s=duration,
        drain_timeout_s=drain_s,
        interval_s=1,
        quiet=True,
    )
    sched = schedule.synthetic(
        arrivals.offsets(cfg.arrival_spec(), 0),
        input_tokens=64,
        output_tokens=64,
        prompts=PromptBuilder(0, 4, target.vocab_size),
        duration_s=duration,
        max_requests=None,
    )
    res = await execute(cfg, target, sched, out, rate)
    return res.summary


async def test_killed_model_process_ends_the_run_cleanly(model_dir: Path, tmp_path: Path) -> None:
    """SIGKILL mid-run through the runner: the run ends on schedule (not after the 60 s drain), every
    request is counted, the failures by kind, and no process is left behind."""
    t = TransformersLocalTarget(
        TransformersTargetConfig(model_dir=str(model_dir), warmup_requests=1, kv_cache_gib=0.125),
        log_path=tmp_path / "model.log",
    )
    killed: list[int] = []

    async def kill_after_some_tokens() -> None:
        while not t.pids() or t.warmup_s is None:
            await asyncio.sleep(0.05)
        await asyncio.sleep(2.0)
        killed.append(t.pids()[0])
        os.kill(killed[0], signal.SIGKILL)

    killer = asyncio.ensure_future(kill_after_some_tokens())
    t0 = time.perf_counter()
    s = await _run_schedule(t, tmp_path, rate=5.0, duration=6.0, drain_s=60.0)
    elapsed = time.perf_counter() - t0
    await killer
    c = s["counts"]
    assert c["accounted"] and c["unfinished"] == 0
    assert c["errors"].get(errors.TARGET_DIED, 0) > 0 and set(c["errors"]) == {errors.TARGET_DIED}, c
    assert c["ok"] > 0  # some finished before the kill
    assert elapsed < t.load_s + 6.0 + 10.0, elapsed  # start-up + schedule + margin, not + the drain
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
    assert t.pids() == []


async def test_overloaded_run_counts_unfinished_apart(model_dir: Path, tmp_path: Path) -> None:
    """Far more than the model serves, a short drain: what is still in flight is `unfinished`, not an
    error, the counts add up, and the summary's first line says the server was saturated."""
    from replay.stats.summary import console_table

    t = TransformersLocalTarget(
        TransformersTargetConfig(model_dir=str(model_dir), warmup_requests=1, kv_cache_gib=0.125),
        log_path=tmp_path / "model.log",
    )
    s = await _run_schedule(t, tmp_path, rate=60.0, duration=4.0, drain_s=1.0)
    c, v = s["counts"], s["saturation"]
    assert c["accounted"] and not c["errors"] and not c["not_sent"]
    assert c["unfinished"] > 0 and c["ok"] + c["unfinished"] == c["scheduled"]
    assert v["verdict"] == "saturated" and v["unfinished"] == c["unfinished"]
    lines = console_table(s).splitlines()
    assert lines[0].startswith("SERVER SATURATED: offered 60.0 req/s")
    assert any("still in flight at the drain deadline" in ln for ln in lines[:4])
    assert t.pids() == []
