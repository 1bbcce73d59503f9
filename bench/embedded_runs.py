"""The embedded default target end to end: `make stress` at a saturating, a deeply saturating and a
sustainable rate, and `make capacity` with the default SLO. Writes bench/results-embedded.md.

Why: the README quotes these outputs verbatim (the first command a new user runs) and the target
table quotes the capacity; they must come from a script anyone can rerun, best on a quiet machine
(`uptime` is recorded beside them: on a shared machine other processes' load shows up as the
client's self-check failing and as lower served rates).

    python bench/embedded_runs.py [--rates 50,200,15] [--skip-capacity]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results-embedded.md"
REPLAY = [sys.executable, "-m", "replay"]
DEFAULT_SLO = "ttft_p99<=500ms,itl_p99<=50ms"  # the Makefile's SLO default


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def run(args: list[str], log: Path) -> tuple[int, float, str]:
    out = Path(args[args.index("--out") + 1])
    shutil.rmtree(out, ignore_errors=True)  # a reused run directory gets appended to, not replaced
    t0 = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([*REPLAY, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=3600)
    wall = time.perf_counter() - t0
    log.write_text(p.stdout + p.stderr)
    return p.returncode, wall, p.stdout


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--rates", default="50,200,15", help="`make stress RATE=R` for each (the last: one it sustains)"
    )
    ap.add_argument("--duration", default="60", help="as make stress's DURATION")
    ap.add_argument("--skip-capacity", action="store_true")
    ap.add_argument("--append", action="store_true", help="add these runs to the existing results file")
    ap.add_argument("--work", type=Path, default=Path("runs") / "bench-embedded", help="relative to the repo")
    args = ap.parse_args()
    os.chdir(ROOT)  # run directories print as runs/..., as after `make stress`
    args.work.mkdir(parents=True, exist_ok=True)
    sections: list[str] = []
    started = uptime()
    rates = [float(r) for r in args.rates.split(",") if r]
    for rate in rates:
        out = args.work / f"rate{rate:g}"
        cmd = [
            "run",
            "--target",
            "transformers",
            "--rate",
            f"{rate:g}",
            "--duration",
            args.duration,
            "--out",
            str(out),
        ]
        before = uptime()
        code, wall, stdout = run(cmd, args.work / f"rate{rate:g}.log")
        summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
        c = summary.get("counts", {})
        t = summary.get("throughput", {})
        ok_share = c.get("ok", 0) / c["scheduled"] if c.get("scheduled") else 0.0
        achieved = (t.get("req_s") or 0.0) / rate
        # The seeded Poisson draw may schedule fewer or more than rate x duration: judge against it too.
        arrived = c.get("scheduled", 0) / float(args.duration)
        of_arrived = (t.get("req_s") or 0.0) / arrived if arrived else 0.0
        healthy = ok_share >= 0.99 and of_arrived >= 0.95
        sections += [
            f"## `make stress RATE={rate:g}` (`replay {' '.join(cmd[:-2])}`)",
            "",
            f"exit {code}, wall {wall:.0f} s; ok {ok_share:.1%} of scheduled, achieved {achieved:.1%} of offered, "
            f"{of_arrived:.1%} of the {arrived:.2f} req/s that arrived ({'healthy' if healthy else 'not sustained'}); "
            f"uptime before: `{before}`",
            "",
            "```",
            stdout.rstrip(),
            "```",
            "",
        ]
        print(
            f"rate {rate:g}: exit {code}, {wall:.0f} s, ok {ok_share:.1%}, achieved {achieved:.1%}",
            flush=True,
        )
    if not args.skip_capacity:
        out = args.work / "capacity"
        before = uptime()
        cmd = ["capacity", "--target", "transformers", "--slo", DEFAULT_SLO, "--out", str(out), "--quiet"]
        code, wall, _ = run(cmd, args.work / "capacity.log")
        report = (out / "report.md").read_text() if (out / "report.md").exists() else "(no report)"
        res = (
            json.loads((out / "capacity.json").read_text()).get("result", {})
            if (out / "capacity.json").exists()
            else {}
        )
        sections += [
            f'## `make capacity` (`replay capacity --target transformers --slo "{DEFAULT_SLO}"`)',
            "",
            f"exit {code}, wall {wall:.0f} s; max SLO rate {res.get('max_slo_rate_req_s')} req/s, closed-loop max "
            f"throughput {res.get('max_throughput_req_s')} req/s; uptime before: `{before}`",
            "",
            report.replace("# Capacity:", "### Capacity:"),
            "",
        ]
        print(f"capacity: exit {code}, {wall:.0f} s, {res.get('max_slo_rate_req_s')} req/s", flush=True)
    head = [
        "# The embedded default target (transformers, tiny model, its own process)",
        "",
        f"Written by `bench/embedded_runs.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores. uptime at start: `{started}`; at end: `{uptime()}`.",
        "",
    ]
    if args.append and OUT.exists():
        head = [
            OUT.read_text().rstrip("\n"),
            "",
            f"Added by `bench/embedded_runs.py --append` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
            f"uptime at start `{started}`, at end `{uptime()}`.",
            "",
        ]
    OUT.write_text("\n".join(head + sections) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
