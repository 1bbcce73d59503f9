"""report.html / report.md from real saved runs; the page checked in headless Chromium."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import orjson
import pytest
from cdp_browser import inspect_page

from replay.capacity.search import CapacityOptions, CapacitySearch
from replay.capacity.slo import parse_slo
from replay.cli.main import main
from replay.core.request import Request
from replay.report.html import render
from replay.run.config import RunConfig
from replay.run.runner import execute
from replay.targets.fake import FakeTarget

CAPACITY_FIGURES = (
    "latency-vs-load-ttft_intended",
    "latency-vs-load-itl",
    "latency-vs-load-e2e_intended",
    "goodput",
    "throughput-vs-concurrency",
    "latency-vs-concurrency",
    "best-ttft",
    "best-itl",
    "best-rate",
    "best-server",
)
RUN_FIGURES = ("run-ttft", "run-itl", "run-ttft_intended", "run-rate")


@pytest.fixture(scope="module")
def capacity_dir(tmp_path_factory):
    """A small real search: 2 slots of 0.1 s service (20 req/s), TTFT SLO."""
    out = tmp_path_factory.mktemp("cap")
    opts = CapacityOptions(
        slo=parse_slo("ttft_p99<=150ms,itl_p99<=100ms,error_rate<=1%"),
        output_tokens=5, step_s=3, warmup_s=1, probe_s=1, max_steps=5, repeats=1, tolerance=0.1,
    )  # fmt: skip
    asyncio.run(CapacitySearch(FakeTarget(ttft_s=0.02, itl_s=0.02, max_concurrency=2), opts, out).run())
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    sched = [Request(id=i, intended_s=i * 0.05, input_tokens=4, output_tokens=8) for i in range(40)]
    cfg = RunConfig(target="fake", rate=20, duration_s=2, interval_s=0.5, quiet=True)
    asyncio.run(execute(cfg, FakeTarget(ttft_s=0.02, itl_s=0.005), sched, out, 20.0))
    return out


FIGURE_JS = "[...document.querySelectorAll('figure.chart')].map(f => f.id)"
DRAWN_JS = (
    "[...document.querySelectorAll('figure.chart svg')].filter(s => s.getBoundingClientRect().width > 300"
    " && [...s.querySelectorAll('polyline')].some(p => p.getBBox().width > 10)).length"
)


def _screenshot_dir(tmp_path: Path) -> Path:
    d = Path(os.environ.get("REPLAY_SCREENSHOTS", tmp_path))
    d.mkdir(parents=True, exist_ok=True)
    return d


async def _check_in_browser(html: Path, shot: Path, figures: tuple[str, ...]) -> dict:
    url = html.resolve().as_uri()
    rep = await inspect_page(
        url,
        {
            "figures": FIGURE_JS,
            "drawn": DRAWN_JS,
            "text": "document.body.innerText",
            "scripts": "document.scripts.length",
            "external": "[...document.querySelectorAll('[src],link[href]')].length",
        },
        shot,
    )
    assert rep.console_errors == []
    assert rep.requests == [url] and rep.failed == []  # the page itself, nothing else
    assert rep.values["scripts"] == 0 and rep.values["external"] == 0
    missing = [f for f in figures if f not in rep.values["figures"]]
    assert not missing, (missing, rep.values["figures"])
    assert shot.stat().st_size > 20_000
    return rep.values


async def test_capacity_report_in_chromium(capacity_dir, tmp_path):
    html, md = render(capacity_dir)
    doc = orjson.loads((capacity_dir / "capacity.json").read_bytes())
    values = await _check_in_browser(html, _screenshot_dir(tmp_path) / "capacity.png", CAPACITY_FIGURES)
    assert values["drawn"] >= 8  # charts with a real line drawn in them
    rate = doc["result"]["max_slo_rate_req_s"]
    assert rate > 0 and f"{rate:.3g} req/s" in values["text"]
    assert "ttft_p99<=150ms" in values["text"]
    text = md.read_text()
    assert f"| max rate meeting the SLO | {rate:.3g} req/s |" in text
    assert text.count("| search |") + text.count("| confirm |") + text.count("| expand |") == len(
        doc["steps"]
    )


async def test_single_run_report_in_chromium(run_dir, tmp_path):
    html, md = render(run_dir)
    values = await _check_in_browser(html, _screenshot_dir(tmp_path) / "run.png", RUN_FIGURES)
    assert values["drawn"] >= 4
    summary = orjson.loads((run_dir / "summary.json").read_bytes())
    assert f"TTFT p50 / p99 | {summary['metrics']['ttft']['p50']:.3g}" in md.read_text().replace(",", "")


@pytest.mark.parametrize("which", ["capacity_dir", "run_dir"])
def test_replay_report_rerenders_from_saved_data(which, request, tmp_path, capsys):
    src = request.getfixturevalue(which)
    first = [p.read_text() for p in render(src)]
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    for name in ("report.html", "report.md"):
        (copy / name).unlink()
    assert main(["report", str(copy)]) == 0
    assert capsys.readouterr().out.split() == [str(copy / "report.html"), str(copy / "report.md")]
    again = [(copy / n).read_text() for n in ("report.html", "report.md")]
    assert [a.replace(str(copy), "DIR") for a in again] == [f.replace(str(src), "DIR") for f in first]


def test_report_of_a_non_run_directory_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "not a replay run directory" in capsys.readouterr().err
