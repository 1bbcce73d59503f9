"""Conversation turns on time (issue 15's first acceptance, on a quiet machine).

    PYTHONPATH=. python bench/sessions_timing.py [--sessions 96] [--turns 5] [--think 0.1]

The stub (pinned to core 1) in its own process records, per request id, when it received the request
and when it wrote its last byte (GET /stub/truth?detail=1, CLOCK_MONOTONIC). The client is replay's own
session engine as `replay run --turns` builds it (pinned to core 0), with a constant think time, so the
truth needs nothing from the code under test: turn k+1 is due exactly `think` after the stub wrote the
last byte of turn k. Per follow-up turn: gap = stub receive of turn k+1 - stub end of turn k - think.
Acceptance: p99 of the gap within 2 ms (and never negative: a turn never leaves before its think time
has passed). Prompts: the stub's prompt length of turn k+1 = turn k's + its output + the new input.

Writes bench/results-sessions-timing.md and .json, with the load average.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from stub_truth import IdTarget, reset, truth  # noqa: E402

from replay.run.config import RunConfig  # noqa: E402
from replay.run.plan import session_schedule  # noqa: E402
from replay.run.runner import execute, run_in_uvloop  # noqa: E402
from replay.schedule.sessions import chain_hooks, turn_of  # noqa: E402
from replay.stub.server import StubProcess  # noqa: E402
from replay.targets.openai_http import HTTPTargetConfig  # noqa: E402

STUB = ["--ttft-ms", "20", "--itl-ms", "5", "--vllm", "--continuous-usage"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=96)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--rate", type=float, default=4.0, help="new sessions per second")
    ap.add_argument("--think", type=float, default=0.1, help="constant think time, seconds")
    ap.add_argument("--out", type=Path, default=ROOT / "bench")
    a = ap.parse_args()
    os.sched_setaffinity(0, {0})
    load0 = os.getloadavg()
    cfg = RunConfig(target="stub", rate=a.rate, duration_s=None, sessions=a.sessions, turns=a.turns,
                    think_time=f"{a.think:g}", input_tokens=64, output_tokens=16, follow_up_tokens=16,
                    seed=5, quiet=True, drain_timeout_s=30.0)  # fmt: skip
    recipe, offered = session_schedule(cfg)
    with StubProcess(STUB) as stub:
        assert stub.proc is not None
        os.sched_setaffinity(stub.proc.pid, {1})
        reset(stub.base_url)
        target = IdTarget(HTTPTargetConfig(base_url=stub.base_url))
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            res = run_in_uvloop(
                execute(cfg, target, recipe(), Path(d) / "run", offered, hooks=chain_hooks(recipe))
            )
        doc = truth(stub.base_url)
    served = {int(x[5]): x for x in doc["requests"]}
    plen = {int(x[5]): n for x, n in zip(doc["requests"], doc["prompt_tokens"], strict=True)}
    follow = [rid for rid in served if turn_of(rid) > 0]
    gaps = np.array([(served[r][0] - served[r - 1][3] - a.think) * 1e3 for r in follow])
    grows = sum(plen[r] == plen[r - 1] + served[r - 1][4] + 16 for r in follow)
    s = res.summary
    row: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip(),  # fmt: skip
        "loadavg_before": [round(x, 2) for x in load0],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "sessions": a.sessions, "turns": a.turns, "think_s": a.think, "rate_sessions_s": a.rate,
        "counts": s["counts"],
        "follow_ups": len(follow),
        "gap_ms": {q: round(float(np.percentile(gaps, p)), 3) for q, p in
                   (("min", 0), ("p10", 10), ("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        "prompt_grows_exactly": f"{grows} of {len(follow)}",
        "selfcheck": {k: s["selfcheck"].get(k) for k in ("trustworthy", "reasons", "loop_lag_max_ms")},
    }  # fmt: skip
    row["pass"] = bool(row["gap_ms"]["p99"] <= 2.0 and row["gap_ms"]["min"] > -0.2 and grows == len(follow))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results-sessions-timing.json").write_text(json.dumps(row, indent=1) + "\n")
    g = row["gap_ms"]
    md = [
        "# Conversation turns on time (stub truth)",
        "",
        f"Written by `bench/sessions_timing.py` on {row['date']} (commit {row['commit']}); load average before "
        f"{row['loadavg_before']}, after {row['loadavg_after']}. {a.sessions} sessions x {a.turns} turns, "
        f"{a.rate:g} new sessions/s, constant think time {a.think:g} s; stub on core 1, client on core 0.",
        "",
        "Gap = stub receive of turn k+1 - stub end of turn k - think time (ms), over "
        f"{len(follow)} follow-up turns:",
        "",
        "| min | p10 | p50 | p90 | p99 | max |",
        "|---|---|---|---|---|---|",
        f"| {g['min']} | {g['p10']} | {g['p50']} | {g['p90']} | {g['p99']} | {g['max']} |",
        "",
        f"Prompt of turn k+1 = turn k's + its output + 16 new tokens (stub's counts): {row['prompt_grows_exactly']}.",
        f"Requests: {s['counts']['scheduled']} scheduled, {s['counts']['ok']} ok, accounted: {s['counts']['accounted']}."
        f" Self-check: {'ok' if row['selfcheck']['trustworthy'] else '; '.join(row['selfcheck']['reasons'])}.",
        "",
        f"Acceptance (p99 <= 2 ms, never early, prompts exact): {'pass' if row['pass'] else 'FAIL'}.",
        "",
    ]  # fmt: skip
    (a.out / "results-sessions-timing.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
