"""Does the live display disturb the measurement? (issue 14)

    PYTHONPATH=. python bench/progress_overhead.py [--rate 200] [--duration 30] [--repeats 2]

The same 200 req/s stub run (stub on core 1, TTFT 20 ms, ITL 5 ms, 64 output tokens; `replay run`
on core 0, one process) with the live display off (--quiet, pipes) and on (a pseudo-terminal, as a
user's terminal: redrawn twice a second), alternated `--repeats` times so that drift in the
machine's load falls on both. Side by side: the self-check figures (dispatch lag p99, loop lag
p99/max, stalls over 5 ms, client CPU), TTFT against the stub's own served TTFT, and the display's
own cost (`selfcheck.display`: refreshes, render time per refresh, wall time with the GIL mostly
held).

"Same within noise": a live figure is flagged when its median differs from the off median by more
than the larger of the spread seen between the off runs themselves and an absolute floor (0.2 ms
for lags, 2 points of client CPU). Writes bench/results-progress.md and .json. Figures are only
meaningful on a quiet machine with two free cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pty
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from replay.stub.server import StubProcess  # noqa: E402

STUB_CORE, CLIENT_CORE = 1, 0
LOADED = 2.5  # 1-min load average above which the two measured processes were not alone
FIGURES = (  # (key, label, noise floor)
    ("dispatch_lag_p99_ms", "dispatch lag p99 ms", 0.2),
    ("loop_lag_p99_ms", "loop lag p99 ms", 0.2),
    ("loop_lag_max_ms", "loop lag max ms", 0.5),
    ("stalls", "stalls over 5 ms", 1.0),
    ("client_cpu_percent", "client CPU % of its core", 2.0),
    ("ttft_p50_excess_ms", "TTFT p50 - stub's served TTFT p50, ms", 0.2),
    ("ttft_p99_ms", "TTFT p99 ms", 0.5),
)


def stub_http(base_url: str, method: str, path: str) -> Any:
    req = urllib.request.Request(base_url.removesuffix("/v1") + path, method=method)
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _drain(fd: int, sink: bytearray) -> None:
    """Read the terminal as a user's would (keeping the last bytes, to show a frame)."""
    while True:
        ready, _, _ = select.select([fd], [], [], 1.0)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            return
        if not chunk:
            return
        sink += chunk
        del sink[:-4096]


def run_once(cmd: list[str], env: dict[str, str], display: bool) -> subprocess.CompletedProcess[bytes]:
    if not display:
        return subprocess.run([*cmd, "--quiet"], env=env, capture_output=True, timeout=900)
    master, slave = pty.openpty()
    env = {**env, "TERM": "xterm-256color", "COLUMNS": "120", "LINES": "40"}
    env.pop("NO_COLOR", None)
    tail = bytearray()
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    reader = threading.Thread(target=_drain, args=(master, tail), daemon=True)
    reader.start()
    rc = proc.wait(timeout=900)
    reader.join(timeout=5)
    os.close(master)
    return subprocess.CompletedProcess(cmd, rc, bytes(tail), b"")


def measure(a: argparse.Namespace, display: bool, out: Path) -> dict[str, Any]:
    py = sys.executable
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    stub_args = ["--ttft-ms", "20", "--itl-ms", "5", "--vllm", "--continuous-usage", "--model", "stub"]
    load_before = os.getloadavg()
    with StubProcess(stub_args, python=py) as stub:
        assert stub.proc is not None
        os.sched_setaffinity(stub.proc.pid, {STUB_CORE})
        stub_http(stub.base_url, "POST", "/stub/reset")
        cmd = ["taskset", "-c", str(CLIENT_CORE), py, "-m", "replay", "run", "--target", stub.base_url,
               "--rate", f"{a.rate:g}", "--duration", f"{a.duration:g}", "--output-tokens", "64",
               "--input-tokens", "64", "--workers", "1", "--out", str(out)]  # fmt: skip
        r = run_once(cmd, env, display)
        if r.returncode != 0:
            raise SystemExit(f"replay run failed ({r.returncode}): {(r.stderr or r.stdout)[-2000:]!r}")
        truth = stub_http(stub.base_url, "GET", "/stub/truth")
    s = json.loads((out / "summary.json").read_text())
    sc, m = s["selfcheck"], s["metrics"]
    served_p50 = (truth.get("ttft_ms") or {}).get("p50")
    return {
        "display": "live" if display else "off",
        "loadavg": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "trustworthy": sc["trustworthy"],
        "dispatch_lag_p99_ms": sc["dispatch_lag_p99_ms"],
        "loop_lag_p99_ms": sc["loop_lag_p99_ms"],
        "loop_lag_max_ms": sc["loop_lag_max_ms"],
        "stalls": (sc.get("stalls") or {}).get("count"),
        "client_cpu_percent": sc["client_cpu_percent"],
        "ttft_p50_ms": m["ttft"]["p50"],
        "ttft_p99_ms": m["ttft"]["p99"],
        "ttft_p50_excess_ms": None if served_p50 is None else round(m["ttft"]["p50"] - served_p50, 3),
        "ok": s["counts"]["ok"],
        "served": truth.get("served"),
        "display_cost": sc.get("display"),
    }


def compare(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    off = [r for r in rows if r["display"] == "off"]
    on = [r for r in rows if r["display"] == "live"]
    out = []
    for key, label, floor in FIGURES:
        a = [r[key] for r in off if r[key] is not None]
        b = [r[key] for r in on if r[key] is not None]
        if not a or not b:
            continue
        spread = max(a) - min(a) if len(a) > 1 else 0.0
        diff = statistics.median(b) - statistics.median(a)
        noise = max(spread, floor)
        out.append({"figure": label, "off": a, "live": b, "diff": round(diff, 3), "noise": round(noise, 3),
                    "within_noise": abs(diff) <= noise})  # fmt: skip
    return out


def loaded(rows: list[dict[str, Any]]) -> list[str]:
    """A warning when the machine was busy: then the table shows its noise, not the display's cost."""
    worst = max(max(r["loadavg"]) for r in rows)
    if worst <= LOADED:
        return []
    return [f"**Loaded machine** (1-min load average up to {worst:g} on {os.cpu_count()} cores): these "
            "figures measure other processes' noise, not the display; rerun on a quiet machine.", ""]  # fmt: skip


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]], cmp: list[dict[str, Any]]) -> str:
    def fmt(vals: list[Any]) -> str:
        return " / ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in vals)

    lines = [
        "# Live display overhead: self-check figures with the display off and on",
        "",
        f"Written by `bench/progress_overhead.py` on {meta['date']} (commit {meta['commit']}). Stub on core "
        f"{STUB_CORE} (TTFT 20 ms, ITL 5 ms, 64 tokens); `replay run` on core {CLIENT_CORE}, one process, "
        f"{meta['rate']:g} req/s Poisson for {meta['duration']:g} s; display off (--quiet) and live (a "
        f"pseudo-terminal, {meta['refresh_hz']:g} redraws/s), alternated, {meta['repeats']} of each.",
        "",
        *loaded(rows),
        "Each cell lists the runs in order. Noise: the spread between the off runs, at least the floor "
        "named in the script.",
        "",
        "| figure | off | live | live - off (medians) | noise | |",
        "|---|---|---|---|---|---|",
    ]
    for c in cmp:
        mark = "same" if c["within_noise"] else "DIFFERS"
        lines.append(
            f"| {c['figure']} | {fmt(c['off'])} | {fmt(c['live'])} | {c['diff']:+g} | {c['noise']:g} | {mark} |"
        )
    lines += ["", "| run | display | load avg (1 min, before/after) | trustworthy | ok / stub served | display cost |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for i, r in enumerate(rows):
        cost = r["display_cost"] or {}
        what = (f"{cost.get('refreshes')} refreshes, render ms mean {cost.get('render_ms_mean')} / max "
                f"{cost.get('render_ms_max')}, CPU {cost.get('cpu_ms_total')} ms in all")  # fmt: skip
        what = what if cost.get("mode") == "live" else cost.get("mode", "-")
        lines.append(f"| {i + 1} | {r['display']} | {r['loadavg']} | {r['trustworthy']} | {r['ok']} / "
                     f"{r['served']} | {what} |")  # fmt: skip
    lines += [
        "",
        "Render time is wall time per redraw (build, render, write to the terminal), taken on the display "
        "thread under a 0.5 ms GIL switch interval: the event loop waits at most that long for the GIL "
        "while a redraw runs. Figures are only meaningful on a quiet machine with two free cores.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench")
    a = ap.parse_args()
    os.sched_setaffinity(0, {STUB_CORE})  # this script reads the terminal: keep it off the client's core
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            for display in (False, True) if i % 2 == 0 else (True, False):
                rows.append(measure(a, display, Path(tmp) / f"r{len(rows)}"))
                print(json.dumps(rows[-1]), flush=True)
    from replay.run.live import REFRESH_HZ

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit.stdout.strip(),
            "rate": a.rate, "duration": a.duration, "repeats": a.repeats, "refresh_hz": REFRESH_HZ}  # fmt: skip
    cmp = compare(rows)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results-progress.json").write_text(
        json.dumps({**meta, "runs": rows, "compare": cmp}, indent=1) + "\n"
    )
    md = markdown(meta, rows, cmp)
    (a.out / "results-progress.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
