"""Users who leave, and a quiet user beside a saturating load, on vLLM-CPU (issue 15).

    PYTHONPATH=. .venv/bin/python bench/abandon_vllm.py [--rounds 4] [--k 16] [--rate 50] [--duration 30]

One vLLM-CPU server (embedded tiny model, --max-num-seqs 32), its /metrics scraped at 40 Hz by a
process of its own (the server's view, on the same monotonic clock as the client's stamps).

A. Cancels free the server: `rounds` bursts of `k` long requests (64 in / 1500 out) sent together
   6 s apart, every one abandoned by the client 2 s after its send (--abandon 1.0:2 in effect).
   Per round: the server's num_requests_running just before the first cancel, and how long after
   the last cancel (stamped by the client when it closed the connection) the scrape first shows
   the round's requests gone (the answer's arrival time: an upper bound). Acceptance: < 1 s.
B. Saturation with abandons and a probe: `replay run` at `rate` req/s (64 in / 64 out, above the
   server's capacity here) with --abandon 0.3:exp:2 and --probe-rate 2. The summary must count
   abandoned apart from errors and add up (ok + errors + abandoned + unfinished + not sent =
   scheduled); the probe's TTFT p50/p99 beside the load's; the server's waiting queue from the scrape.

Writes bench/results-abandon.md/.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vllm_common import ROOT, loadavg, read_scrape, scraper, vllm_server, write_results

from replay.core.request import Request
from replay.run.config import RunConfig
from replay.run.runner import execute, run_in_uvloop
from replay.schedule.prompts import PromptBuilder
from replay.targets.http_config import HTTPTargetConfig
from replay.targets.openai_http import OpenAIHTTPTarget

GAP_S, PATIENCE_S, OUT_TOKENS = 6.0, 2.0, 1500


class CancelStamped(OpenAIHTTPTarget):
    """The real client; notes when each cancelled request's handling ended (connection closed)."""

    def __init__(self, cfg: HTTPTargetConfig) -> None:
        super().__init__(cfg)
        self.cancelled_at: dict[int, float] = {}

    async def send(self, request, record) -> None:  # type: ignore[no-untyped-def]
        try:
            await super().send(request, record)
        except asyncio.CancelledError:
            self.cancelled_at[request.id] = time.perf_counter()
            raise


def phase_a(url: str, samples_path: Path, run_dir: Path, rounds: int, k: int) -> dict:
    pb = PromptBuilder(seed=7)
    reqs = []
    for r in range(rounds):
        for j in range(k):
            i = r * k + j
            reqs.append(Request(id=i, intended_s=1.0 + r * GAP_S, input_tokens=64, output_tokens=OUT_TOKENS,
                                prompt_token_ids=pb.prompt(i, 64), abandon_after_s=PATIENCE_S))  # fmt: skip
    cfg = RunConfig(target="vllm", rate=k / GAP_S, duration_s=rounds * GAP_S, seed=7, interval_s=1.0, quiet=True,
                    drain_timeout_s=30.0)  # fmt: skip
    target = CancelStamped(HTTPTargetConfig(base_url=url))
    res = run_in_uvloop(execute(cfg, target, iter(reqs), run_dir, None))
    time.sleep(1.0)  # the scrape after the last round's cancels
    samples = read_scrape(samples_path)
    out = []
    for r in range(rounds):
        stamps = sorted(target.cancelled_at[i] for i in range(r * k, (r + 1) * k) if i in target.cancelled_at)
        first, last = stamps[0], stamps[-1]
        before = [s for s in samples if s[1] < first]
        running_before = before[-1][2] if before else math.nan
        # First scrape asked after the last cancel whose count shows the round's requests gone.
        after = [s for s in samples if s[0] >= last and s[2] <= running_before - len(stamps)]
        gone = after[0] if after else None
        out.append({
            "round": r,
            "cancelled": len(stamps),
            "cancel_spread_ms": round((last - first) * 1e3, 2),
            "running_before": running_before,
            "running_after": gone[2] if gone else None,
            "freed_within_s": round(gone[1] - last, 3) if gone else None,
            "scrape_gap_ms": round(1e3 * max((b[0] - a[0]) for a, b in zip(samples, samples[1:], strict=False)
                                             if first - 1 <= a[0] <= last + 2), 1),
        })  # fmt: skip
    c = res.summary["counts"]
    return {"rounds": out, "counts": c}


def phase_b(url: str, run_dir: Path, samples_path: Path, a: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    cmd = [*a.client_pin, sys.executable, "-m", "replay", "run", "--target", url, "--rate", f"{a.rate:g}",
           "--duration", f"{a.duration:g}", "--input-tokens", "64", "--output-tokens", "64", "--seed", "3",
           "--abandon", "0.3:exp:2", "--probe-rate", "2", "--vocab-size", "8192", "--drain-timeout", "10",
           "--interval", "5", "--out", str(run_dir), "--quiet"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    t_end = time.perf_counter()
    s = json.loads((run_dir / "summary.json").read_text())
    c = s["counts"]
    total = (
        c["ok"] + sum(c["errors"].values()) + c["abandoned"] + c["unfinished"] + sum(c["not_sent"].values())
    )
    samples = [x for x in read_scrape(samples_path) if t_start <= x[0] <= t_end]
    m, pm = s["metrics"], s["probe"]["metrics"]
    return {
        "exit_code": r.returncode,
        "console": r.stdout,
        "counts": c,
        "sum_of_outcomes": total,
        "adds_up": total == c["scheduled"] and c["accounted"],
        "saturation": (s.get("saturation") or {}).get("verdict"),
        "throughput_req_s": s["throughput"]["req_s"],
        "offered_req_s": s["offered_rate_req_s"],
        "load_ttft_ms": {p: m["ttft"][p] for p in ("p50", "p99")},
        "probe_ttft_ms": {p: pm["ttft"][p] for p in ("p50", "p99")},
        "load_e2e_ms": {p: m["e2e"][p] for p in ("p50", "p99")},
        "probe_e2e_ms": {p: pm["e2e"][p] for p in ("p50", "p99")},
        "probe": {k: s["probe"][k] for k in ("scheduled", "ok", "rate_req_s")},
        "server_running_max": max((x[2] for x in samples), default=None),
        "server_waiting_max": max((x[3] for x in samples), default=None),
        "server_kv_cache_max": max((x[4] for x in samples), default=None),
        "client_trustworthy": s["selfcheck"]["trustworthy"],
        "selfcheck_reasons": s["selfcheck"]["reasons"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--server-core", type=int, default=1,
                    help="vLLM on this core, the client on core 0 (-1: no pinning)")  # fmt: skip
    a = ap.parse_args()
    if a.server_core < 0:
        a.server_core, a.client_pin = None, []
    else:
        a.client_pin = ["taskset", "-c", "0"]
    load_start = loadavg()
    with (
        tempfile.TemporaryDirectory() as tmp,
        vllm_server(Path(tmp) / "server.log", max_num_seqs=32, core=a.server_core) as sp,
    ):
        tmpd = Path(tmp)
        with scraper(sp.url + "/metrics", tmpd / "scrape.txt", hz=40.0) as sfile:
            time.sleep(0.5)
            a_res = phase_a(sp.url + "/v1", sfile, tmpd / "a", a.rounds, a.k)
            b_res = phase_b(sp.url + "/v1", tmpd / "b", sfile, a)
            samples = read_scrape(sfile)
        rate_hz = (len(samples) - 1) / (samples[-1][0] - samples[0][0])
    load_end = loadavg()
    ok_a = all(r["freed_within_s"] is not None and r["freed_within_s"] < 1.0 for r in a_res["rounds"])
    md = [
        "# Abandoned streams and a probe beside a saturating load, on vLLM-CPU (issue 15)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}: `PYTHONPATH=. .venv/bin/python bench/abandon_vllm.py --rounds "
        f"{a.rounds} --k {a.k} --rate {a.rate:g} --duration {a.duration:g}`. vLLM-CPU, embedded tiny model "
        f"(float32, --max-num-seqs 32), /metrics scraped at {rate_hz:.1f} Hz by its own process. Load average "
        f"(1/5/15) at start {load_start}, at end {load_end} on 2 cores (timing figures are only as good as "
        "the machine is quiet). "
        + (
            f"vLLM pinned to core {a.server_core} (one OpenMP thread), the client to core 0."
            if a.server_core is not None
            else "No core pinning."
        ),
        "",
        f"## A. Cancels free the server ({a.rounds} rounds of {a.k} requests, 64 in / {OUT_TOKENS} out, "
        f"all abandoned {PATIENCE_S:g} s after sending)",
        "",
        "freed within = from the client's last cancel of the round (connection closed) to the arrival of the "
        "first scrape, asked after it, whose num_requests_running shows the round's requests gone.",
        "",
        "| round | cancelled | cancel spread ms | running before | running after | freed within s | scrape gap ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in a_res["rounds"]:
        md.append(f"| {r['round']} | {r['cancelled']} | {r['cancel_spread_ms']} | {r['running_before']:g} | "
                  f"{r['running_after']} | {r['freed_within_s']} | {r['scrape_gap_ms']} |")  # fmt: skip
    ca = a_res["counts"]
    md += [
        "",
        f"Client counts: scheduled {ca['scheduled']}, abandoned {ca['abandoned']} "
        f"({ca['abandoned_mid_stream']} mid-stream), ok {ca['ok']}, errors {sum(ca['errors'].values())}, "
        f"accounted {ca['accounted']}. Every round freed within 1 s: {'yes' if ok_a else 'NO'}.",
        "",
        f"## B. {a.rate:g} req/s (64 in / 64 out) for {a.duration:g} s with --abandon 0.3:exp:2 and --probe-rate 2",
        "",
    ]
    b, c = b_res, b_res["counts"]
    md += [
        f"- saturation verdict: {b['saturation']}; achieved {b['throughput_req_s']} req/s of "
        f"{b['offered_req_s']} offered; server running max {b['server_running_max']}, waiting max "
        f"{b['server_waiting_max']}, KV cache max {b['server_kv_cache_max']}",
        f"- counts: scheduled {c['scheduled']} = ok {c['ok']} + errors {sum(c['errors'].values())} {c['errors']} "
        f"+ abandoned {c['abandoned']} ({c['abandoned_mid_stream']} mid-stream) + unfinished {c['unfinished']} "
        f"+ not sent {sum(c['not_sent'].values())} {c['not_sent']} = {b['sum_of_outcomes']}: "
        f"{'adds up' if b['adds_up'] else 'DOES NOT ADD UP'}",
        "",
        "| | TTFT p50 ms | TTFT p99 ms | E2E p50 ms | E2E p99 ms |",
        "|---|---|---|---|---|",
        f"| load | {b['load_ttft_ms']['p50']} | {b['load_ttft_ms']['p99']} | {b['load_e2e_ms']['p50']} | "
        f"{b['load_e2e_ms']['p99']} |",
        f"| probe (32 in / 16 out, {b['probe']['ok']} of {b['probe']['scheduled']} ok) | "
        f"{b['probe_ttft_ms']['p50']} | {b['probe_ttft_ms']['p99']} | {b['probe_e2e_ms']['p50']} | "
        f"{b['probe_e2e_ms']['p99']} |",
        "",
        f"Client kept up: {b['client_trustworthy']}" + (f" ({'; '.join(b['selfcheck_reasons'])})"
                                                        if b["selfcheck_reasons"] else ""),
        "",
        "replay's console output for run B:",
        "",
        "```",
        b["console"].rstrip(),
        "```",
    ]  # fmt: skip
    doc = {"loadavg_start": load_start, "loadavg_end": load_end, "scrape_hz": round(rate_hz, 1),
           "args": vars(a), "cancels": a_res, "saturated": {k: v for k, v in b.items() if k != "console"}}  # fmt: skip
    write_results("results-abandon", md, doc)
    print("\n".join(md))
    return 0 if ok_a and b["adds_up"] else 1


if __name__ == "__main__":
    sys.exit(main())
