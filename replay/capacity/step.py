"""One open-loop capacity step: a clean start, a run under the live watch, and what it measured.

Clean start: the server is let drain (its /metrics report no request running or waiting) and,
where the target can, its prefix cache is reset, so a step inherits neither a queue nor cached
prompts from the one before. Each step's prompts are fresh anyway (their own seed).

What a step records beside its verdict (confidence.py, watch.py): the server's own signals over
it (requests running and waiting, KV-cache use, preemptions: the run's sidecar scrapes them), and
what may have disturbed it: the client's self-check (a step whose client fell behind is marked
`untrusted` and never judged), the machine's load average and the server's CPU share.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

# Imported here, before any step runs: confidence.exact_interval needs it at a step's first look,
# and a first import (~0.1 s) there would stall the event loop mid-step.
import scipy.special  # noqa: F401

from replay.capacity.confidence import combine, exact_interval
from replay.capacity.options import CapacityOptions
from replay.capacity.slo import STATS, goodput, read_requests
from replay.capacity.stats import ended_ok, saturation, window_hists
from replay.capacity.watch import StepWatch, look_times
from replay.core.request import Request
from replay.core.target import Target
from replay.run.config import RunConfig
from replay.run.runner import execute
from replay.schedule import arrivals
from replay.stats import histogram as H
from replay.stats.classes import classes_section
from replay.stats.scrape import MetricsScraper
from replay.stats.selfcheck import stall_main_cause

DRAIN_POLL_S = 0.25
SERVER_KEYS = ("running", "waiting", "kv_cache_usage", "preemptions_total")


async def drain_server(target: Target, timeout_s: float) -> dict[str, Any]:
    """Wait until the server reports nothing running or waiting (at most timeout_s)."""
    url = getattr(target, "metrics_url", None)
    if not url:
        return {"drained": None, "waited_s": 0.0, "why": "the target exposes no /metrics"}
    t0 = time.monotonic()
    async with MetricsScraper(url) as scraper:
        while True:
            m = await scraper.sample()
            if not m:
                return {"drained": None, "waited_s": round(time.monotonic() - t0, 2),
                        "why": scraper.last_error or "no metrics"}  # fmt: skip
            busy = m.get("running", 0) + m.get("waiting", 0)
            if busy == 0 or time.monotonic() - t0 >= timeout_s:
                return {"drained": busy == 0, "waited_s": round(time.monotonic() - t0, 2), "left": busy}
            await asyncio.sleep(DRAIN_POLL_S)


async def reset_prefix_cache(target: Target) -> str:
    """'reset', or 'not reset: why' (a target without the call, a server that refused it)."""
    reset = getattr(target, "reset_prefix_cache", None)
    if reset is None:
        return "not reset: this target has no prefix cache the tool can reset"
    why = await reset()
    return "reset" if why is None else f"not reset: {why}"


class StepRunner:
    def __init__(
        self,
        target: Target,
        opts: CapacityOptions,
        out: Path,
        cfg: Callable[..., RunConfig],
        schedule: Callable[[Iterator[float], int, float], Iterator[Request]],
    ) -> None:
        self.target = target
        self.opts = opts
        self.out = out
        self.cfg = cfg
        self.schedule = schedule
        self.baseline_ttft_s: float | None = None
        self.drain_s = opts.drain_timeout_s or 5.0

    async def run(self, rate: float, phase: str, index: int, longest_s: float) -> dict[str, Any]:
        """One step at `rate`, at most `longest_s` after the warm-up; the step's record."""
        o = self.opts
        seed = o.seed + 1000 + index
        run_dir = self.out / "steps" / f"{index:02d}-{phase}-{rate:.4g}rps"
        clean = {"drain": await drain_server(self.target, max(10.0, self.drain_s)),
                 "prefix_cache": await reset_prefix_cache(self.target)}  # fmt: skip
        duration = o.warmup_s + longest_s
        cfg = self.cfg(seed, rate=rate, duration_s=duration, arrival=o.arrival, burstiness=o.burstiness)
        first = max(5.0, longest_s / 8)
        looks = look_times(o.warmup_s, min(first, longest_s), longest_s)
        watch = StepWatch(self.target, o.slo, o.warmup_s, rate * longest_s, looks, self.baseline_ttft_s)
        sched = watch.gate(self.schedule(arrivals.offsets(cfg.arrival_spec(), seed), seed, duration))
        load0 = os.getloadavg()[0]
        t_start = time.monotonic()
        monitor = asyncio.ensure_future(watch.monitor())
        try:
            res = await execute(cfg, watch, sched, run_dir, rate, manage_target=False)
        finally:
            monitor.cancel()
        step = self._analyse(run_dir, rate, seed, phase, index, watch, res.summary, duration)
        step["wall_s"] = round(time.monotonic() - t_start, 2)
        step["clean_start"] = clean
        step["noise"] = _noise(res.summary, load0)
        step["server"] = _server(res.summary)
        return step

    def _analyse(
        self, run_dir: Path, rate: float, seed: int, phase: str, index: int, watch: StepWatch,
        summary: dict[str, Any], duration: float,
    ) -> dict[str, Any]:  # fmt: skip
        o = self.opts
        w0 = o.warmup_s
        lines = list(read_requests(run_dir / "requests.jsonl"))
        hists = window_hists(run_dir, w0)
        # An early stop ends the schedule at its last request: per-second rates are over the part
        # of the window that ran, not the whole of it (that would understate them).
        stopped = watch.abort_reason is not None
        end = min(duration, max((ln["intended_s"] for ln in lines), default=w0)) if stopped else duration
        if watch.decision is not None and watch.stopped_at is not None:
            end = watch.stopped_at  # the window its deciding look judged
        span = end - w0
        gp = goodput(lines, o.slo, w0, end)
        point = o.slo.evaluate(hists, gp.scheduled, gp.failed)
        if watch.decision is not None:  # decided at a look: that look's verdict, on its window
            verdict, judged, sat = watch.decision
        else:  # ran to its end (or stopped by overload): judged on everything, saturation exactly
            judged = [t.judge(w0, end, watch.alpha, 0, watch.min_batch_s()) for t in watch.tallies]
            sat = saturation(lines, w0, end, self.baseline_ttft_s, watch.alpha)
            verdict = combine([p.verdict for p in judged] + [sat.verdict_as_bound])
        classes = class_verdicts(o.classes, hists, lines, w0, end)
        broken = [f"class {c['name']}: SLO broken: {f}" for c in classes for f in c.get("slo_failures", [])]
        if broken and verdict == "pass":
            verdict = "fail"  # every class must meet its own SLO
        parts = [p.to_json() for p in judged]
        for p, b in zip(parts, o.slo.bounds, strict=True):
            p["value_interval"] = _value_interval(b, hists, p, watch.alpha)
        trusted = bool(summary["selfcheck"]["trustworthy"])
        reasons = _reasons(parts, sat) + broken
        if stopped:
            at = max(0.0, (watch.stopped_at or end) - w0)
            reasons.insert(0, f"stopped at {at:.0f} s: {watch.abort_reason}")
        if not trusted:
            why = "; ".join(summary["selfcheck"]["reasons"])[:200]
            reasons.insert(0, f"not judged: the client fell behind ({why})")
        return {
            "index": index,
            "phase": phase,
            "rate_req_s": rate,
            "seed": seed,
            "run_dir": str(run_dir.relative_to(self.out)),
            "verdict": verdict if trusted else "untrusted",
            "judgement": verdict,  # what the measurements say, trusted or not
            "passed": trusted and verdict == "pass",
            "reasons": reasons,
            "aborted": watch.abort_reason,
            "looks": watch.judged
            if watch.decision
            else [*watch.judged, {"at_s": round(end, 2), "verdict": verdict}],
            "bounds": parts,
            "point_verdict": point.to_json(),
            "goodput": gp.to_json(),
            "window_s": round(span, 3),
            "arrived_req_s": round(gp.scheduled / span, 4) if span > 0 else None,  # what the draw offered
            "achieved_req_s": round(len(ended_ok(lines, w0, end)) / span, 4) if span > 0 else None,
            "saturation": sat.to_json(),
            "latency_ms": latency_ms(hists),
            **({"classes": classes} if classes else {}),
            "trustworthy": trusted,
            # Whose doing the client's stalls were (None: none): a busy machine is not our code.
            "client_stall_cause": stall_main_cause(summary["selfcheck"].get("stalls") or {}),
            "warnings": [],
        }


CURVE_METRICS = ("ttft", "ttft_intended", "itl", "tpot", "e2e", "e2e_intended")


def class_verdicts(mix: Any, hists: dict[str, Any], lines: list[dict[str, Any]], w0: float,
                   end: float) -> list[dict[str, Any]]:  # fmt: skip
    """Each --classes class over the step's window (requests intended in [w0, end); its histograms
    less the warm-up): counts, latencies and its SLO's point verdict on its own histograms. No
    confidence interval per class: a class's share of a step is few samples for a p99."""
    if not mix:
        return []
    sched: Counter[str] = Counter()
    ok: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    for ln in lines:
        k = ln.get("class")
        if k is None or not w0 <= ln["intended_s"] < end:
            continue
        sched[k] += 1
        ok[k] += ln["status"] == "ok"
        failed[k] += ln["status"] in ("error", "not_sent")
    return classes_section(hists, [asdict(c) for c in mix], sched, ok, failed)


def latency_ms(hists: dict[str, Any]) -> dict[str, dict[str, Any]]:
    keep = ("p50", "p90", "p99", "max", "mean", "count")
    return {m: {k: v for k, v in H.summary_ms(hists[m]).items() if k in keep} for m in CURVE_METRICS}


def _value_interval(b: Any, hists: dict[str, Any], part: dict[str, Any], alpha: float) -> list[float] | None:
    """The percentile's own interval (display units: ms, or tok/s): its values at the ranks that
    bound it, from the window's histogram, with the step's effective sample size."""
    p = STATS.get(b.stat or "")
    if p is None or b.metric not in hists or not part["n"]:
        return None
    h = hists[b.metric]
    n_eff = part["n"] / part["dispersion"]
    lo, hi = exact_interval((1 - p / 100) * n_eff, n_eff, alpha)  # fraction above the pXX
    levels = (max(0.0, 100 * (1 - hi)), min(100.0, 100 * (1 - lo)))
    # Histogram units (microseconds; milli-tokens/s for rates) to ms or tok/s.
    return [round(v * 1e-3, 3) for v in H.percentiles(h, levels)]


def _reasons(parts: list[dict[str, Any]], sat: Any) -> list[str]:
    out = []
    for p in parts:
        if p["verdict"] == "pass" or p["estimate"] is None:
            continue
        if p["low"] is None:
            out.append(f"{p['bound']}: {p['verdict']} ({p['k']} of {p['n']} over)")
            continue
        what = "fails" if p["verdict"] == "fail" else "undecided"
        out.append(
            f"{p['bound']} {what}: {p['estimate']:.2%} of samples over (95% CI {p['low']:.2%}–"
            f"{p['high']:.2%}, n/D = {p['n'] / p['dispersion']:.0f}) vs {p['allowed']:.2%} allowed"
        )
    out += list(sat.reasons)
    if sat.verdict == "undecided":
        out.append("saturation undecided: backlog and TTFT trends within their noise of the thresholds")
    return out


def _noise(summary: dict[str, Any], load0: float) -> dict[str, Any]:
    sc = summary["selfcheck"]
    server = summary.get("server") or {}
    cpu = (server.get("proc.cpu_pct") or {}).get("mean")
    cores = os.cpu_count() or 1
    return {
        "client_trustworthy": sc["trustworthy"],
        "client_reasons": sc["reasons"],
        "loop_lag_max_ms": sc.get("loop_lag_max_ms"),
        "client_cpu_percent": sc.get("client_cpu_percent"),
        "load_avg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "cores": cores,
        "server_cpu_share": None if cpu is None else round(cpu / 100 / cores, 3),
    }


def _server(summary: dict[str, Any]) -> dict[str, Any] | None:
    server = summary.get("server") or {}
    out = {k: server[k] for k in SERVER_KEYS if k in server}
    return out or None
