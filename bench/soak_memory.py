"""Soak memory: the tool's RSS after 10k, 100k and 1M requests against a fast stub stays flat.

    PYTHONPATH=. python bench/soak_memory.py [--requests 1000000] [--rate 1500] [--out bench/results-soak-memory.md]

One `replay run` process (uvloop, one worker) against the stub (first token at once, 4 tokens per
request, pinned to the other core); RSS is read from the run's own time series (client.rss_mb,
sampled every interval) at the interval where the cumulative request count passes each mark.
Goal: under 150 MB, growth under 5% from 10k to 1M.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaleout import PY, ROOT, Stub  # noqa: E402

MARKS = (10_000, 100_000, 1_000_000)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--rate", type=float, default=1500.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results-soak-memory.md")
    a = ap.parse_args()
    stub = Stub(None, 1, 0.0, 1.0, 0.0)
    t = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="soak-mem-") as tmp:
            out = Path(tmp) / "run"
            cmd = ["taskset", "-c", "0", PY, "-m", "replay", "run", "--target", stub.root,
                   "--rate", f"{a.rate:g}", "--requests", str(a.requests), "--input-tokens", "8",
                   "--output-tokens", "4", "--workers", "1", "--interval", "5s", "--out", str(out),
                   "--quiet"]  # fmt: skip
            subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, check=False)
            rows = [json.loads(line) for line in (out / "timeseries.jsonl").read_text().splitlines()]
            summary = json.loads((out / "summary.json").read_text())
            log_mb = (out / "requests.jsonl").stat().st_size / 2**20
    finally:
        stub.close()
    wall = time.monotonic() - t
    seen, at = 0, {}
    for r in rows:
        seen += r["scheduled"]
        for m in MARKS:
            if m not in at and seen >= m and r.get("client.rss_mb") is not None:
                at[m] = (r["client.rss_mb"], r["t_s"])
    c = summary["counts"]
    lines = [
        "# Soak memory: tool RSS against request count",
        "",
        f"`replay run` (one process, uvloop) at {a.rate:g} req/s offered, {a.requests:,} requests of 8 in / 4 out "
        f"tokens against the stub (first token at once, pinned to the other core). {time.strftime('%Y-%m-%d')}; "
        f"wall {wall:.0f} s; achieved {summary['throughput']['req_s']} req/s; ok {c['ok']:,} of {c['scheduled']:,}; "
        f"requests.jsonl {log_mb:.0f} MiB on disk (memory holds none of it).",
        "",
        "| requests | RSS MiB | at s |",
        "|---|---|---|",
    ]
    for m in MARKS:
        if m in at:
            lines.append(f"| {m:,} | {at[m][0]} | {at[m][1]} |")
    if MARKS[0] in at and MARKS[-1] in at:
        growth = at[MARKS[-1]][0] / at[MARKS[0]][0] - 1
        lines += ["", f"Growth 10k -> 1M: **{growth:+.1%}** (goal < 5%); peak {summary['client']['rss_peak_mb']} MiB "
                  "(goal < 150 MB)."]  # fmt: skip
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
