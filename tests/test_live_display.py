"""The live display as a user sees it: `replay run` (one process, --workers 2) and `replay capacity`
on a pseudo-terminal, replayed through a terminal emulator (pyte) into screens, and the plain lines
that a pipe or NO_COLOR gets.

Truths: the stub server in its own process (GET /stub/truth: the requests it served), each
interval's row in timeseries.jsonl for the figures the display must show of that interval, and the
byte stream the terminal received for how often the display redrew.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from pty_screen import Capture, run_in_pty

from replay.run import live
from replay.run.live import REFRESH_HZ
from replay.run.offloop import short_switch_interval
from replay.stub.server import StubProcess

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | {"PYTHONPATH": str(ROOT)}
REPLAY = [sys.executable, "-m", "replay"]
# pyte names SGR 33 (yellow) "brown", after the VT100 palette
COLOUR = {"PASS": "green", "FAIL": "red", "UNDECIDED": "brown", "UNTRUSTED": "magenta"}
NUM = r"([\d,.]+|-)"
INTERVAL_RE = re.compile(
    rf"last interval {NUM}-{NUM} s: TTFT p50/p99 {NUM}/{NUM} ms, ITL p50/p99 {NUM}/{NUM} ms"
)


@pytest.fixture(scope="module")
def stub():
    with StubProcess(["--ttft-ms", "20", "--itl-ms", "5"]) as p:
        yield p


def _stub_call(stub: StubProcess, path: str, method: str = "GET") -> dict:
    req = urllib.request.Request(stub.base_url.removesuffix("/v1") + path, method=method)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def served(stub: StubProcess) -> int:
    return _stub_call(stub, "/stub/truth")["served"]


def _num(text: str) -> float | None:
    return None if text == "-" else float(text.replace(",", ""))


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "timeseries.jsonl").read_text().splitlines()]


def check_figures(m: re.Match, row: dict) -> None:
    """The latencies an INTERVAL_RE match shows are its interval row's (0.1 ms below 100 ms, 1 ms above)."""
    truth = [row[k] for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")]
    for a, b in zip([_num(g) for g in m.groups()[2:]], truth, strict=True):
        assert a == pytest.approx(b, abs=0.051 if b < 99.95 else 0.51), (m.group(0), row)


def check_live_run(cap: Capture, run_dir: Path, title: str, planned_s: float, stub: StubProcess) -> dict:
    """What every live run must show: returns the run's summary."""
    assert cap.returncode == 0, cap.text
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = _rows(run_dir)
    # While it ran: elapsed / planned moving on, sent / scheduled, in flight, ok, errors.
    live = [f for f in cap.frames if title in f and " done" not in f]
    elapsed = {float(m) for f in live for m in re.findall(rf"(\d+\.\d) s / {planned_s:g} s", f)}
    assert len(elapsed) >= 3, live[-1:]  # redrawn in place as the run went on
    assert any(re.search(r"sent [\d,]+ / ~[\d,]+ +in flight \d+ +ok [\d,]+ +errors 0", f) for f in live)
    # Each interval's latencies as its row has them (percentiles come from the rows, never recomputed).
    shown = {}
    for f in cap.frames:
        for m in INTERVAL_RE.finditer(f):
            shown[_num(m.group(2))] = m
    by_end = {round(r["t_s"], 1): r for r in rows}
    assert shown, cap.frames[-1]
    for end, m in shown.items():
        check_figures(m, min(by_end.items(), key=lambda kv: abs(kv[0] - end))[1])
    # The stub served every request the display counts as ok at the end.
    final = cap.text
    m = re.search(r"sent ([\d,]+) / ~[\d,]+ +in flight 0 +ok ([\d,]+) +errors 0", final)
    assert m and " done" in final, final
    assert int(m.group(2).replace(",", "")) == served(stub) == summary["counts"]["ok"]
    # At most a few redraws a second: the terminal received the title once per redraw.
    redraws = cap.raw.count(title.encode())
    span = summary["throughput"]["span_s"] + 1.0
    assert 3 <= redraws <= REFRESH_HZ * span + 3, (redraws, span)
    display = summary["selfcheck"]["display"]
    assert display["mode"] == "live" and display["refreshes"] >= 3
    assert display["render_ms_max"] is not None
    # The end-of-run table's verdicts in colour.
    verdict = "green" if summary["selfcheck"]["trustworthy"] else "red"
    assert cap.colours("self-check:")[0] == (verdict, True), cap.colours("self-check:")
    assert "green" in [fg for fg, _ in cap.colours("errors 0")]
    return summary


def test_single_process_run_on_a_terminal(stub, tmp_path):
    _stub_call(stub, "/stub/reset", "POST")
    out = tmp_path / "one"
    argv = ["run", "--target", stub.base_url, "--rate", "40", "--duration", "4", "--output-tokens", "16",
            "--interval", "1s", "--workers", "1", "--out", str(out)]  # fmt: skip
    cap = run_in_pty([*REPLAY, *argv], ENV)
    summary = check_live_run(cap, out, "one: open loop, 40 req/s", 4, stub)
    assert "workers" not in summary


def test_two_workers_on_a_terminal(stub, tmp_path):
    _stub_call(stub, "/stub/reset", "POST")
    out = tmp_path / "two"
    argv = ["run", "--target", stub.base_url, "--rate", "40", "--duration", "4", "--output-tokens", "16",
            "--interval", "1s", "--workers", "2", "--out", str(out)]  # fmt: skip
    cap = run_in_pty([*REPLAY, *argv], ENV)
    summary = check_live_run(cap, out, "two: open loop, 40 req/s, 2 workers", 4, stub)
    assert summary["workers"]["count"] == 2


@pytest.mark.parametrize("how", ["pipe", "no_color"])
def test_plain_lines_without_escape_codes(stub, tmp_path, how):
    out = tmp_path / "plain"
    argv = [*REPLAY, "run", "--target", stub.base_url, "--rate", "30", "--duration", "3",
            "--output-tokens", "8", "--interval", "1s", "--out", str(out)]  # fmt: skip
    if how == "pipe":
        r = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=120)
        assert r.returncode == 0, r.stderr
        stream, progress = r.stdout + r.stderr, r.stderr
    else:
        cap = run_in_pty(argv, ENV | {"NO_COLOR": "1"})
        assert cap.returncode == 0, cap.text
        stream = progress = cap.raw.decode()
    assert "\x1b" not in stream
    rows = _rows(out)
    lines = [ln for ln in progress.splitlines() if ln.startswith("plain: open loop, 30 req/s | ")]
    # One line per interval (its end, the counts so far, its latencies), then the end.
    per_row = [ln for ln in lines if INTERVAL_RE.search(ln)]
    assert len(per_row) == len(rows), lines
    for ln, row in zip(per_row, rows, strict=True):
        assert f"| {row['t_s']:.0f} / 3 s |" in ln
        check_figures(INTERVAL_RE.search(ln), row)
    assert re.search(r"\| done in \d+\.\d s: sent \d+ / ~90, in flight 0, ok \d+, errors 0$", lines[-1])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["selfcheck"]["display"]["mode"] == "plain"
    assert "self-check: " in stream


@pytest.mark.slow  # ~20-30 s: two probe levels and two steps
def test_capacity_search_on_a_terminal(tmp_path):
    """Every probe level and step is shown live while it runs, and its verdict line stays, in colour."""
    out = tmp_path / "cap"
    with StubProcess(["--max-concurrency", "4", "--ttft-ms", "20", "--itl-ms", "5"]) as stub:
        argv = ["capacity", "--target", stub.base_url, "--slo", "ttft_p99<=300ms", "--input-tokens", "8",
                "--output-tokens", "8", "--probe-duration", "1", "--probe-max-concurrency", "2",
                "--step", "4", "--warmup", "1", "--max-steps", "2", "--budget", "60",
                "--out", str(out)]  # fmt: skip
        cap = run_in_pty([*REPLAY, *argv], ENV, timeout_s=240)
    assert cap.returncode in (0, 1, 4), cap.text
    doc = json.loads((out / "capacity.json").read_text())
    assert doc["probe"] and doc["steps"], cap.text
    for level in doc["probe"]:
        c = level["concurrency"]
        assert cap.shown(f"c{c:03d}: closed loop, {c} streams"), c  # its run, live
        words = "SLO met" if level["slo_met"] else "SLO missed"
        line = next(ln for ln in cap.screen if ln.startswith(f"probe c={c}:"))
        assert words in line
        assert cap.colours(words)[0][0] == ("green" if level["slo_met"] else "red")
    for step in doc["steps"]:
        rate = f"{step['rate_req_s']:.4g} req/s"
        assert cap.shown(f"open loop, {rate}"), rate  # its run, live
        verdict = step["verdict"].upper()
        lines = [(y, ln) for y, ln in enumerate(cap.screen) if rate in ln and f": {verdict}" in ln]
        assert lines, (rate, verdict, cap.text)
        y, ln = lines[0]
        x = ln.index(f": {verdict}") + 2
        assert cap.cells[y][x][1] == COLOUR[verdict], (ln, cap.cells[y][x])


def test_short_switch_interval_is_restored_by_the_last_user():
    before = sys.getswitchinterval()
    with short_switch_interval():
        with short_switch_interval():
            assert sys.getswitchinterval() <= 0.0005
        assert sys.getswitchinterval() <= 0.0005  # the outer user still runs
    assert sys.getswitchinterval() == before


def test_merged_rows_feed_the_display_as_workers_and_ray_do():
    """--workers and --ray have no engine in the parent: the display counts from the merged interval
    rows (IntervalMerger's on_row). Rows made here with known contents; plain lines, as in a pipe."""
    from replay.run.config import RunConfig
    from replay.run.files import interval_row
    from replay.stats import histogram as H
    from replay.stats.recorder import METRICS, Counts

    def row(k: int, ok: int, errors: dict[str, int], ttft_ms: float, in_flight: int) -> dict:
        hists = {m: H.new() for m in METRICS}
        for _ in range(ok):
            H.record_seconds(hists["ttft"], ttft_ms / 1e3)
            H.record_seconds_many(hists["itl"], [0.005] * 3)
        c = Counts(scheduled=ok + sum(errors.values()), ok=ok)
        c.errors.update(errors)
        return interval_row(float(k), 1.0, c, hists, in_flight, 0)

    stream = io.StringIO()
    cfg = RunConfig(target="x", rate=50.0, duration_s=3.0)
    with live.session(stream=stream) as display:
        assert display is not None and display.plain
        feed = live.attach_merged(cfg, time.perf_counter(), 50.0, "m", "2 workers")
        assert feed is not None
        for r in (row(0, 40, {}, 20.0, 7), row(1, 50, {"http_500": 2}, 30.0, 5), row(2, 48, {}, 25.0, 0)):
            feed.row(r)
        live.detach(feed)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4, lines
    for ln, ttft in zip(lines, ("20.0/20.0", "30.0/30.0", "25.0/25.0"), strict=False):
        assert ln.startswith("m: open loop, 50 req/s, 2 workers | ") and f"TTFT p50/p99 {ttft} ms" in ln, ln
        assert "ITL p50/p99 5.0/5.0 ms" in ln, ln
    # Counts so far: ok and errors by kind add up over rows; sent = done + in flight of the last row.
    assert lines[-1].startswith("m: open loop, 50 req/s, 2 workers | done in ")
    assert lines[-1].endswith("sent 140 / ~150, in flight 0, ok 138, errors 2 (http_500 2)"), lines[-1]
    assert feed.cost()["mode"] == "plain"


def test_region_redraws_in_place_cropped_to_the_terminal_width(monkeypatch):
    """A redraw replaces the region (no line of an earlier frame is left), lines printed above it stay,
    and a line wider than the terminal is cut rather than wrapped (a wrap would put the next redraw
    one line off). Truth: pyte replaying the bytes, as a 30-column terminal would show them."""
    import pyte
    from rich.text import Text

    from replay.run.region import Region

    monkeypatch.setenv("COLUMNS", "30")
    monkeypatch.setenv("LINES", "10")
    stream = io.StringIO()  # no file descriptor: written through the stream
    screen = pyte.Screen(30, 10)
    screen.set_mode(pyte.modes.LNM)  # "\n" as a terminal's ONLCR turns it into CR LF
    feed = pyte.Stream(screen)
    region = Region(stream)
    region.draw([], [[("x" * 50, "")], [("ab", ""), ("cd", "bold")], [("third", "")]])
    feed.feed(stream.getvalue())
    assert screen.display[:4] == ["x" * 30, "abcd".ljust(30), "third".ljust(30), " " * 30]
    stream.seek(0)
    stream.truncate()
    region.draw([Text("kept")], [[("second", "")]])
    region.close()
    feed.feed(stream.getvalue())
    assert [r.rstrip() for r in screen.display[:4]] == ["kept", "second", "", ""]
