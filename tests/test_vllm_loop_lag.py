"""A vLLM the tool starts itself must not stall the tool's own event loop (issue 10).

The defect: the server was launched in a session of its own. With Linux autogroup scheduling each
session is a CPU-scheduling group, and vLLM-CPU's engine core busy-polls for the length of every
generation; the client's mostly idle group then sat on the run queue behind it for the whole
generation: loop-lag max 424 ms (p99 242 ms) in a 15 s run here, TTFT p50 186 ms = E2E, ITL p50 0.
Fixed (server_process: own process group, same session). 30 s runs on this 2-core box while other
jobs kept it busy (load average 10-12), each beside a control process doing only 10 ms asyncio
sleeps: old code loop-lag max 398 ms, bursts 36 of 105 (the control, outside vLLM's session, 426 ms);
fixed 54 ms, no burst, TTFT/ITL p50 10.8/2.9 ms vs 10.7/2.7 ms for the same build started by hand
and targeted by URL (the control 50-60 ms: the machine's noise, not ours). Bound 5 ms: the
acceptance criterion and the self-check's stall threshold. Our own on-loop work stays far below
it (the /metrics parse 0.18 ms, was 5.8 ms with prometheus_client; the schedule's first step,
6-11 ms, is taken before t0), so it is meant for a machine nothing else loads, as in CI (with the
server pinned off the generator's core: loop-lag max 3.3 ms, bench/results-vllm-started.md); on a
shared, busy box it fails on the box's noise, which the control above shows.

A closed loop at concurrency 1 is the clean case: one stream, no queueing, so any gap between the
tokens vLLM emits (one per ~2.7 ms decode step) and the ones we see is the client's own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOOP_LAG_MAX_MS = 5.0
TOKENS = 64


@pytest.mark.vllm
def test_started_vllm_streams_without_stalling_the_loop(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "replay", "run", "--target", "vllm", "--concurrency", "1",
         "--duration", "15", "--input-tokens", str(TOKENS), "--output-tokens", str(TOKENS),
         "--out", str(out), "--quiet"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["counts"]["ok"] == s["counts"]["scheduled"] > 20
    recs = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    # A stream seen as one burst has its first token at (nearly) its end; a streamed one spends
    # most of its time after the first token (63 decode steps vs one 64-token prefill).
    streamed = [x for x in recs if x["end_s"] - x["first_token_s"] > 0.5 * (x["end_s"] - x["sent_s"])]
    bursts = len(recs) - len(streamed)
    assert len(streamed) >= 0.9 * len(recs), f"{bursts} of {len(recs)} streams arrived as one burst"
    assert s["metrics"]["itl"]["p50"] > 1.0, s["metrics"]["itl"]
    assert s["metrics"]["ttft"]["p50"] < 0.5 * s["metrics"]["e2e"]["p50"], s["metrics"]["ttft"]
    sc = s["selfcheck"]
    assert sc["loop_lag_max_ms"] < LOOP_LAG_MAX_MS, (sc["loop_lag_max_ms"], sc["stalls"])  # with their causes
