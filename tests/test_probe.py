"""The probe stream (`--probe-rate`): small fixed requests on their own arrivals beside the load,
measured apart. Truth: the stub in its own process (per request: received, admitted, first token
written), paired with the client's records by request id."""

from __future__ import annotations

import json

import numpy as np
from stub_truth import SHIFT_Q, IdTarget, pair, pct, reset, served_by_id, truth

from replay.core.request import PROBE
from replay.report.html import render
from replay.report.markdown import _f
from replay.run.config import RunConfig
from replay.run.runner import execute, run_in_uvloop
from replay.scaleout.shard import SyntheticSchedule
from replay.schedule.probe import PROBE_ID_BASE, PROBE_INPUT_TOKENS, PROBE_OUTPUT_TOKENS, WithProbe
from replay.stats.summary import console_table
from replay.stub.server import StubProcess
from replay.targets.openai_http import HTTPTargetConfig


def test_probe_stream_merges_in_time_order_and_ends_with_the_main_schedule():
    cfg = RunConfig(target="x", rate=50.0, duration_s=20.0)
    recipe = WithProbe(SyntheticSchedule.from_config(cfg), rate=4.0, seed=0)
    whole = list(recipe())
    t = [r.intended_s for r in whole]
    assert t == sorted(t)
    probes = [r for r in whole if r.klass == PROBE]
    main = [r for r in whole if r.klass is None]
    assert [r.id for r in main] == list(range(len(main)))  # the main schedule untouched
    assert all(r.id >= PROBE_ID_BASE for r in probes)
    assert all((r.input_tokens, r.output_tokens) == (PROBE_INPUT_TOKENS, PROBE_OUTPUT_TOKENS) for r in probes)
    assert all(len(r.prompt_token_ids) == PROBE_INPUT_TOKENS for r in probes)
    assert probes[-1].intended_s <= main[-1].intended_s
    # Poisson at 4/s over 20 s: 80 expected, sd 9; 4 sd.
    assert abs(len(probes) - 80) < 36
    # Its own arrivals: no probe shares an instant with a main request.
    assert not {r.intended_s for r in probes} & {r.intended_s for r in main}
    # Two workers' shares are the whole schedule, each in order.
    a, b = list(recipe(0, 2)), list(recipe(1, 2))
    assert sorted(r.id for r in a + b) == sorted(r.id for r in whole)
    assert [r.intended_s for r in a] == sorted(r.intended_s for r in a)


# Stub: at most 4 streams at once, FIFO beyond. Main requests 64 in / 16 out: service 20 + 15 x 5 =
# 95 ms, capacity 4 / 0.095 = 42 req/s. Light: 10 req/s; saturated: 70 req/s (the queue grows ~28/s).
STUB = ["--ttft-ms", "20", "--itl-ms", "5", "--max-concurrency", "4", "--vllm", "--continuous-usage"]


def _run(stub, tmp_path, name, rate):
    cfg = RunConfig(target="stub", rate=rate, duration_s=4.0, output_tokens=16, probe_rate=5.0, seed=2,
                    interval_s=1.0, quiet=True, drain_timeout_s=30.0)  # fmt: skip
    schedule = WithProbe(SyntheticSchedule.from_config(cfg), cfg.probe_rate, cfg.seed)()
    reset(stub.base_url)
    target = IdTarget(HTTPTargetConfig(base_url=stub.base_url))
    res = run_in_uvloop(execute(cfg, target, schedule, tmp_path / name, rate))
    doc = truth(stub.base_url)
    rows = [json.loads(x) for x in (tmp_path / name / "requests.jsonl").read_text().splitlines()]
    return res.summary, rows, doc, tmp_path / name


def test_probe_ttft_is_reported_apart_and_rises_when_the_load_saturates_the_server(tmp_path):
    with StubProcess(STUB) as stub:
        light = _run(stub, tmp_path, "light", 10.0)
        heavy = _run(stub, tmp_path, "heavy", 70.0)
    p99 = {}
    for name, (s, rows, doc, run_dir) in (("light", light), ("heavy", heavy)):
        c = s["counts"]
        probe_rows = [r for r in rows if r.get("class") == PROBE]
        main_rows = [r for r in rows if "class" not in r]
        # Every request counted once; the probe's are its section's.
        assert c["accounted"] and c["scheduled"] == len(rows) == doc["received"] and c["ok"] == doc["served"]
        assert s["probe"]["scheduled"] == len(probe_rows) >= 8 and s["probe"]["ok"] == len(probe_rows)
        assert s["probe"]["rate_req_s"] == 5.0
        # Latencies apart: the main TTFT histogram holds the main requests only, the probe's the probe's.
        assert s["metrics"]["ttft"]["count"] == len(main_rows)
        assert s["probe"]["metrics"]["ttft"]["count"] == len(probe_rows)
        assert s["probe"]["metrics"]["itl"]["count"] == len(probe_rows) * (PROBE_OUTPUT_TOKENS - 1)
        # The probe's TTFT is the stub's served TTFT (queueing included) plus transit, request by request.
        served = served_by_id(doc)
        p = pair(probe_rows, served)
        assert pct(p.ttft_err_ms, SHIFT_Q) < 1.0 and p.ttft_err_ms.min() > -1e-3, np.round(p.ttft_err_ms, 2)
        client_ms = (p.first - p.sent) * 1e3
        hdr_p99 = s["probe"]["metrics"]["ttft"]["p99"]
        assert abs(hdr_p99 - pct(client_ms, 99)) <= max(0.01 * hdr_p99, 0.1) + np.diff(np.sort(client_ms))[-1]
        p99[name] = hdr_p99
        # The stub's own queue times for the probes (admitted - received), its truth of what they waited.
        queue_ms = np.array([(served[i].t_admit - served[i].t_recv) * 1e3 for i in p.ids])
        if name == "light":
            assert np.median(queue_ms) < 5.0, queue_ms
        else:
            assert np.median(queue_ms) > 100.0, queue_ms
        rows_ts = [json.loads(x) for x in (run_dir / "timeseries.jsonl").read_text().splitlines()]
        assert any(r.get("probe_ttft_p99_ms") is not None for r in rows_ts)
    # Saturation shows in the quiet user's TTFT: the queue's wait (seconds) against a few service times.
    assert p99["heavy"] > 5 * p99["light"] and p99["heavy"] > 1000.0, p99


# Stub with no queue: the stub keys service time on max_tokens, so the load (120 out: served E2E
# 20 + 119 x 5 = 615 ms) and the probe (16 out: 95 ms) cannot be mistaken for one another. One main
# request counted into the probe's figures would put the probe's E2E max past 600 ms.
STUB_APART = ["--ttft-ms", "20", "--itl-ms", "5", "--vllm", "--continuous-usage"]


def test_probe_figures_come_from_probe_requests_only_and_reach_the_reports(tmp_path):
    cfg = RunConfig(target="stub", rate=20.0, duration_s=4.0, output_tokens=120, probe_rate=5.0, seed=3,
                    interval_s=1.0, quiet=True, drain_timeout_s=30.0)  # fmt: skip
    schedule = WithProbe(SyntheticSchedule.from_config(cfg), cfg.probe_rate, cfg.seed)()
    with StubProcess(STUB_APART) as stub:
        target = IdTarget(HTTPTargetConfig(base_url=stub.base_url))
        res = run_in_uvloop(execute(cfg, target, schedule, tmp_path / "run", cfg.rate))
        doc = truth(stub.base_url)
    s = res.summary
    rows = [json.loads(x) for x in (tmp_path / "run" / "requests.jsonl").read_text().splitlines()]
    served = served_by_id(doc)
    probe_ids = {r["id"] for r in rows if r.get("class") == PROBE}
    main_ids = {r["id"] for r in rows if "class" not in r}
    assert len(probe_ids) >= 8 and s["counts"]["ok"] == len(rows) == doc["served"]
    # The stub's own served E2E (received -> last byte written), by class: the two never overlap.
    srv_e2e = {i: (served[i].t_end - served[i].t_recv) * 1e3 for i in served}
    probe_srv = np.array([srv_e2e[i] for i in probe_ids])
    main_srv = np.array([srv_e2e[i] for i in main_ids])
    assert probe_srv.max() < 200.0 < 600.0 < main_srv.min(), (probe_srv.max(), main_srv.min())
    pm, m = s["probe"]["metrics"], s["metrics"]
    assert pm["e2e"]["count"] == pm["ttft"]["count"] == len(probe_ids)
    assert m["e2e"]["count"] == m["ttft"]["count"] == len(main_ids)
    assert pm["itl"]["count"] == len(probe_ids) * (PROBE_OUTPUT_TOKENS - 1)
    assert m["itl"]["count"] == len(main_ids) * (120 - 1)
    # No main request in the probe's E2E (max under 600 ms), no probe in the load's (p1 over 600).
    assert pm["e2e"]["max"] < 300.0, pm["e2e"]
    assert m["e2e"]["p50"] > 600.0, m["e2e"]
    # The probe's figures are the stub's served figures for the probe ids plus transit: the
    # client's E2E for a request is its served E2E plus send and read transit (>= 0, a few ms
    # under contention); HDR buckets add <= 1%.
    p = pair([r for r in rows if r["id"] in probe_ids], served)
    assert pct(p.e2e_err_ms, SHIFT_Q) < 1.0 and p.e2e_err_ms.min() > -1e-3
    for q, key in ((50, "p50"), (99, "p99")):
        client = pct((p.end - p.sent) * 1e3, q)
        assert abs(pm["e2e"][key] - client) <= 0.01 * client + np.diff(np.sort((p.end - p.sent) * 1e3)).max()
    # The reports put the probe's TTFT and E2E beside the load's, with the summary's figures.
    html, md = render(tmp_path / "run")
    text = md.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("| probe TTFT p50 / p99 |"))
    assert f"{_f(pm['ttft']['p50'])} / {_f(pm['ttft']['p99'])} ms" in line
    assert f"(load: {_f(m['ttft']['p50'])} / {_f(m['ttft']['p99'])} ms)" in line
    assert "| probe E2E p50 / p99 |" in text
    page = html.read_text()
    assert "probe TTFT p50 / p99" in page and "probe TTFT p99" in page  # key row and time-series line
    assert "probe ttft" in console_table(s)
