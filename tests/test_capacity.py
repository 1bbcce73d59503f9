"""Capacity search against servers whose capacity is known by construction."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from replay.capacity.search import CapacityOptions, CapacitySearch
from replay.capacity.slo import parse_slo
from replay.capacity.watch import StepWatch
from replay.cli.main import main
from replay.run.config import RunConfig
from replay.run.runner import execute
from replay.schedule import arrivals
from replay.schedule import synthetic as schedule
from replay.schedule.prompts import PromptBuilder
from replay.stub.server import StubProcess
from replay.targets.fake import FakeTarget
from replay.targets.registry import load_target
from replay.trace.model import TraceRecord, make_header, write_trace


@pytest.mark.slow
@pytest.mark.timeout(420)
async def test_search_finds_the_analytic_max_rate_of_a_k_slot_stub(tmp_path):
    """The stub serves at most K streams, each taking S = ttft + (n - 1) * itl from admission,
    and queues the rest FIFO. Arrivals come at a constant rate λ (D/D/K):

    - λ <= K/S: arrivals are 1/λ >= S/K apart, so at most ceil(λS) <= K are in service at once,
      nobody waits, and TTFT = ttft (50 ms) for every request: ttft_p99<=200ms holds.
    - λ > K/S: completions top out at μ = K/S, the backlog grows by (λ - μ) per second and the
      wait after t seconds is (λ/μ - 1) t: unbounded, so the SLO fails (and the TTFT trend flags
      saturation) once the window is long enough.

    So the highest rate meeting the SLO is μ = K/S = 8 / 0.24 s = 33.3 req/s. A window of T
    seconds lets rates up to μ (1 + 150 ms / T) pass (under 1% for T >= 20 s), and jitter on a
    busy machine only lowers the measured rate: the interval must hold μ and the estimate lie
    within 5% of it (bench/capacity_search.py holds 2% in 3 of 3 on a quiet machine).
    """
    k, ttft, itl, n = 8, 0.050, 0.010, 20
    mu = k / (ttft + (n - 1) * itl)
    args = ["--max-concurrency", str(k), "--ttft-ms", str(ttft * 1e3), "--itl-ms", str(itl * 1e3)]
    with StubProcess(args) as stub:
        target = load_target(stub.base_url, tmp_path, {})
        opts = CapacityOptions(
            slo=parse_slo("ttft_p99<=200ms"),
            input_tokens=8,
            output_tokens=n,
            arrival="constant",
            step_s=25,
            warmup_s=2,
            probe_s=3,
            max_time_s=330,
            tolerance=0.02,
        )
        doc = await CapacitySearch(target, opts, tmp_path).run()
    res = doc["result"]
    why = [(s["rate_req_s"], s["verdict"], s["reasons"]) for s in doc["steps"]]
    assert res["client_kept_up"], why
    found, (low, high) = res["max_slo_rate_req_s"], res["interval_req_s"]
    print(f"max SLO rate {found:.4g} req/s ({low}-{high}) vs analytic {mu:.4g} ({(found - mu) / mu:+.1%})")
    assert low <= mu <= high and abs(found - mu) / mu <= 0.05, why
    assert res["highest_pass_req_s"] <= 1.01 * mu <= 1.01 * res["first_fail_rate_req_s"]
    # The probe saw the K-slot plateau: throughput stops growing past K streams, at about μ.
    plateau = max(lv["throughput_req_s"] for lv in doc["probe"])
    assert abs(plateau - mu) / mu <= 0.10
    assert [lv["concurrency"] for lv in doc["probe"]][:4] == [1, 2, 4, 8]
    for s in doc["steps"]:
        assert s["passed"] == (s["verdict"] == "pass")
        assert s["verdict"] == "pass" or s["reasons"]
        if s["rate_req_s"] > 1.1 * mu and s["verdict"] != "untrusted":
            assert s["verdict"] == "fail"
        # A PASS on a p99 needs enough samples to show it: ~530 independent ones at least.
        if s["verdict"] == "pass":
            assert s["bounds"][0]["n"] >= 528
        # Constant arrivals: the window (cut short where a step stopped early) holds its length
        # times the rate, give or take the one arrival at either edge.
        assert abs(s["arrived_req_s"] - s["rate_req_s"]) * s["window_s"] <= 1.01, s
    saved = orjson.loads((tmp_path / "capacity.json").read_bytes())
    assert saved["result"] == res and saved["slo"] == "ttft_p99<=200ms"


async def test_baseline_missing_the_slo_ends_without_a_search(tmp_path):
    target = FakeTarget(ttft_s=0.2, itl_s=0.005)
    opts = CapacityOptions(
        slo=parse_slo("ttft_p99<=50ms"), output_tokens=4, probe_s=0.5, step_s=2, warmup_s=0.5,
        probe_max_concurrency=2,
    )  # fmt: skip
    doc = await CapacitySearch(target, opts, tmp_path).run()
    assert doc["result"]["max_slo_rate_req_s"] == 0
    assert "even one request at a time misses the SLO: ttft_p99<=50ms (median" in doc["result"]["stop_reason"]
    assert doc["steps"] == [] and len(doc["probe"]) == 2
    assert target.closed


async def test_step_budget_bounds_the_search(tmp_path):
    """Probe capped at one stream (throughput still growing): the search first looks for a
    failing rate by doubling; two steps of budget end it. Two-second steps cannot show a p99
    (that takes ~530 samples): both steps are UNDECIDED, the search says why, and gives no rate."""
    target = FakeTarget(ttft_s=0.02, itl_s=0.01, max_concurrency=8)
    opts = CapacityOptions(
        slo=parse_slo("ttft_p99<=500ms"), output_tokens=5, probe_s=1, step_s=2, warmup_s=0.5,
        probe_max_concurrency=1, max_steps=2,
    )  # fmt: skip
    doc = await CapacitySearch(target, opts, tmp_path).run()
    res = doc["result"]
    assert res["open_loop_steps"] == 2 and len(doc["steps"]) == 2
    assert [s["phase"] for s in doc["steps"]][0] == "expand"
    verdicts = [s["verdict"] for s in doc["steps"]]
    if verdicts == ["undecided"] * 2:  # (a busy machine's client may fall behind: re-run instead)
        r0, r1 = (s["rate_req_s"] for s in doc["steps"])
        assert r1 == pytest.approx(2 * r0, rel=1e-3)
    assert "fail" not in verdicts and "pass" not in verdicts
    assert res["max_slo_rate_req_s"] is None and res["stop_reason"] == "budget (steps)"
    assert any("needs ~" in w and "before it can pass" in w for w in res["warnings"]), res["warnings"]


def test_cli_capacity_rejects_bad_input_before_starting(capsys):
    assert main(["capacity", "--target", "http://127.0.0.1:9", "--slo", "ttft_p99<=1s,ttft_p50>=2s"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "contradicts" in err
    assert main(["capacity", "--target", "http://127.0.0.1:9", "--slo", "ttft_p99<=1s", "--step", "5s"]) == 2
    assert "--warmup" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("slo", "why"),
    [("ttft_p99<=200ms", "already break ttft_p99<=200ms"), ("ttft_p99<=60s", "backlog grew")],
)
async def test_watch_ends_an_overloaded_step_early(tmp_path, slo, why):
    """One slot of 0.1 s (10 req/s) offered 50 req/s for 20 s: the backlog grows by 40 a second.
    A tight SLO is decided as soon as enough requests wait past it; a loose one by the backlog
    passing max(10, 25% of the window's 950 expected arrivals) = 238, about 6 s after warm-up."""
    target = FakeTarget(ttft_s=0.05, itl_s=0.01, max_concurrency=1)
    await target.start()
    watch = StepWatch(target, parse_slo(slo), warmup_s=1.0, expected=50 * 19)
    cfg = RunConfig(target="fake", rate=50, duration_s=20, drain_timeout_s=0.5, interval_s=1, quiet=True)
    offsets = arrivals.offsets(cfg.arrival_spec(), 0)
    sched = schedule.synthetic(
        offsets,
        input_tokens=4,
        output_tokens=6,
        prompts=PromptBuilder(0, 10, 900),
        duration_s=20,
        max_requests=None,
    )
    monitor = asyncio.ensure_future(watch.monitor())
    t0 = time.monotonic()
    res = await execute(cfg, watch, watch.gate(sched), tmp_path, 50.0, manage_target=False)
    monitor.cancel()
    assert why in (watch.abort_reason or "")
    assert time.monotonic() - t0 < 13  # well short of the 20 s schedule
    c = res.summary["counts"]
    assert c["accounted"] and c["scheduled"] < 50 * 12


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_cli_capacity_end_to_end_with_replicas(tmp_path, capsys):
    """`replay capacity` against a 2-slot stub, sizing replicas for a trace peaking at 40 req/s."""
    trace = tmp_path / "trace.jsonl"
    arr = (
        [i / 5 for i in range(600)] + [120 + i / 40 for i in range(2400)] + [180 + i / 5 for i in range(300)]
    )
    arr.append(240.0)
    write_trace(trace, (TraceRecord(t, 8, 5) for t in arr), make_header("test"))
    out = tmp_path / "cap"
    args = ["--max-concurrency", "2", "--ttft-ms", "20", "--itl-ms", "10"]
    slo = "ttft_p50<=300ms,error_rate<=10%"  # a median and 10%: a few seconds of traffic can show them
    with StubProcess(args) as stub:
        code = main(
            ["capacity", "--target", stub.base_url, "--slo", slo,
             "--input-tokens", "8", "--output-tokens", "5", "--step", "8s", "--warmup", "1s",
             "--probe-duration", "1s", "--max-steps", "12", "--budget", "200s",
             "--trace", str(trace), "--headroom", "25%", "--out", str(out), "--quiet"]
        )  # fmt: skip
    doc = orjson.loads((out / "capacity.json").read_bytes())
    res = doc["result"]
    printed = capsys.readouterr().out
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    if not res["client_kept_up"]:  # a busy machine: the search says so, with no rate, and exits 4
        assert code == 4 and "no answer (the client could not keep up" in printed
        return
    assert code == 0, (
        res["stop_reason"],
        [(s["rate_req_s"], s["verdict"], s["reasons"][:2]) for s in doc["steps"]],
    )
    rate, (low, high) = res["max_slo_rate_req_s"], res["interval_req_s"]
    steps = [(s["rate_req_s"], s["verdict"], s["reasons"][:2]) for s in doc["steps"]]
    span = f"{low:.4g}-{high:.4g}" if high is not None else f"at least {low:.4g}"
    assert f"max rate meeting {slo}: {rate:.4g} req/s (95% CI {span} req/s;" in printed
    assert 0 < low <= rate, (res, steps)
    rep = doc["replicas"]
    assert rep["demand"]["req_s"]["peak"] == 40.0  # one 60 s window at 40 req/s, p99 of four
    # Replicas at the interval's low end (the safe figure) and at the estimate.
    assert rep["replicas"] == rep["replicas_at_low"] == max(-(-40 * 1.25 // low), 1)
    assert rep["replicas_at_estimate"] == max(-(-40 * 1.25 // rate), 1)
    assert f"replicas for the trace's peak: {rep['replicas']} at the interval's low end" in printed


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_noisy_step_at_its_bound_is_extended_then_undecided_not_a_coin_flip(tmp_path):
    """A stub whose service time is noisy by construction: TTFT = 20 ms + an exponential draw of
    mean 100 ms (seeded), no queueing, so its p90 is 20 + 100 ln 10 = 250 ms at any rate (the
    client's few ms on top move the violation fraction at 250 ms by well under 1%). Judged
    against ttft_p90<=250ms the truth sits on the bound: a step is a coin flip on its sample p90,
    so it must not decide; it runs through every look to its longest length and ends UNDECIDED,
    its interval on the violation fraction holding the true 10%. The same noise against bounds
    far from the truth decides at an early look (5 or 10 s): PASS at 600 ms (0.3% over), FAIL at
    100 ms (45% over)."""
    with StubProcess(["--ttft-ms", "20", "--itl-ms", "1", "--ttft-jitter-ms", "100", "--seed", "3"]) as stub:
        target = load_target(stub.base_url, tmp_path, {})
        await target.start()
        try:
            steps = {}
            for i, bound in enumerate(("600ms", "100ms", "250ms")):
                opts = CapacityOptions(slo=parse_slo(f"ttft_p90<={bound}"), input_tokens=8, output_tokens=2,
                                       step_s=22, warmup_s=2, probe_s=2, seed=7)  # fmt: skip
                search = CapacitySearch(target, opts, tmp_path / bound)
                # The single-request baseline the search's probe would measure first (saturation's
                # TTFT-rise threshold is 3x its median + 50 ms).
                base = await search._probe_level(1)
                search.runner.baseline_ttft_s = base["latency_ms"]["ttft"]["p50"] / 1000
                steps[bound] = await search.runner.run(20.0, "search", i, 20.0)
        finally:
            await target.close()
    for s in steps.values():
        print(s["verdict"], s["judgement"], s["looks"], s["reasons"][:2])
    # The client's stalls would add to every TTFT it measures: a step it fell behind in is not judged.
    # Its own code must not stall it; a machine that kept its loop waiting for a CPU (CI saw one
    # 64 ms wait on a shared 2-core host, the loop's thread ran 0 ms of it) is named as such, and
    # the step's judgement is still what the measurements say.
    for s in steps.values():
        assert s["trustworthy"] or s["client_stall_cause"] == "loop_thread_waited_for_cpu", s["reasons"][0]
        assert s["verdict"] == (s["judgement"] if s["trustworthy"] else "untrusted")
    far_pass, far_fail, edge = steps["600ms"], steps["100ms"], steps["250ms"]
    assert far_pass["judgement"] == "pass" and len(far_pass["looks"]) <= 2 and far_pass["window_s"] <= 11
    assert far_fail["judgement"] == "fail" and len(far_fail["looks"]) <= 2 and far_fail["window_s"] <= 11
    # At the bound: looked at 5, 10 and 20 s, undecided each time, run to the end.
    assert edge["judgement"] == "undecided" and [lk["verdict"] for lk in edge["looks"]] == ["undecided"] * 3
    assert edge["window_s"] == pytest.approx(20, abs=0.5) and edge["aborted"] is None
    b = edge["bounds"][0]
    assert b["low"] < 0.10 < b["high"] and b["n"] >= 300
    # Its p90 interval (ms) holds the true p90 (plus the client's few-ms share of TTFT).
    lo, hi = b["value_interval"]
    assert lo <= 250 <= hi + 5
