"""Tenants and adapters (`--classes FILE`): a weighted mix of classes, each with its own model name,
lengths and SLO, measured apart. Truth: the stub in its own process serving two model names with
different TTFTs (`--model-ttft-ms`), its per-request records paired with the client's by request id,
and its count of requests per model name."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from stub_truth import SHIFT_Q, IdTarget, pair, pct, served_by_id, truth

from replay.cli.main import main
from replay.core.errors import ReplayError
from replay.report.html import render
from replay.report.markdown import _f
from replay.run.config import RunConfig
from replay.run.runner import execute, run_in_uvloop
from replay.scaleout.shard import SyntheticSchedule
from replay.schedule.classes import WithClasses, load_classes
from replay.schedule.probe import WithProbe
from replay.stats.summary import console_table
from replay.stub.server import StubProcess
from replay.targets.openai_http import HTTPTargetConfig

MIX = """
[[class]]
name = "fast"
share = 7
input_tokens = 32
output_tokens = 8
slo = "ttft_p50<=40ms"

[[class]]
name = "slow"
share = 3
model = "slowm"
input_tokens = 96
output_tokens = 24
slo = "ttft_p50<=40ms, error_rate<=1%"
"""


def _mix(tmp_path: Path, text: str = MIX, name: str = "mix.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "name", "says"),
    [
        ("[[class]]\nname = 'x'\nshare = \n", "m.toml", "m.toml: not TOML: Invalid value (at line 3"),
        ('{"class": [{"name": "x",\n "share": }]}', "m.json", "m.json: line 2: not JSON"),
        ("[[class]]\nname = 'x'\nshare = 0\n", "m.toml", "class 'x': share: expected a positive"),
        ("[[class]]\nname = 'x'\nshare = 1\nouput_tokens = 3\n", "m.toml", "'x': ouput_tokens: unknown"),
        ("[[class]]\nname = 'probe'\nshare = 1\n", "m.toml", "class 1: name: 'probe'"),
        ("[[class]]\nname = 'x'\nshare = 1\ninput_tokens = 0\n", "m.toml", "'x': input_tokens: expected"),
        ("[[class]]\nname='x'\nshare=1\n[[class]]\nname='x'\nshare=2\n", "m.toml", "'x': name: given twice"),
        ("x = 1\n", "m.toml", "expected [[class]] tables"),
    ],
)  # fmt: skip
def test_bad_class_files_fail_in_one_line_naming_file_and_field(tmp_path, capsys, text, name, says):
    p = _mix(tmp_path, text, name)
    with pytest.raises(ReplayError) as e:
        load_classes(p)
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)
    # The command line: one line on stderr, non-zero exit, before any load.
    rc = main(
        ["run", "--target", "http://127.0.0.1:9/v1", "--rate", "1", "--duration", "1", "--classes", str(p)]
    )
    err = capsys.readouterr().err.strip()
    assert rc != 0 and err.count("\n") == 0 and says in err, err
    rc = main(["capacity", "--target", "http://127.0.0.1:9/v1", "--slo", "ttft_p99<=1s", "--classes", str(p)])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and err.count("\n") == 0 and says in err, err


def test_class_slo_is_checked_up_front(tmp_path):
    p = _mix(tmp_path, "[[class]]\nname = 'x'\nshare = 1\nslo = 'send_lag_p99<=1ms'\n")
    cfg = RunConfig(target="x", rate=1.0, classes=p, class_mix=load_classes(p))
    want = "per class only ttft, ttft_intended, itl, tpot, e2e, e2e_intended and error_rate are measured"
    assert cfg.problems() == [f"{p}: class 'x': slo: 'send_lag_p99<=1ms': {want}"]
    p2 = _mix(tmp_path, "[[class]]\nname = 'x'\nshare = 1\nslo = 'ttft_p99<=fast'\n", "m2.toml")
    (msg,) = RunConfig(target="x", rate=1.0, classes=p2, class_mix=load_classes(p2)).problems()
    assert msg.startswith(f"{p2}: class 'x': slo: ")


def test_the_draw_is_seeded_the_same_in_every_worker_and_probes_stay_apart(tmp_path):
    mix = load_classes(_mix(tmp_path))
    assert [c.share for c in mix] == [0.7, 0.3]
    cfg = RunConfig(target="x", rate=200.0, duration_s=30.0)
    recipe = WithProbe(WithClasses(SyntheticSchedule.from_config(cfg), mix, seed=4), rate=2.0, seed=4)
    whole = list(recipe())
    main_reqs = [r for r in whole if r.klass != "probe"]
    by = {r.id: (r.klass, r.model, r.input_tokens, r.output_tokens) for r in main_reqs}
    shards = [r for w in range(3) for r in recipe(w, 3) if r.klass != "probe"]
    assert sorted(r.id for r in shards) == sorted(by)
    assert all(by[r.id] == (r.klass, r.model, r.input_tokens, r.output_tokens) for r in shards)
    for r in main_reqs:  # the class's lengths and model, the prompt built at that length
        assert (r.model, r.input_tokens, r.output_tokens) == (
            (None, 32, 8) if r.klass == "fast" else ("slowm", 96, 24)
        )
        assert len(r.prompt_token_ids) == r.input_tokens
    n = len(main_reqs)
    fast = sum(r.klass == "fast" for r in main_reqs) / n
    assert abs(fast - 0.7) < 4 * math.sqrt(0.21 / n), (fast, n)  # 4 sd of the binomial share


# The stub: model "stub-model" (class fast) first token 10 ms after admission, "slowm" (class slow)
# 60 ms; ITL 2 ms; no queue. A class's figures holding the other's requests would show at once.
STUB = ["--ttft-ms", "10", "--itl-ms", "2", "--vllm", "--continuous-usage", "--model-ttft-ms", "slowm=60"]


def test_per_class_figures_are_the_stubs_served_truth_per_model(tmp_path):
    p = _mix(tmp_path)
    cfg = RunConfig(target="stub", rate=40.0, duration_s=6.0, seed=5, interval_s=1.0, quiet=True, classes=p,
                    class_mix=load_classes(p), drain_timeout_s=30.0)  # fmt: skip
    schedule = WithClasses(SyntheticSchedule.from_config(cfg), cfg.class_mix, cfg.seed)()
    with StubProcess(STUB) as stub:
        target = IdTarget(HTTPTargetConfig(base_url=stub.base_url))
        res = run_in_uvloop(execute(cfg, target, schedule, tmp_path / "run", cfg.rate))
        doc = truth(stub.base_url)
    s = res.summary
    rows = [json.loads(x) for x in (tmp_path / "run" / "requests.jsonl").read_text().splitlines()]
    by_class = {k: [r for r in rows if r.get("class") == k] for k in ("fast", "slow")}
    cls = {r["name"]: r for r in s["classes"]}
    n = len(rows)
    assert s["counts"]["accounted"] and s["counts"]["ok"] == n == doc["served"] == sum(
        map(len, by_class.values())
    )
    # The stub's own count per model name asked for is each class's count: the model went in the body.
    assert doc["by_model"] == {"stub-model": len(by_class["fast"]), "slowm": len(by_class["slow"])}
    assert cls["fast"]["scheduled"] == cls["fast"]["ok"] == len(by_class["fast"])
    assert cls["slow"]["scheduled"] == cls["slow"]["ok"] == len(by_class["slow"])
    # Shares: within 4 sd of the binomial draw of 0.7 / 0.3.
    assert abs(cls["fast"]["share_drawn"] - 0.7) < 4 * math.sqrt(0.21 / n), (cls["fast"], n)
    assert cls["fast"]["share"] == 0.7 and cls["slow"]["model"] == "slowm" and cls["fast"]["model"] is None
    served = served_by_id(doc)
    for k, want_ttft_ms, (n_in, n_out) in (("fast", 10.0, (32, 8)), ("slow", 60.0, (96, 24))):
        mine = by_class[k]
        assert all(
            (r["input_tokens"], r["output_tokens"]) == (n_in, n_out) for r in mine
        )  # as the server counted
        pr = pair(mine, served)
        # The stub's served TTFT for this class's requests is its model's: never early, on time at the
        # median (the stub writes late only when starved of CPU, so no bound on the max). Every slow
        # request served at >= 60 ms and the stub's per-model counts equal to the classes' (above):
        # every request went to its class's model.
        srv_ms = (pr.written - pr.recv) * 1e3
        assert srv_ms.min() > want_ttft_ms - 0.1 and abs(np.median(srv_ms) - want_ttft_ms) < 1.0, (k, srv_ms)
        # ... and the client's TTFT for them is that plus transit, request by request.
        assert pct(pr.ttft_err_ms, SHIFT_Q) < 1.0 and pr.ttft_err_ms.min() > -1e-3, (
            k,
            np.round(pr.ttft_err_ms, 2),
        )
        # The class's summary figures are its own requests' (HDR buckets: 1%, plus one sample gap).
        m = cls[k]["metrics"]
        client = (pr.first - pr.sent) * 1e3
        gap = np.diff(np.sort(client)).max()
        for q, key in ((50, "p50"), (99, "p99")):
            assert abs(m["ttft"][key] - pct(client, q)) <= 0.01 * pct(client, q) + gap, (k, key, m["ttft"])
        e2e = (pr.end - pr.sent) * 1e3
        assert abs(m["e2e"]["p50"] - pct(e2e, 50)) <= 0.01 * pct(e2e, 50) + np.diff(np.sort(e2e)).max()
        assert m["ttft"]["count"] == m["e2e"]["count"] == len(mine)
        assert m["itl"]["count"] == len(mine) * (n_out - 1)
    # Overall figures stay, over both classes.
    assert s["metrics"]["ttft"]["count"] == n and s["metrics"]["itl"]["count"] == sum(
        cls[k]["metrics"]["itl"]["count"] for k in cls)  # fmt: skip
    # Per-class SLO on its own histograms: the 10 ms class holds ttft_p50<=40ms, the 60 ms one does not
    # (a median: a starved stub's odd late write cannot move it).
    assert cls["fast"]["slo_held"] is True and cls["slow"]["slo_held"] is False
    assert cls["slow"]["slo_failures"] == [
        f"ttft_p50<=40ms (measured {cls['slow']['metrics']['ttft']['p50']:.1f} ms)"
    ]
    table = console_table(s)
    assert (
        "fast" in table
        and "held" in table
        and "BROKEN" in table
        and "slow: SLO broken: ttft_p50<=40ms" in table
    )
    assert s["config"]["class_mix"][1]["model"] == "slowm"
    # The reports render the summary's per-class figures and verdicts.
    html, md = render(tmp_path / "run")
    line = next(ln for ln in md.read_text().splitlines() if ln.startswith("| slow |"))
    m = cls["slow"]["metrics"]["ttft"]
    assert f"| {_f(m['p50'])} / {_f(m['p99'])} |" in line and "| NO: ttft_p50<=40ms" in line
    page = html.read_text()
    assert "Per class (tenants and adapters)" in page and "NO: ttft_p50&lt;=40ms" in page


async def test_capacity_step_passes_only_if_every_class_meets_its_slo(tmp_path):
    """The same stub and search twice: a lax per-class SLO lets the first step pass on the overall
    SLO; a slow class's SLO it cannot meet (its model's TTFT is 60 ms) fails that step, saying why."""
    from replay.capacity.options import CapacityOptions
    from replay.capacity.search import CapacitySearch
    from replay.capacity.slo import parse_slo
    from replay.targets.openai_http import OpenAIHTTPTarget

    docs = {}
    # Probe capped at one stream: the first step runs at about its throughput (~12 req/s), far below
    # what the queue-less stub serves, so each class's TTFT is its model's.
    with StubProcess(STUB) as stub:
        for name, bound in (("lax", "200ms"), ("strict", "30ms")):
            p = _mix(tmp_path, MIX.replace("ttft_p50<=40ms", f"ttft_p50<={bound}"), f"{name}.toml")
            opts = CapacityOptions(slo=parse_slo("ttft_p50<=500ms"), input_tokens=16, output_tokens=4,
                                   probe_s=1, step_s=4, warmup_s=0.5, probe_max_concurrency=1, max_steps=1,
                                   classes=load_classes(p))  # fmt: skip
            target = OpenAIHTTPTarget(HTTPTargetConfig(base_url=stub.base_url))
            docs[name] = await CapacitySearch(target, opts, tmp_path / name).run()
    for name, doc in docs.items():
        (step,) = doc["steps"]
        cls = {c["name"]: c for c in step["classes"]}
        assert cls["fast"]["slo_held"] is True and cls["fast"]["scheduled"] > 0, (name, step["classes"])
        lines = [
            json.loads(x)
            for x in (tmp_path / name / step["run_dir"] / "requests.jsonl").read_text().splitlines()
        ]
        assert {ln.get("class") for ln in lines} == {"fast", "slow"}
        # `judgement`: what the step measured (its `verdict` is "untrusted" if the client fell behind).
        if name == "lax":
            assert cls["slow"]["slo_held"] is True and step["judgement"] == "pass", step["reasons"]
        else:
            slow_p50 = cls["slow"]["metrics"]["ttft"]["p50"]
            assert cls["slow"]["slo_held"] is False and slow_p50 > 59.9 and step["judgement"] == "fail"
            assert f"class slow: SLO broken: ttft_p50<=30ms (measured {slow_p50:.1f} ms)" in step["reasons"]


def test_command_line_run_over_two_workers_counts_each_class_as_the_stub_saw_it(tmp_path, capsys):
    """`replay run --classes` end to end, two worker processes: the merged summary's per-class counts
    are the stub's per-model counts, and each class's TTFT histogram holds its own model's TTFTs."""
    p = _mix(tmp_path)
    with StubProcess(STUB) as stub:
        rc = main(["run", "--target", stub.base_url, "--classes", str(p), "--rate", "30", "--duration", "3",
                   "--workers", "2", "--seed", "9", "--out", str(tmp_path / "run"), "--quiet"])  # fmt: skip
        doc = truth(stub.base_url)
    assert rc == 0, capsys.readouterr().err
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    cls = {r["name"]: r for r in s["classes"]}
    assert s["workers"]["count"] == 2 and s["counts"]["accounted"]
    assert doc["by_model"] == {"stub-model": cls["fast"]["scheduled"], "slowm": cls["slow"]["scheduled"]}
    assert cls["fast"]["ok"] + cls["slow"]["ok"] == s["counts"]["ok"] == doc["served"]
    # Served 10 ms vs 60 ms: the slow class never under 60 ms, the fast one's median near 10 ms.
    assert cls["fast"]["metrics"]["ttft"]["p50"] < 20.0 and cls["slow"]["metrics"]["ttft"]["min"] > 59.9
    assert "slow: SLO broken" in capsys.readouterr().out


def test_a_class_model_the_server_does_not_serve_fails_in_one_line_before_any_load(tmp_path, capsys):
    p = _mix(tmp_path, MIX.replace('model = "slowm"', 'model = "slowm-typo"'))
    with StubProcess(STUB) as stub:
        rc = main(["run", "--target", stub.base_url, "--classes", str(p), "--rate", "10", "--duration", "1",
                   "--out", str(tmp_path / "run"), "--quiet"])  # fmt: skip
        doc = truth(stub.base_url)
    err = capsys.readouterr().err.strip()
    assert rc != 0 and err.count("\n") == 0, err
    assert (
        err
        == f"replay: error: --classes: model 'slowm-typo' not served by {stub.base_url} (stub-model, slowm)"
    )
    assert doc["received"] == 0  # nothing was sent
