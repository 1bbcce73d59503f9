"""report.html / report.md from real saved runs, checked in the system Chromium through Playwright.

What a reader needs: charts across the page width, no two labels drawn over each other, the value
of a point on hover, a log-scale view with the whole tail in it, and a page that asks the network
for nothing and logs no error. Expected values come from the saved capacity.json / summary.json
(the report's input), computed here, never from the report code. Screenshots are kept under
tmp_path (or $REPLAY_SCREENSHOTS) for a person to look at.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import statistics
from pathlib import Path

import orjson
import pytest
from playwright.sync_api import Page, sync_playwright

from replay.capacity.options import CapacityOptions
from replay.capacity.search import CapacitySearch
from replay.capacity.slo import parse_slo
from replay.cli.main import main
from replay.core.request import Request
from replay.report.html import render
from replay.run.config import RunConfig
from replay.run.runner import execute
from replay.targets.fake import FakeTarget

CHROMIUM = os.environ.get("REPLAY_CHROMIUM", "/usr/bin/chromium")  # Debian's; `make browser` installs it
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-default-apps", "--disable-sync",
]  # fmt: skip
VIEWPORT = {"width": 1400, "height": 900}

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
    "best-latency",
    "best-server",
)
RUN_FIGURES = ("run-ttft", "run-itl", "run-ttft_intended", "run-rate", "run-latency")


def capacity_options(**kw) -> CapacityOptions:
    """CapacityOptions for a short search; `repeats` only where this version of the search has it."""
    if "repeats" not in {f.name for f in dataclasses.fields(CapacityOptions)}:
        kw.pop("repeats")
    return CapacityOptions(**kw)


@pytest.fixture(scope="module")
def capacity_dir(tmp_path_factory):
    """A small real search: 2 slots of 0.1 s service (20 req/s), TTFT SLO. Medians: a p99 needs
    ~530 samples before a step can pass it, more than a few seconds of steps hold."""
    out = tmp_path_factory.mktemp("cap")
    opts = capacity_options(
        slo=parse_slo("ttft_p50<=150ms,itl_p50<=100ms"),
        output_tokens=5, step_s=4, warmup_s=1, probe_s=1, max_steps=5, repeats=1, tolerance=0.1,
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


@pytest.fixture
def browser():
    """Per test, so the module's runs (asyncio.run, main thread) are made before Playwright's sync
    API holds a running event loop in this thread."""
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)  # never a downloaded browser
        yield b
        b.close()


class Opened:
    """A report page loaded with every request outside file: and data: refused and recorded."""

    def __init__(self, browser, html: Path, shot: Path) -> None:
        self.page: Page = browser.new_page(viewport=VIEWPORT)
        self.url = html.resolve().as_uri()
        self.requests: list[str] = []
        self.refused: list[str] = []
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.requests.append(r.url[:120]))
        self.page.route("**/*", self._route)
        self.page.goto(self.url)
        self.page.wait_for_function(READY_JS, timeout=60_000)
        self.page.screenshot(path=shot, full_page=True)
        self.shot = shot

    def _route(self, route) -> None:
        url = route.request.url
        if url.startswith(("file:", "data:")):
            route.continue_()
        else:
            self.refused.append(url[:120])
            route.abort()

    def close(self) -> None:
        self.page.close()


READY_JS = """() => [...document.querySelectorAll('figure.chart div.plot')]
  .every(d => d.classList.contains('js-plotly-plot') && d.querySelector('.main-svg'))"""

FIGURES_JS = """() => [...document.querySelectorAll('figure.chart')].map(f => {
  const svg = f.querySelector('div.plot .main-svg');
  return {id: f.id, fig: f.getBoundingClientRect().width, svg: svg ? svg.getBoundingClientRect().width : null,
          body: document.body.getBoundingClientRect().width};
})"""

# Visible text in a chart (its caption and every SVG label but the hover box), pairs whose boxes
# overlap by more than a pixel each way.
OVERLAPS_JS = """(f) => {
  const shown = (t) => {
    if (!t.textContent.trim() || t.closest('.hoverlayer')) return false;
    for (let e = t; e && e !== f; e = e.parentElement) {
      const s = getComputedStyle(e);
      if (s.display === 'none' || s.visibility === 'hidden' || +s.opacity === 0) return false;
    }
    const r = t.getBoundingClientRect();
    return r.width > 0 && r.height > 0;
  };
  const els = [f.querySelector('figcaption'), ...f.querySelectorAll('div.plot svg text')].filter(shown);
  const boxes = els.map(t => { const r = t.getBoundingClientRect();
    return {text: t.textContent, x0: r.left, y0: r.top, x1: r.right, y1: r.bottom}; });
  const overlaps = [];
  for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
    const a = boxes[i], b = boxes[j];
    const w = Math.min(a.x1, b.x1) - Math.max(a.x0, b.x0), h = Math.min(a.y1, b.y1) - Math.max(a.y0, b.y0);
    if (w > 1 && h > 1) overlaps.push([a.text, b.text]);
  }
  return {labels: boxes.length, overlaps};
}"""

# Every trace but a band's fill carries one hover text per point.
HOVER_TEXTS_JS = """() => [...document.querySelectorAll('figure.chart div.plot')].flatMap(gd =>
  gd.data.filter(t => t.hoverinfo !== 'skip' && !(t.text && t.text.length === t.x.length))
    .map(t => gd.closest('figure').id + ': ' + t.name))"""

POINT_JS = """([fig, name, index]) => {
  const gd = document.querySelector('#' + CSS.escape(fig) + ' div.plot');
  const ti = gd.data.findIndex(t => t.name === name);
  const i = index < 0 ? gd.data[ti].x.length + index : index;
  const pt = gd.querySelectorAll('.scatterlayer .trace')[ti].querySelectorAll('.points path.point')[i];
  pt.scrollIntoView({block: 'center'});
  const r = pt.getBoundingClientRect();
  return {x: r.left + r.width / 2, y: r.top + r.height / 2, xv: gd.data[ti].x[i]};
}"""

AXIS_JS = """(fig) => {
  const ax = document.querySelector('#' + CSS.escape(fig) + ' div.plot')._fullLayout.yaxis;
  return {type: ax.type, range: ax.range, ticks: [...document.querySelectorAll(
    '#' + CSS.escape(fig) + ' .ytick text')].map(t => t.textContent)}; }"""


def _screenshot_dir(tmp_path: Path) -> Path:
    d = Path(os.environ.get("REPLAY_SCREENSHOTS", tmp_path))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _check_page(opened: Opened, figures: tuple[str, ...]) -> list[dict]:
    page = opened.page
    assert opened.errors == []
    assert opened.refused == [] and opened.requests == [opened.url]  # the page itself, nothing else
    figs = page.evaluate(FIGURES_JS)
    ids = [x["id"] for x in figs]
    assert len(set(ids)) == len(ids), ids
    missing = [f for f in figures if f not in [x["id"] for x in figs]]
    assert not missing, (missing, [x["id"] for x in figs])
    for f in figs:  # full width: the figure spans the body, the chart's SVG spans the figure
        assert f["fig"] >= 0.98 * f["body"], f
        assert f["svg"] is None or f["svg"] >= 0.95 * f["fig"], f
    assert sum(f["svg"] is not None for f in figs) >= len(figures) - 1
    for fig_id in [f["id"] for f in figs]:
        got = page.locator(f"#{fig_id}").evaluate(OVERLAPS_JS)
        assert got["overlaps"] == [], (fig_id, got)
    assert page.evaluate(HOVER_TEXTS_JS) == []
    page.locator(f"#{figures[0]} div.plot").hover()  # the tool bar: nothing that uploads the chart
    titles = page.locator(f"#{figures[0]} .modebar-btn").evaluate_all("bs => bs.map(b => b.dataset.title)")
    assert "Zoom in" in titles and not [t for t in titles if "Share" in t or "Cloud" in t], titles
    assert opened.shot.stat().st_size > 50_000
    return figs


def _hover(page: Page, fig: str, trace: str, index: int) -> tuple[float, str]:
    layer = f"#{fig} .hoverlayer"
    page.mouse.move(0, 0)  # off any chart: the last hover box goes
    page.wait_for_function(f"() => document.querySelector('{layer}').textContent === ''", timeout=5_000)
    pt = page.evaluate(POINT_JS, [fig, trace, index])
    page.mouse.move(pt["x"], pt["y"])
    page.wait_for_function(f"() => document.querySelector('{layer}').textContent.length > 0", timeout=5_000)
    return pt["xv"], page.locator(layer).text_content() or ""


def _number(text: str, pattern: str) -> float:
    m = re.search(pattern, text)
    assert m, (pattern, text)
    return float(m.group(1).replace(",", ""))


def _shown(expected: float) -> float:
    """How far a value shown with 4 significant digits (0.1 ms from 100 up) may be from the truth."""
    return 0.05 if expected >= 100 else 5e-4 * expected


def _click_button(page: Page, fig: str, label: str) -> None:
    page.locator(f"#{fig} .updatemenu-button", has_text=label).click()


def test_capacity_report_in_chromium(capacity_dir, browser, tmp_path):
    html, md = render(capacity_dir)
    doc = orjson.loads((capacity_dir / "capacity.json").read_bytes())
    opened = Opened(browser, html, _screenshot_dir(tmp_path) / "capacity.png")
    try:
        _check_page(opened, CAPACITY_FIGURES)
        page = opened.page
        text = page.inner_text("body")
        answer = doc["result"]["max_slo_rate_req_s"]
        assert answer > 0 and f"{answer:.3g} req/s" in text
        assert "ttft_p50<=150ms" in text and "clipped" not in text

        # Hover: the p99 dot at the highest passing rate shows that rate's p99 (median over its steps).
        fig = "latency-vs-load-ttft_intended"
        rate = doc["result"]["highest_pass_req_s"]
        rates = sorted({s["rate_req_s"] for s in doc["steps"]})
        x, label = _hover(page, fig, "p99", rates.index(rate))
        p99 = statistics.median(
            s["latency_ms"]["ttft_intended"]["p99"] for s in doc["steps"] if s["rate_req_s"] == rate
        )
        assert x == rate
        assert abs(_number(label, r"p99: ([\d,.]+) ms") - p99) <= _shown(p99), (label, p99)
        assert f"{rate:.4g} req/s" in label

        # The whole tail, in a log view by default: the axis reaches every step's max.
        # A rate run more than once (repeats) is drawn at the median of its steps.
        def per_rate(stat: str) -> list[float]:
            return [statistics.median(s["latency_ms"]["ttft_intended"][stat] for s in doc["steps"]
                                      if s["rate_req_s"] == r) for r in rates]  # fmt: skip

        top, low = max(per_rate("max")), min(per_rate("p50"))
        ax = page.evaluate(AXIS_JS, fig)
        assert ax["type"] == "log" and 10 ** ax["range"][0] <= low and 10 ** ax["range"][1] >= top, ax
        _click_button(page, fig, "linear")
        ax = page.evaluate(AXIS_JS, fig)
        assert ax["type"] == "linear" and ax["range"][1] >= top, ax
        assert page.locator(f"#{fig}").evaluate(OVERLAPS_JS)["overlaps"] == []

        # Zoom: the tool bar's zoom-in narrows the offered-rate axis.
        width = "(f) => { const r = document.querySelector('#' + f + ' div.plot')._fullLayout.xaxis.range;"
        width += " return r[1] - r[0]; }"
        before = page.evaluate(width, "goodput")
        page.locator("#goodput div.plot").hover()
        page.locator('#goodput .modebar-btn[data-title="Zoom in"]').click()
        assert page.evaluate(width, "goodput") < 0.9 * before
    finally:
        opened.close()
    text = md.read_text()
    assert f"| max rate meeting the SLO | {answer:.3g} req/s (95% CI " in text
    phases = ("search", "expand", "rerun")
    assert sum(text.count(f"| {p} |") for p in phases) == len(doc["steps"])


def test_single_run_report_in_chromium(run_dir, browser, tmp_path):
    html, md = render(run_dir)
    summary = orjson.loads((run_dir / "summary.json").read_bytes())
    opened = Opened(browser, html, _screenshot_dir(tmp_path) / "run.png")
    try:
        _check_page(opened, RUN_FIGURES)
        page = opened.page
        # Hover: the last marked point of the TTFT distribution is the run's max, with its count.
        _, label = _hover(page, "run-ttft", "named percentiles, max", -1)
        ttft = summary["metrics"]["ttft"]
        assert abs(_number(label, r"TTFT max: ([\d,.]+) ms") - ttft["max"]) <= _shown(ttft["max"]), label
        assert f"of {ttft['count']} samples" in label
        _, label = _hover(page, "run-ttft", "named percentiles, max", 0)
        assert abs(_number(label, r"TTFT p50: ([\d,.]+) ms") - ttft["p50"]) <= _shown(ttft["p50"]), label

        # The log view: a button away, labelled with round values, the tail still inside the axis.
        assert page.evaluate(AXIS_JS, "run-ttft")["type"] == "linear"
        _click_button(page, "run-ttft", "log scale")
        ax = page.evaluate(AXIS_JS, "run-ttft")
        assert ax["type"] == "log" and 10 ** ax["range"][1] >= ttft["max"], ax
        assert all(re.fullmatch(r"[\d,.]+", t) for t in ax["ticks"]) and len(ax["ticks"]) >= 2, ax
        assert page.locator("#run-ttft").evaluate(OVERLAPS_JS)["overlaps"] == []
        page.screenshot(path=opened.shot.with_name("run-ttft-log.png"))
    finally:
        opened.close()
    assert f"TTFT p50 / p99 | {summary['metrics']['ttft']['p50']:.3g}" in md.read_text().replace(",", "")


def test_report_flags_a_failed_self_check_in_the_page(run_dir, browser, tmp_path):
    """The same run, its summary marked as one whose client fell behind: the page says so first."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    summary = orjson.loads((copy / "summary.json").read_bytes())
    summary["selfcheck"].update(trustworthy=False, reasons=["dispatch lag p99 12.0 ms exceeds 5 ms"])
    (copy / "summary.json").write_bytes(orjson.dumps(summary))
    html, md = render(copy)
    opened = Opened(browser, html, tmp_path / "flagged.png")
    try:
        assert opened.errors == [] and opened.refused == []
        flags = opened.page.locator("#flags")
        assert flags.is_visible()
        assert (
            "client self-check failed" in flags.inner_text()
            and "dispatch lag p99 12.0 ms" in flags.inner_text()
        )
        key = opened.page.locator("table.key").bounding_box()
        box = flags.bounding_box()
        assert key and box and box["y"] < 900  # above the fold, right under the key figures
    finally:
        opened.close()
    assert "client self-check failed" in md.read_text()


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
