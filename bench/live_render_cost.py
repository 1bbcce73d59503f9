"""Does the live display's render thread hold the event loop? (issue 14)

    PYTHONPATH=. python bench/live_render_cost.py [--seconds 20] [--hz 2,20] [--label after]
        [--replay-root PATH]   # import replay from another checkout (e.g. a worktree of an older commit)

No stub and no HTTP: one process runs an event loop carrying a synthetic 200 req/s workload (each
request a socket pair: 20 ms to the first chunk, then 64 chunks 5 ms apart, read with sock_recv, so
the loop makes the syscalls a real run makes and releases the GIL as often), the self-check's loop-
lag probe (a 10 ms sleep, its oversleep recorded) and, in the `live` modes, the real `Display` with
an `EngineFeed` on that workload, writing to a pseudo-terminal that a separate `cat` drains. Modes:
`off`, then `live` at each `--hz` (2 is the display's rate; 20 gives ten times the redraws, so the
loop meets the render thread often enough to measure it), then 500 redraws back to back with no
loop (the frame's cost with warm caches; in a run the thread wakes to cold ones).

What is measured, and why it holds on a busy machine: the render thread's own CPU time per redraw
(`time.thread_time`: an upper bound on how long it can hold the GIL, whatever else runs on the box),
its wall time, the garbage collections it triggers (gc.callbacks: a collection holds the GIL from
start to end), and every loop-lag sample, split into the samples whose window overlaps a redraw and
the rest. Lag figures (wall clock) include the machine's scheduling noise; the split and the CPU
figures are what to read when the load average is high. Writes bench/results-live-render.md and .json
(runs kept by --label, so a before and an after sit side by side).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import fcntl
import gc
import json
import os
import pty
import random
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RATE, TTFT_S, ITL_S, TOKENS = 200.0, 0.020, 0.005, 64
CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":" tok"}}]}\n\n'
COLS, ROWS = 120, 40
WARM_REDRAWS = 500
LOADED = 2.5  # 1-min load average above which the lags measure other processes (as progress_overhead)


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)


# ---- the child: one mode in a fresh process -----------------------------------------------------


class Workload:
    """200 req/s of fake streams on the loop; `state`/`recorder` look like the engine's to a feed."""

    def __init__(self) -> None:
        self.state = SimpleNamespace(dispatched=0, in_flight=0, ok=0, not_sent=0, draining_since=0.0)
        self.recorder = SimpleNamespace(counts=SimpleNamespace(errors={}))
        self.records: list[dict[str, Any]] = []  # kept, as a run keeps its records: the heap grows

    async def request(self, loop: asyncio.AbstractEventLoop) -> None:
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        self.state.dispatched += 1
        self.state.in_flight += 1

        async def serve() -> None:
            await asyncio.sleep(TTFT_S)
            for _ in range(TOKENS):
                b.send(CHUNK)
                await asyncio.sleep(ITL_S)
            b.close()

        server = asyncio.ensure_future(serve())
        stamps = []
        while await loop.sock_recv(a, 65536):
            stamps.append(time.perf_counter())
        a.close()
        await server
        self.records.append({"id": self.state.dispatched, "stamps": stamps})
        self.state.in_flight -= 1
        self.state.ok += 1

    async def run(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task[None]] = set()
        t0 = nxt = time.perf_counter()
        while (nxt := nxt + random.expovariate(RATE)) < t0 + seconds:
            delay = nxt - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.ensure_future(self.request(loop))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)


def child(mode: str, hz: float, seconds: float) -> dict[str, Any]:
    os.environ.update({"TERM": "xterm-256color", "COLUMNS": str(COLS), "LINES": str(ROWS)})
    os.environ.pop("NO_COLOR", None)
    from replay.run import live
    from replay.stats.selfcheck import PROBE_INTERVAL_S

    gc_events: list[tuple[str, int, float]] = []  # (thread, generation, ms)
    started: dict[int, float] = {}

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        k = threading.get_ident()
        if phase == "start":
            started[k] = time.perf_counter()
        elif k in started:
            ms = (time.perf_counter() - started.pop(k)) * 1e3
            gc_events.append((threading.current_thread().name, info["generation"], ms))

    gc.callbacks.append(on_gc)
    renders: list[tuple[float, float, float]] = []  # (start, wall s, CPU s) of each redraw
    tick = live.Display._tick

    def timed_tick(self: Any) -> None:
        t, c = time.perf_counter(), time.thread_time()
        tick(self)
        renders.append((t, time.perf_counter() - t, time.thread_time() - c))

    live.Display._tick = timed_tick  # type: ignore[method-assign]
    samples: list[tuple[float, float, float]] = []  # (window start, window end, lag s)

    async def probe() -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(PROBE_INTERVAL_S)
            now = time.perf_counter()
            samples.append((t, now, now - t - PROBE_INTERVAL_S))

    work = Workload()
    display = cat = None
    if mode in ("live", "warm"):
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
        cat = subprocess.Popen(["cat"], stdin=master, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        others = set(range(os.cpu_count() or 1)) - os.sched_getaffinity(0)
        if others:  # pinned (--core): the terminal's reader runs elsewhere, as a user's terminal would
            os.sched_setaffinity(cat.pid, others)
        os.close(master)
        display = live.Display(os.fdopen(slave, "w"), refresh_hz=hz)
    if mode == "warm":  # redraws back to back on this thread, no loop: the frame's cost with warm caches
        cfg = SimpleNamespace(duration_s=seconds, requests=None, concurrency=None, drain_timeout_s=30.0)
        feed = live.EngineFeed(live._title(cfg, RATE, "bench"), time.perf_counter(), seconds, RATE * seconds,
                               False, 30.0, engine=work, recorder=work.recorder)  # fmt: skip
        display.attach(feed)
        time.sleep(0.2)  # its thread's first redraw (on attach) is done; it sleeps 1/hz after
        gc.freeze()  # as the runner does before a run
        del renders[:]
        for i in range(WARM_REDRAWS):
            work.state.dispatched = work.state.ok = i
            display._tick()
        drawn = renders[:WARM_REDRAWS]  # not the thread's own redraws on detach and close
        display.detach(feed)
        display.close()
        display.stream.close()
        cat.wait(timeout=10)
        gc_events = [("replay-live" if e[0] == "MainThread" else e[0], *e[1:]) for e in gc_events]  # it drew
        return summarise("warm", hz, 0.0, [], drawn, gc_events, [os.getloadavg()[0]] * 2)

    async def main() -> None:
        gc.freeze()  # as the runner does before a run
        t0 = time.perf_counter()
        cfg = SimpleNamespace(duration_s=seconds, requests=None, concurrency=None, drain_timeout_s=30.0)
        feed = None
        if display is not None:
            feed = live.EngineFeed(live._title(cfg, RATE, "bench"), t0, seconds, RATE * seconds, False, 30.0,
                                   engine=work, recorder=work.recorder)  # fmt: skip
            display.attach(feed)
        lag = asyncio.ensure_future(probe())

        async def rows() -> None:  # an interval row a second, as `--interval 1s` gives the display
            k = 0
            while True:
                await asyncio.sleep(1.0)
                k += 1
                if feed is not None:
                    feed.row({"t_s": float(k), "interval_s": 1.0, "ttft_p50_ms": 20.4, "ttft_p99_ms": 21.3,
                              "itl_p50_ms": 5.1, "itl_p99_ms": 5.9, "in_flight": work.state.in_flight})  # fmt: skip

        ticker = asyncio.ensure_future(rows())
        await work.run(seconds)
        lag.cancel()
        ticker.cancel()
        if feed is not None:
            display.detach(feed)

    load0 = os.getloadavg()[0]
    asyncio.run(main())
    if display is not None:
        display.close()
        display.stream.close()  # the terminal's last writer gone: `cat` reads EOF and ends
    if cat is not None:
        cat.wait(timeout=10)
    return summarise(mode, hz, seconds, samples, renders, gc_events, [load0, os.getloadavg()[0]])


def summarise(mode: str, hz: float, seconds: float, samples: list[tuple[float, float, float]],
              renders: list[tuple[float, float, float]], gc_events: list[tuple[str, int, float]],
              load: list[float]) -> dict[str, Any]:  # fmt: skip
    starts = [r[0] for r in renders]
    ends = [r[0] + r[1] for r in renders]

    def overlaps(a: float, b: float) -> bool:
        return any(s < b and e > a for s, e in zip(starts, ends, strict=True))

    lags = [s[2] * 1e3 for s in samples]
    hit = [s[2] * 1e3 for s in samples if overlaps(s[0], s[1])]
    rest = [s[2] * 1e3 for s in samples if not overlaps(s[0], s[1])]
    wall = [r[1] * 1e3 for r in renders]
    cpu = [r[2] * 1e3 for r in renders]
    gc_render = [e for e in gc_events if e[0] == "replay-live"]
    gc_loop = [e for e in gc_events if e[0] == "MainThread"]
    return {
        "mode": {"off": "off", "warm": f"{len(renders)} redraws back to back"}.get(mode, f"live {hz:g}/s"),
        "seconds": seconds,
        "loadavg": [round(x, 2) for x in load],
        "lag_samples": len(lags),
        "lag_p50_ms": pct(lags, 0.5),
        "lag_p99_ms": pct(lags, 0.99),
        "lag_max_ms": round(max(lags), 3) if lags else None,
        "stalls_over_5ms": sum(x > 5 for x in lags),
        "samples_over_1ms": sum(x > 1 for x in lags),
        "overlap_samples": len(hit),
        "overlap_lag_p50_ms": pct(hit, 0.5),
        "overlap_lag_max_ms": round(max(hit), 3) if hit else None,
        "rest_lag_p50_ms": pct(rest, 0.5),
        "renders": len(renders),
        "render_wall_p50_ms": pct(wall, 0.5),
        "render_wall_max_ms": round(max(wall), 3) if wall else None,
        "render_cpu_p50_ms": pct(cpu, 0.5),
        "render_cpu_p99_ms": pct(cpu, 0.99),
        "render_cpu_max_ms": round(max(cpu), 3) if cpu else None,
        "render_gcs": len(gc_render),
        "render_gc_max_ms": round(max((e[2] for e in gc_render), default=0.0), 3),
        "render_gc_generations": sorted({e[1] for e in gc_render}),
        "loop_gcs": len(gc_loop),
        "loop_gc_max_ms": round(max((e[2] for e in gc_loop), default=0.0), 3),
    }


# ---- the parent ---------------------------------------------------------------------------------

COLUMNS = (  # (key, header)
    ("mode", "mode"),
    ("loadavg", "load (1 min, before/after)"),
    ("lag_p99_ms", "loop lag p99 ms"),
    ("lag_max_ms", "loop lag max ms"),
    ("stalls_over_5ms", "stalls > 5 ms"),
    ("overlap_samples", "lag samples overlapping a redraw"),
    ("overlap_lag_p50_ms", "their lag p50 ms"),
    ("rest_lag_p50_ms", "the others' lag p50 ms"),
    ("overlap_lag_max_ms", "their lag max ms"),
    ("renders", "redraws"),
    ("render_cpu_p50_ms", "redraw CPU p50 ms"),
    ("render_cpu_max_ms", "redraw CPU max ms"),
    ("render_wall_max_ms", "redraw wall max ms"),
    ("render_gcs", "GCs on the render thread"),
    ("render_gc_max_ms", "its longest GC ms"),
    ("render_gc_generations", "their generations"),
)


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# Live display: does its render thread hold the event loop?",
        "",
        "Written by `bench/live_render_cost.py` (see its docstring for the workload: 200 req/s of "
        "socket-pair streams on the loop, the self-check's 10 ms loop-lag probe, the real `Display` "
        "writing to a pseudo-terminal). One fresh process per mode; no stub. Run at the lowest CPU "
        "priority on a shared 2-core machine: wall-clock lags carry that machine's noise; the redraw "
        "CPU times and the GC counts do not.",
        "",
    ]
    for label, run in doc["labels"].items():
        lines += [f"## {label}", "", f"{run['date']}, commit {run['commit']}, {run['seconds']:g} s per mode"
                  + (f", pinned to core {run['core']}." if run.get("core") is not None else ", not pinned."),
                  "", "| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]  # fmt: skip
        for r in run["rows"]:
            lines.append("| " + " | ".join(str(r.get(k)) for k, _ in COLUMNS) + " |")
        worst = max(max(r["loadavg"]) for r in run["rows"])
        if worst > LOADED:
            lines += ["", f"**Loaded machine** (1-min load average up to {worst:g} on {os.cpu_count()} cores): the "
                      "loop lags here are other processes' noise; read the redraw CPU and GC columns."]  # fmt: skip
        lines.append("")
    lines += [
        "Redraw CPU: the render thread's own CPU time for one redraw (build the frame, render, write), "
        "the most it can hold the GIL for (under the 0.5 ms switch interval the loop takes it back "
        "sooner from Python code; a GC or a long C call is not interrupted, and a thread the OS "
        "preempts while it holds the GIL keeps it). GCs on the render thread: collections that its "
        "allocations started, each holding the GIL from start to end (wall ms: on a busy machine "
        "that includes preemption). A lag sample overlaps a redraw when its 10 ms window contains "
        "part of one.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--hz", default="2,20", help="live display redraw rates to run, comma-separated")
    ap.add_argument("--label", default="current", help="the runs' heading in the results (kept by label)")
    ap.add_argument("--replay-root", type=Path, default=ROOT, help="the checkout whose replay is measured")
    ap.add_argument("--out", type=Path, default=ROOT / "bench")
    ap.add_argument("--core", type=int, help="pin the measured process to this core (as progress_overhead "
                    "pins `replay run`); the terminal's reader goes to the others")  # fmt: skip
    ap.add_argument("--child", nargs=2, metavar=("MODE", "HZ"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    sys.path.insert(0, str(a.replay_root.resolve()))
    if a.child:
        if a.core is not None:
            os.sched_setaffinity(0, {a.core})
        print(json.dumps(child(a.child[0], float(a.child[1]), a.seconds)))
        return 0
    env = {**os.environ, "PYTHONPATH": str(a.replay_root.resolve())}
    rows = []
    pin = [] if a.core is None else ["--core", str(a.core)]
    for mode, hz in [("off", "0")] + [("live", h) for h in a.hz.split(",")] + [("warm", "0.001")]:
        r = subprocess.run([sys.executable, __file__, "--child", mode, hz, "--seconds", f"{a.seconds:g}",
                            "--replay-root", str(a.replay_root), *pin], env=env, capture_output=True, text=True,
                           timeout=a.seconds * 5 + 120)  # fmt: skip
        if r.returncode != 0:
            raise SystemExit(f"{mode} {hz}: exit {r.returncode}: {r.stderr[-2000:]}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=a.replay_root, capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    path = a.out / "results-live-render.json"
    doc = json.loads(path.read_text()) if path.exists() else {"labels": {}}
    doc["labels"][a.label] = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "commit": commit,
                              "seconds": a.seconds, "core": a.core, "rows": rows}  # fmt: skip
    a.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    md = markdown(doc)
    (a.out / "results-live-render.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
