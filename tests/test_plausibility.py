"""Implausible figures are flagged where they are shown: the console table, report.md, report.html.

The truth is the target's chunking, set by construction: FakeTarget sends `tokens_per_chunk`
tokens per chunk. All 8 tokens in one chunk make TPOT 0 (no decode speed was measured); 5 of 8 in
the first chunk make most ITL samples 0; one token per chunk is a normal stream and flags nothing.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses

import orjson
import pytest

from replay.capacity.options import CapacityOptions
from replay.capacity.search import CapacitySearch
from replay.capacity.slo import parse_slo
from replay.core.request import Request
from replay.report.html import render
from replay.run.config import RunConfig
from replay.run.runner import execute
from replay.stats.plausibility import capacity_flags, plausibility
from replay.stats.summary import console_table
from replay.targets.fake import FakeTarget

TPOT0 = "TPOT p50 is ~0 ms"
ITL0 = "ITL p50 is ~0 ms"
SELFCHECK = "client self-check failed"


def capacity_options(**kw) -> CapacityOptions:
    """CapacityOptions for a short search; `repeats` only where this version of the search has it."""
    if "repeats" not in {f.name for f in dataclasses.fields(CapacityOptions)}:
        kw.pop("repeats")
    return CapacityOptions(**kw)


def _run(out, tokens_per_chunk: int) -> dict:
    sched = [Request(id=i, intended_s=i * 0.05, input_tokens=4, output_tokens=8) for i in range(20)]
    cfg = RunConfig(target="fake", rate=20, duration_s=1, interval_s=0.5, quiet=True)
    target = FakeTarget(ttft_s=0.02, itl_s=0.005, tokens_per_chunk=tokens_per_chunk)
    asyncio.run(execute(cfg, target, sched, out, 20.0))
    return orjson.loads((out / "summary.json").read_bytes())


@pytest.mark.parametrize(
    ("tokens_per_chunk", "flag", "not_flagged"),
    [(8, TPOT0, ITL0), (5, ITL0, TPOT0), (1, None, (TPOT0, ITL0))],
)
def test_chunked_output_is_flagged_in_console_markdown_and_html(
    tmp_path, tokens_per_chunk, flag, not_flagged
):
    summary = _run(tmp_path, tokens_per_chunk)
    m = summary["metrics"]
    assert m["tpot"]["count"] == m["e2e"]["count"] == 20
    table = console_table(summary)
    html, md = (p.read_text() for p in render(tmp_path))
    for absent in not_flagged if isinstance(not_flagged, tuple) else (not_flagged,):
        assert absent not in table and absent not in md and absent not in html
    if flag is None:
        assert m["tpot"]["p50"] > 0 and m["itl"]["p50"] > 0
        assert not [ln for ln in table.splitlines() if ln.startswith("CHECK:")]
        return
    assert f"CHECK: {flag}" in table.splitlines()[-1]
    assert f"> - {flag}" in md
    flags_div = html[html.index('<div class="flags" id="flags">') :]
    assert flag in flags_div[: flags_div.index("</div>")]
    # The flags sit right under the key figures, before any chart.
    assert html.index('id="flags"') < html.index('<figure class="chart"')


def test_a_failed_self_check_is_flagged_once_with_its_reasons(tmp_path):
    summary = _run(tmp_path, 1)
    summary["selfcheck"].update(trustworthy=False, reasons=["dispatch lag p99 9.0 ms exceeds 5 ms"])
    flags = plausibility(summary)
    assert len(flags) == 1 and SELFCHECK in flags[0] and "dispatch lag p99 9.0 ms" in flags[0]
    table = console_table(summary)  # the console states the verdict and reasons itself, once
    assert "GENERATOR FELL BEHIND" in table and SELFCHECK not in table
    assert plausibility(summary, selfcheck=False) == []


def test_capacity_flags_name_where_and_fold_repeats():
    base = {"tpot": {"p50": 0.0, "count": 10}, "itl": {"p50": 0.0, "count": 40}}
    good = {"tpot": {"p50": 20.0, "count": 10}, "itl": {"p50": 19.0, "count": 40}}
    steps = [
        {"index": i, "rate_req_s": 10.0 + i, "latency_ms": copy.deepcopy(good), "trustworthy": i % 2 == 1}
        for i in range(9)
    ]
    doc = {"baseline": {"concurrency": 1, "latency_ms": base}, "probe": [{"concurrency": 1}], "steps": steps}
    flags = capacity_flags(doc)
    assert len(flags) == 2
    assert flags[0].startswith(f"{TPOT0} (single-request baseline)")
    assert flags[1].startswith(
        f"{SELFCHECK} (step 0 at 10 req/s, step 2 at 12 req/s, step 4 at 14 req/s and 2 more)"
    )
    doc["baseline"]["latency_ms"] = good
    for s in steps:
        s["trustworthy"] = True
    assert capacity_flags(doc) == []


@pytest.mark.timeout(120)
def test_capacity_report_flags_a_one_chunk_baseline(tmp_path):
    """A server that sends each answer in one chunk: the baseline's TPOT 0 is flagged in both reports."""
    opts = capacity_options(
        slo=parse_slo("ttft_p99<=500ms"), output_tokens=5, step_s=1.5, warmup_s=0.5, probe_s=0.5,
        probe_max_concurrency=2, max_steps=2, repeats=1, max_time_s=30,
    )  # fmt: skip
    target = FakeTarget(ttft_s=0.02, itl_s=0.005, tokens_per_chunk=5)
    doc = asyncio.run(CapacitySearch(target, opts, tmp_path).run())
    assert doc["baseline"]["latency_ms"]["tpot"]["p50"] < 0.05  # microseconds: stamps of one chunk
    html, md = (p.read_text() for p in render(tmp_path))
    assert f"> - {TPOT0} (single-request baseline" in md
    assert f"{TPOT0} (single-request baseline" in html[html.index('id="flags"') :]
