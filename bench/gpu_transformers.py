"""In-process transformers target on a GPU: TTFT/ITL under Poisson load and GPU memory.

Builds the tiny default model and a larger random Llama (~0.8B parameters) with the same
offline recipe (replay.targets.tiny_model), then for each runs open-loop Poisson schedules through
`TransformersLocalTarget` (transformers' own continuous batching) and records the summary
figures plus GPU memory (torch's peak allocation, read in the target's model process, and NVML's
device-wide use). The model runs in the target's own process, as under `make stress`.

    python bench/gpu_transformers.py --out DIR [--rates 2,8,32] [--duration 20]

Writes DIR/gpu_transformers.json and DIR/gpu_transformers.md. Runs on CPU too (slowly).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from replay.run.config import RunConfig
from replay.run.runner import execute, run_in_uvloop
from replay.schedule import arrivals
from replay.schedule import synthetic as schedule
from replay.schedule.prompts import PromptBuilder
from replay.targets import tiny_model
from replay.targets.transformers_local import TransformersLocalTarget, TransformersTargetConfig

LARGER = dict(
    tiny_model.PARAMS,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=16,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
)


async def gpu_memory(target: TransformersLocalTarget) -> dict[str, Any]:
    stats = await target.backend_stats()  # torch's accounting lives in the model process
    out: dict[str, Any] = {
        k: stats[k] for k in ("torch_peak_allocated_mib", "torch_reserved_mib") if k in stats
    }
    if "device_name" in stats:
        out["device"] = stats["device_name"]
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        out["nvml_used_mib"] = round(mem.used / 2**20, 1)
        out["nvml_total_mib"] = round(mem.total / 2**20, 1)
        out["nvml_util_percent"] = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
    except Exception as exc:  # no NVML here: say so rather than invent a figure
        out["nvml_error"] = f"{type(exc).__name__}: {exc}"[:120]
    return out


async def bench_model(name: str, model_dir: Path, rates: list[float], args: argparse.Namespace) -> list[dict]:
    target = TransformersLocalTarget(
        TransformersTargetConfig(model_dir=str(model_dir), kv_cache_gib=args.kv_cache_gib)
    )
    t = time.perf_counter()
    await target.start()
    started = time.perf_counter() - t
    rows = []
    try:
        for rate in rates:
            cfg = RunConfig(
                target=name,
                rate=rate,
                duration_s=args.duration,
                input_tokens=args.input_tokens,
                output_tokens=args.output_tokens,
                seed=args.seed,
                interval_s=5.0,
                quiet=True,
                drain_timeout_s=120.0,
            )
            sched = schedule.synthetic(
                arrivals.offsets(cfg.arrival_spec(), cfg.seed),
                input_tokens=cfg.input_tokens,
                output_tokens=cfg.output_tokens,
                prompts=PromptBuilder(cfg.seed, 4, target.vocab_size),
                duration_s=cfg.duration_s,
                max_requests=None,
            )
            run_dir = args.out / f"{name}-rate{rate:g}"
            res = await execute(cfg, target, sched, run_dir, rate, manage_target=False)
            s = res.summary
            m = s["metrics"]
            rows.append(
                {
                    "model": name,
                    "rate": rate,
                    "ok": s["counts"]["ok"],
                    "scheduled": s["counts"]["scheduled"],
                    "errors": s["counts"]["errors"],
                    "req_s": s["throughput"]["req_s"],
                    "output_tok_s": s["throughput"]["output_tok_s"],
                    "ttft_p50": m["ttft"]["p50"],
                    "ttft_p99": m["ttft"]["p99"],
                    "itl_p50": m["itl"]["p50"],
                    "itl_p99": m["itl"]["p99"],
                    "trustworthy": s["selfcheck"]["trustworthy"],
                    "start_s": round(started, 1),
                    "memory": await gpu_memory(target),
                    "target": s["target"],
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    finally:
        await target.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rates", default="2,8,32")
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--input-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default="tiny,larger")
    ap.add_argument("--kv-cache-gib", type=float, default=None, help="default: transformers sizes it")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rates = [float(r) for r in args.rates.split(",")]
    cache = args.out / "models"
    rows: list[dict] = []
    for name in args.models.split(","):
        params = tiny_model.PARAMS if name == "tiny" else LARGER
        t = time.perf_counter()
        model_dir = tiny_model.build(cache / name, params)
        print(f"{name}: built in {time.perf_counter() - t:.1f} s", flush=True)
        rows += run_in_uvloop(bench_model(name, model_dir, rates, args))
    (args.out / "gpu_transformers.json").write_text(json.dumps(rows, indent=2))
    lines = [
        "| model | offered req/s | ok/scheduled | req/s | out tok/s "
        "| TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | torch peak MiB | NVML used MiB | trusted |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = r["memory"]
        lines.append(
            f"| {r['model']} | {r['rate']:g} | {r['ok']}/{r['scheduled']} | {r['req_s']} "
            f"| {r['output_tok_s']} | {r['ttft_p50']} | {r['ttft_p99']} | {r['itl_p50']} | {r['itl_p99']} "
            f"| {mem.get('torch_peak_allocated_mib', '-')} | {mem.get('nvml_used_mib', '-')} "
            f"| {r['trustworthy']} |"
        )
    (args.out / "gpu_transformers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
