"""Soak of a mixed workload on vLLM-CPU (issue 15's acceptance): sessions + users who leave + two
classes + a probe, in one `replay run --target vllm` of M minutes; flat client memory, the drift
verdict, every request accounted.

    .venv/bin/python bench/soak_mixed_vllm.py [--minutes 30]      # writes bench/results-soak-mixed.md/.json

Workload (one client process, `--workers 1`, so the replay process's RSS is the client's memory):
new conversations at `--session-rate` (2/s, Poisson) of `--turns` (4) turns, think time exp:2 s, 32
new user tokens a later turn; a class mix drawn per session (chat 70%: 64 in / 32 out; long 30%:
256 in / 16 out; both on the base model: targets/vllm.toml serves no LoRA, bench/lora_classes_vllm.py
covers adapters); 15% of requests abandoned uniform 10-200 ms after their send (before the first
token or mid-stream; an abandoned turn ends its session, its later turns counted not_sent); a probe
of 1 req/s (32 in / 16 out). About 8 req/s of the main load + 1 probe: a fifth of what the tiny
model serves on this 2-core box (~40 req/s of 64/64), with contexts growing to ~350 tokens.

Client memory: psutil reads the replay process's RSS every 10 s from outside (the vLLM server is a
child process and is not counted); the run's own time series (client.rss_mb per interval) is the
cross-check. The slope is a least-squares fit after a warm-up (a fifth of the run, 1-5 min: the
allocator's arenas and the histograms fill early). 'Flat' = an 8-hour soak at that slope would stay
within the drift tracker's own bound on tool RSS (replay.stats.drift: +10% late vs early), i.e.
slope <= 10% x RSS after warm-up / 48 per 10 min (about 0.6 MiB per 10 min at ~280 MiB).

Accounting, checked three ways: summary.json's `accounted`; requests.jsonl (one row per scheduled
request: rows by status = the summary's counts, every session exactly --turns rows in one class);
and vLLM's own access log (POST /v1/completions lines, written when a response starts: between
the rows with a first byte and the rows sent; the difference is abandons that left before it).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
from vllm_common import ROOT, loadavg, write_results

OUT = ROOT / "runs" / "bench-soak-mixed"
STRIDE = 1024  # replay.schedule.sessions.TURN_STRIDE: session s, turn k has id s * 1024 + k
PROBE_ID0 = 1 << 40  # probe ids start here (replay.schedule.probe)
CLASSES = """# bench/soak_mixed_vllm.py: two tenants on the base model, drawn per session
[[class]]
name = "chat"
share = 0.7
input_tokens = 64
output_tokens = 32
slo = "ttft_p99<=500ms"

[[class]]
name = "long"
share = 0.3
input_tokens = 256
output_tokens = 16
slo = "ttft_p99<=1s"
"""


def sample_rss(pid: int, every_s: float, out: list[tuple[float, float]], stop: threading.Event) -> None:
    """(wall-clock time, RSS MiB) of process `pid` alone, every `every_s`, until it exits."""
    p = psutil.Process(pid)
    while not stop.is_set():
        try:
            out.append((time.time(), round(p.memory_info().rss / 2**20, 2)))
        except psutil.NoSuchProcess:
            return
        stop.wait(every_s)


def slope_per_10min(pts: list[tuple[float, float]]) -> float | None:
    return None if len(pts) < 4 else fit(pts)[0]


def fit(pts: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope of RSS on time and its standard error, both in MiB per 10 min."""
    t, y = np.array(pts).T
    coef, cov = np.polyfit(t, y, 1, cov=True)
    return float(coef[0] * 600.0), float(np.sqrt(cov[0, 0]) * 600.0)


def memory(pts: list[tuple[float, float]], run_s: float) -> dict:
    """Start/mid/end RSS, the slope after warm-up, and the 'flat' verdict (see the module doc)."""
    warm = min(300.0, max(60.0, run_s / 5))
    after = [p for p in pts if warm <= p[0] <= run_s]  # the run proper: not the drain and report writing
    mid = min(pts, key=lambda p: abs(p[0] - run_s / 2))
    base = round(float(np.median([y for _, y in after[:6]])), 2) if after else None
    slope, se = fit(after) if len(after) >= 4 else (None, None)
    bound = None if base is None else 0.10 * base / 48
    judged = len(after) >= 60  # 10 min of samples after warm-up: a shorter fit's slope is noise
    return {"samples": len(pts), "every_s": 10, "warmup_s": warm, "start_mib": pts[0][1], "mid_mib": mid[1],
            "mid_at_s": mid[0], "end_mib": after[-1][1] if after else pts[-1][1],
            "peak_mib": max(y for _, y in pts), "after_warmup_mib": base,
            "slope_mib_per_10min": None if slope is None else round(slope, 3),
            "slope_stderr_mib_per_10min": None if se is None else round(se, 3),
            "bound_mib_per_10min": None if bound is None else round(bound, 3),
            "flat": None if slope is None or not judged else abs(slope) <= bound}  # fmt: skip


def log_check(run: Path, summary: dict, turns: int) -> dict:
    """requests.jsonl and vLLM's access log against the summary's counts."""
    rows = [json.loads(x) for x in (run / "requests.jsonl").read_text().splitlines()]
    by_status = collections.Counter(r["status"] for r in rows)
    sessions: dict[int, list[dict]] = collections.defaultdict(list)
    for r in rows:
        if r["id"] < PROBE_ID0:
            sessions[r["id"] // STRIDE].append(r)
    bad = [s for s, rs in sessions.items() if len(rs) != turns or len({r.get("class") for r in rs}) != 1]
    sent = sum(1 for r in rows if r["sent_s"] is not None)
    # uvicorn logs a request when its response starts: a client that left before the server's first
    # byte (abandoned within milliseconds of its send) has no line there, unless the server wrote its
    # headers in the instant before the cancel reached it. So: responded <= lines <= sent.
    responded = sum(1 for r in rows if r["first_byte_s"] is not None)
    posts = sum(1 for ln in (run / "server.log").read_text(errors="replace").splitlines()
                if "POST /v1/completions" in ln)  # fmt: skip
    c = summary["counts"]
    want = {"ok": c["ok"], "abandoned": c["abandoned"], "unfinished": c["unfinished"],
            "not_sent": sum(c["not_sent"].values()), "error": sum(c["errors"].values())}  # fmt: skip
    got = {k: by_status.get(k, 0) for k in want}
    got["error"] = sum(v for k, v in by_status.items() if k not in want)
    return {"rows": len(rows), "rows_by_status": dict(by_status), "rows_match_summary": got == want,
            "sessions": len(sessions), "sessions_not_k_turns_in_one_class": len(bad),
            "probe_rows": sum(1 for r in rows if r["id"] >= PROBE_ID0), "sent_rows": sent,
            "responded_rows": responded, "left_before_response": sent - responded,
            "server_access_log_posts": posts, "server_log_consistent": responded <= posts <= sent}  # fmt: skip


def autogroup_nice() -> int | None:
    """This process's autogroup nice (the replay run it starts inherits it): 19 = lowest priority."""
    try:
        return int(Path("/proc/self/autogroup").read_text().split("nice")[1])
    except (OSError, IndexError, ValueError):
        return None


def git_commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "replay", "bench/soak_mixed_vllm.py"],
                           cwd=ROOT, capture_output=True, text=True).stdout.split()[1::2]  # fmt: skip
    return head.stdout.strip() + (f" + uncommitted {', '.join(dirty)}" if dirty else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--session-rate", type=float, default=2.0, help="new sessions/s")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--think-time", default="exp:2")
    ap.add_argument("--abandon", default="0.15:uniform:0.01-0.2")
    ap.add_argument("--probe-rate", type=float, default=1.0)
    ap.add_argument("--stem", default="results-soak-mixed", help="bench/<stem>.md/.json")
    a = ap.parse_args()
    smoke = a.minutes < 10
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    (OUT / "classes.toml").write_text(CLASSES)
    run = OUT / "run"
    cmd = [sys.executable, "-m", "replay", "run", "--target", "vllm", "--workers", "1",
           "--rate", f"{a.session_rate:g}", "--turns", str(a.turns), "--think-time", a.think_time,
           "--follow-up-tokens", "32", "--input-tokens", "64", "--output-tokens", "32",
           "--classes", str(OUT / "classes.toml"), "--abandon", a.abandon, "--probe-rate", f"{a.probe_rate:g}",
           "--duration", f"{a.minutes * 60:g}s", "--interval", "10s", "--seed", "15", "--out", str(run),
           "--quiet"]  # fmt: skip
    load0, date, t0 = loadavg(), time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), time.monotonic()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    with open(OUT / "replay.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        pts: list[tuple[float, float]] = []
        stop = threading.Event()
        th = threading.Thread(target=sample_rss, args=(proc.pid, 10.0, pts, stop), daemon=True)
        th.start()
        rc = proc.wait()
        stop.set()
        th.join()
    wall, load1 = time.monotonic() - t0, loadavg()
    if rc != 0:
        print((OUT / "replay.log").read_text()[-3000:], file=sys.stderr)
        print(f"replay run exited {rc}", file=sys.stderr)
        return 1
    s = json.loads((run / "summary.json").read_text())
    ts = [json.loads(x) for x in (run / "timeseries.jsonl").read_text().splitlines()]
    # The run proper starts once vLLM is up: its clock's zero is intervals.hlog's StartTime (epoch
    # seconds), so the psutil samples (epoch) and the time series (t_s) share one axis.
    head = (run / "intervals.hlog").read_text()[:300]
    start = float(head.split("#[StartTime: ", 1)[1].split()[0])
    startup_s = start - pts[0][0]  # replay's start-up: imports, the tiny model, vLLM's start
    run_s = a.minutes * 60
    ext = [(round(t - start, 2), y) for t, y in pts if t >= start]
    mem = memory(ext, run_s)
    own = [(r["t_s"], r["client.rss_mb"]) for r in ts if r.get("client.rss_mb") is not None]
    own_after = [p for p in own if mem["warmup_s"] <= p[0] <= run_s]
    mem["timeseries_slope_mib_per_10min"] = slope_per_10min(own_after)
    mem["timeseries_start_end_mib"] = (
        [own[0][1], own_after[-1][1] if own_after else own[-1][1]] if own else None
    )
    mem["replay_startup_s"] = round(startup_s, 1)
    checks = log_check(run, s, a.turns)
    c, m, pm, sc = s["counts"], s["metrics"], s["probe"]["metrics"], s["selfcheck"]
    doc = {"smoke": smoke, "date": date, "commit": git_commit(), "machine": f"{platform.node()}, "
           f"{os.cpu_count()} cores, {platform.machine()}", "loadavg_before": load0, "loadavg_after": load1,
           "autogroup_nice": autogroup_nice(), "wall_s": round(wall, 1), "command": "replay " + " ".join(cmd[3:]),
           "minutes": a.minutes, "offered_rate_req_s": s["offered_rate_req_s"],
           "throughput_req_s": s["throughput"]["req_s"], "counts": c, "accounting": checks, "drift": s["drift"],
           "client_memory": mem, "rss_samples": ext,
           "ttft_p99_ms": {"main": m["ttft"]["p99"], "probe": pm["ttft"]["p99"]},
           "ttft_p50_ms": {"main": m["ttft"]["p50"], "probe": pm["ttft"]["p50"]},
           "turns": [{"turn": r["turn"], "scheduled": r["scheduled"], "ok": r["ok"],
                      "ttft_p50_ms": r["ttft_ms"]["p50"], "ttft_p99_ms": r["ttft_ms"]["p99"]} for r in s["turns"]],
           "classes": [{"name": r["name"], "share": r["share"], "share_drawn": r["share_drawn"],
                        "scheduled": r["scheduled"], "ok": r["ok"], "not_ok": r["not_ok"],
                        "ttft_p50_ms": r["metrics"]["ttft"]["p50"], "ttft_p99_ms": r["metrics"]["ttft"]["p99"],
                        "e2e_p99_ms": r["metrics"]["e2e"]["p99"], "slo": r.get("slo"),
                        "slo_held": r.get("slo_held")} for r in s["classes"]],
           "selfcheck": {k: sc.get(k) for k in ("trustworthy", "reasons", "dispatch_lag_p99_ms",
                                                 "loop_lag_p99_ms", "loop_lag_max_ms", "client_cpu_percent")},
           "stalls": sc.get("stalls"), "run_dir": str(run.relative_to(ROOT))}  # fmt: skip
    write_results(a.stem, render(doc, a), doc)
    print((ROOT / "bench" / f"{a.stem}.md").read_text())
    return 0


def render(d: dict, a: argparse.Namespace) -> list[str]:
    c, mem, ck, dr = d["counts"], d["client_memory"], d["accounting"], d["drift"]
    title = "# Soak, mixed workload on vLLM-CPU" + (" — SMOKE RUN (not the result)" if d["smoke"] else "")
    md = [title, ""]
    if d["smoke"]:
        md += [f"**Smoke run: {a.minutes:g} minutes at lowest CPU priority beside other work; it checks the "
               "script end to end. The acceptance figures come from the 30-minute run on a quiet machine.**", ""]  # fmt: skip
    md += [f"{d['date']}, commit {d['commit']}, {d['machine']}; load average before {d['loadavg_before']}, "
           f"after {d['loadavg_after']}; autogroup nice {d['autogroup_nice']}"
           + (" (lowest CPU priority: timing figures are the loaded machine's, rerun quiet)"
              if d["autogroup_nice"] == 19 else "") + ".", "",
           f"`{d['command']}`", "",
           f"{a.minutes:g} min of new sessions ({a.session_rate:g}/s x {a.turns} turns, think {a.think_time}), "
           f"abandon {a.abandon}, probe {a.probe_rate:g} req/s; offered {d['offered_rate_req_s']} req/s main load, "
           f"achieved {d['throughput_req_s']} req/s in all; wall {d['wall_s']:.0f} s (vLLM start included).", "",
           "## Every request accounted", "",
           f"scheduled {c['scheduled']}: ok {c['ok']}, errors {sum(c['errors'].values())} {c['errors'] or ''}, "
           f"abandoned {c['abandoned']} ({c.get('abandoned_mid_stream', 0)} mid-stream), unfinished "
           f"{c['unfinished']}, not sent {sum(c['not_sent'].values())} {c['not_sent'] or ''}; "
           f"summary `accounted`: **{c['accounted']}**.", "",
           f"- requests.jsonl: {ck['rows']} rows, by status = the summary's counts: **{ck['rows_match_summary']}**; "
           f"{ck['sessions']} sessions, {ck['sessions_not_k_turns_in_one_class']} without exactly {a.turns} rows "
           f"in one class; {ck['probe_rows']} probe rows.",
           f"- vLLM's access log (a line when a response starts): {ck['server_access_log_posts']} POST "
           f"/v1/completions; client rows with a first byte {ck['responded_rows']}, sent {ck['sent_rows']} (the "
           f"{ck['left_before_response']} between: abandoned before a first byte); responded <= lines <= sent: "
           f"**{ck['server_log_consistent']}**.", "",
           "## Client memory (replay process RSS, psutil every 10 s)", "",
           f"start {mem['start_mib']} MiB, mid {mem['mid_mib']} MiB (t={mem['mid_at_s']:.0f} s), end "
           f"{mem['end_mib']} MiB, peak {mem['peak_mib']} MiB; after a {mem['warmup_s']:.0f} s warm-up "
           f"({mem['after_warmup_mib']} MiB) the slope is **{mem['slope_mib_per_10min']} MiB per 10 min** "
           f"(standard error {mem['slope_stderr_mib_per_10min']}) "
           f"(the run's own client.rss_mb: {_r(mem['timeseries_slope_mib_per_10min'])}); bound for 'flat' "
           f"{mem['bound_mib_per_10min']} MiB per 10 min (an 8 h soak within the drift tracker's +10% RSS "
           f"bound): **{_flat(mem['flat'])}**.", "",
           "## Drift", "", f"verdict: **{dr['verdict']}**" + (f" ({dr['detail']})" if dr.get("detail") else "")
           + (f"; drifted: {dr['drifted']}" if dr.get("drifted") else ""), ""]  # fmt: skip
    for k, v in (dr.get("figures") or {}).items():
        md.append(f"- {k}: early {_r(v['early'])}, late {_r(v['late'])}")
    md += ["", "## Probe vs main load", "", f"TTFT p50 main {d['ttft_p50_ms']['main']} ms, probe "
           f"{d['ttft_p50_ms']['probe']} ms; TTFT p99 main **{d['ttft_p99_ms']['main']} ms**, probe "
           f"**{d['ttft_p99_ms']['probe']} ms**.", "", "## Per turn", "",
           "| turn | scheduled | ok | TTFT p50 ms | TTFT p99 ms |", "|---|---|---|---|---|"]  # fmt: skip
    md += [
        f"| {r['turn']} | {r['scheduled']} | {r['ok']} | {r['ttft_p50_ms']} | {r['ttft_p99_ms']} |"
        for r in d["turns"]
    ]
    md += ["", "## Per class", "", "| class | share | drawn | scheduled | ok | not ok | TTFT p50 | TTFT p99 | "
           "E2E p99 (ms) | SLO | held |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    md += [f"| {r['name']} | {r['share']} | {r['share_drawn']} | {r['scheduled']} | {r['ok']} | {r['not_ok']} | "
           f"{r['ttft_p50_ms']} | {r['ttft_p99_ms']} | {r['e2e_p99_ms']} | {r['slo']} | {r['slo_held']} |"
           for r in d["classes"]]  # fmt: skip
    sc, st = d["selfcheck"], d["stalls"] or {}
    md += ["", "## Self-check", "", f"trustworthy: **{sc['trustworthy']}**; dispatch lag p99 "
           f"{sc['dispatch_lag_p99_ms']} ms, loop lag p99 {sc['loop_lag_p99_ms']} ms (max {sc['loop_lag_max_ms']}), "
           f"client CPU {sc['client_cpu_percent']}%."]  # fmt: skip
    md += [f"- {r}" for r in sc["reasons"] or []]
    if st:
        md.append(f"- stalls over {st.get('threshold_ms')} ms: {st.get('count')} (total {st.get('total_ms')} ms, "
                  f"{st.get('requests_touched')} requests touched); causes (ms): {st.get('causes_ms')}")  # fmt: skip
    md += ["", f"Run directory: {d['run_dir']} (not committed). Regenerate: `.venv/bin/python bench/soak_mixed_vllm.py "
           f"--minutes {a.minutes:g}`."]  # fmt: skip
    return md


def _flat(v: bool | None) -> str:
    return "not judged: under 10 min of samples after warm-up" if v is None else "flat" if v else "NOT flat"


def _r(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"


if __name__ == "__main__":
    sys.exit(main())
