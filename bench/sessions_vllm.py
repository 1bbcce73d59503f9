"""Conversations on vLLM-CPU (issue 15): a 5-turn session workload against the embedded tiny model,
started by replay itself (`replay run --target <vllm toml> --turns 5`), with the server's own
prefix-cache counters attributed to each turn index.

Why phases: vLLM counts prefix-cache queries and hits (tokens) per server, not per request. Every
session starts within about a second and waits a fixed 4 s think time between turns, so turn k of
all sessions runs in a window of its own, with idle seconds between windows; the run's sidecar scrapes
/metrics once a second (server_metrics.jsonl, run clock), and the counters' change from the last
sample before turn k's first send to the first after its last end belongs to turn k alone (the script
checks that such samples exist and refuses to attribute otherwise).

What to expect: turn 1's prompts are unique (no hits); turn k+1 re-sends turn k's prompt, so the
whole blocks of it hit (32 tokens here: vLLM-CPU's default of 128 would show hits only in 128-token
steps, a first run read 256, 256, 384 hit tokens a request for turns 2-4, whole 128-blocks exactly): floor(P_k / 16) * 16 tokens of P_k + output +
follow-up. The output is re-sent as stand-in ids, not the ids the model generated, so the server's
cached decode blocks do not hit (a real client re-sends the generated text: more hits than here).

    echo 19 > /proc/self/autogroup; .venv/bin/python bench/sessions_vllm.py   # ~2 min
writes bench/results-sessions.md and .json (the run directory: runs/bench-sessions-vllm/).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "runs" / "bench-sessions-vllm"  # the run directory (git-ignored)
TURNS, SESSIONS, THINK_S = 5, 8, 4.0
FIRST, FOLLOW, OUTPUT, BLOCK = 256, 64, 32, 32

TARGET = """kind = "vllm"
model = "builtin:tiny-llama"
served_model_name = "tiny"
dtype = "float32"
max_model_len = 2048
extra_args = ["--max-num-seqs", "16", "--seed", "0", "--enable-prefix-caching", "--block-size", "32"]
startup_timeout_s = 400

[env]
VLLM_CPU_KVCACHE_SPACE = "1"
HF_HUB_OFFLINE = "1"
"""


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def run() -> Path:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    toml = OUT / "vllm-prefix.toml"
    toml.write_text(TARGET)
    run_dir = OUT / "run"
    cmd = [sys.executable, "-m", "replay", "run", "--target", str(toml), "--turns", str(TURNS),
           "--sessions", str(SESSIONS), "--rate", "8", "--think-time", str(THINK_S),
           "--input-tokens", str(FIRST), "--follow-up-tokens", str(FOLLOW), "--output-tokens", str(OUTPUT),
           "--seed", "0", "--interval", "1", "--workers", "1", "--out", str(run_dir), "--quiet"]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, timeout=600)
    return run_dir


def attribute(run_dir: Path) -> list[dict]:
    """Per turn index: its window on the run clock, the prefix-cache counters' change over it, and
    the hits expected from the prompts (whole blocks of the previous turn's prompt)."""
    rows = [r for r in _jsonl(run_dir / "requests.jsonl") if r.get("turn")]
    samples = [s for s in _jsonl(run_dir / "server_metrics.jsonl") if "prefix_cache_queries_total" in s]
    summary = json.loads((run_dir / "summary.json").read_text())
    ttft = {r["turn"]: r["ttft_ms"] for r in summary["turns"]}
    by_id = {r["id"]: r for r in rows}
    out = []
    for k in range(1, TURNS + 1):
        sent = [r for r in rows if r["turn"] == k and r["sent_s"] is not None]
        lo = min(r["sent_s"] for r in sent)
        hi = max(r["end_s"] for r in sent)
        nxt = [r["sent_s"] for r in rows if r["turn"] == k + 1 and r["sent_s"] is not None]
        before = [s for s in samples if s["t_s"] < lo]
        after = [s for s in samples if hi < s["t_s"] < min(nxt, default=float("inf"))]
        row = {"turn": k, "requests": len(sent), "window_s": [round(lo, 3), round(hi, 3)],
               "ttft_ms": {q: ttft[k][q] for q in ("p50", "p90", "p99", "count")}}  # fmt: skip
        # Whole blocks of the previous turn's prompt, as the server counted it (usage.prompt_tokens).
        row["expected_hit_tokens"] = sum(
            (by_id[r["id"] - 1]["input_tokens"] // BLOCK) * BLOCK for r in sent if k > 1
        )
        row["prompt_tokens"] = sum(r["input_tokens"] for r in sent)
        if not before or not after:
            row["attributed"] = False  # no sample between this window and its neighbours
        else:
            b, a = before[-1], after[0]
            q = a["prefix_cache_queries_total"] - b["prefix_cache_queries_total"]
            h = a["prefix_cache_hits_total"] - b["prefix_cache_hits_total"]
            row.update(attributed=True, queries_tokens=q, hits_tokens=h, hit_rate=round(h / q, 4) if q else None,
                       samples_t_s=[b["t_s"], a["t_s"]])  # fmt: skip
        out.append(row)
    return out


def write(run_dir: Path, turns: list[dict], load: tuple[float, float, float], elapsed: float) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    c = summary["counts"]
    doc = {
        "workload": {
            "sessions": SESSIONS,
            "turns": TURNS,
            "think_s": THINK_S,
            "first_turn_tokens": FIRST,
            "follow_up_tokens": FOLLOW,
            "output_tokens": OUTPUT,
            "session_rate": 8.0,
        },  # fmt: skip
        "server": summary.get("target", {}),
        "counts": c,
        "turns": turns,
        "load_average_at_start": load,
        "load_average_at_end": os.getloadavg(),
        "elapsed_s": round(elapsed, 1),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "priority": "lowest (autogroup nice 19) beside other work: TTFTs are timing-sensitive",
        "command": "echo 19 > /proc/self/autogroup; .venv/bin/python bench/sessions_vllm.py",
    }
    (ROOT / "bench" / "results-sessions.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [
        "# Conversations on vLLM-CPU: prefix-cache hits and TTFT per turn index",
        "",
        f"{SESSIONS} sessions x {TURNS} turns against the embedded tiny model on vLLM-CPU (started by "
        f"`replay run --turns`, `--enable-prefix-caching`); sessions start at 8/s (Poisson), think time "
        f"{THINK_S:g} s after each turn's end; first turn {FIRST} tokens, each later turn adds the "
        f"previous output ({OUTPUT}) + {FOLLOW} new tokens. Prefix-cache counters (tokens) from the "
        "server's /metrics, attributed per turn window (see the script's docstring).",
        "",
        f"Requests: scheduled {c['scheduled']}, ok {c['ok']}, accounted {c['accounted']}. "
        f"Load average {load[0]:.2f} / {load[1]:.2f} at start, {doc['load_average_at_end'][0]:.2f} at end "
        f"({doc['machine']}); run at lowest CPU priority beside other work, so the TTFTs are for a rerun "
        "on a quiet machine; the hit counts are not timing-sensitive.",
        "",
        "| turn | requests | prompt tokens | prefix queries | prefix hits | hit rate | expected hits "
        "| TTFT p50 ms | TTFT p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in turns:
        rate = f"{t['hit_rate']:.1%}" if t.get("hit_rate") is not None else "-"
        lines.append(
            f"| {t['turn']} | {t['requests']} | {t['prompt_tokens']} | {t.get('queries_tokens', '-')} "
            f"| {t.get('hits_tokens', '-')} | {rate} | {t['expected_hit_tokens']} "
            f"| {t['ttft_ms']['p50']} | {t['ttft_ms']['p99']} |"
        )
    lines += [
        "",
        "Expected hits: whole 32-token blocks (`--block-size 32`; vLLM-CPU's default is 128) of the "
        "previous turn's prompt. The "
        "previous output is re-sent as stand-in ids, not the model's own tokens, so its cached blocks "
        "do not hit; a client re-sending the generated text would see more.",
        "",
        f"Regenerate: `{doc['command']}` (~{elapsed:.0f} s, vLLM start included).",
    ]
    (ROOT / "bench" / "results-sessions.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    load = os.getloadavg()
    t = time.monotonic()
    run_dir = run() if "--reuse" not in sys.argv else OUT / "run"
    turns = attribute(run_dir)
    write(run_dir, turns, load, time.monotonic() - t)
    print((ROOT / "bench" / "results-sessions.md").read_text())


if __name__ == "__main__":
    main()
