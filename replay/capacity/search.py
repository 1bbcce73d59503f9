"""Capacity search: the highest open-loop request rate a server sustains while meeting an SLO.

1. Probe (closed loop): concurrency 1, 2, 4, ... until throughput grows by less than
   `probe_growth` per doubling. Concurrency 1 is the single-request latency baseline; the curve
   is throughput versus batch; its plateau X_max brackets the answer from above, since no open-loop
   rate beyond what the server completes at full concurrency keeps a bounded queue.
2. Search (open loop): bisection on the offered rate in [0, X_max]. The first step is the closed-
   loop throughput at the highest concurrency whose latencies met the SLO (a free guess that usually
   lands near the answer); then each step halves the bracket [last pass, first fail] until it is
   narrower than `tolerance` x the fail rate (the plateau itself is tested before the search calls
   it a fail; should it pass, the search looks above it), or the budget runs out. Why bisection and
   not secant or model fitting: near capacity the verdict is a noisy step function of rate (p99 and
   queue growth jump at the knee), which breaks the smoothness interpolation relies on; bisection
   needs only that passing is (mostly) monotone in rate, gains a fixed bit per step, and its bracket
   is an honest error bar. Steps are cheap to fail: a live watch ends a step once its verdict is
   decided (capacity.watch), so steps above the answer cost seconds. Each step is a full open-loop
   run; requests intended in the first `warmup_s` (and intervals starting then) are left out of its
   verdict. A step passes when the SLO holds on the rest and the server is not saturated (backlog
   growth, TTFT trend: stats.saturation).
3. Confirmation: the decisive rates (last pass, first fail) run `repeats` more times on fresh
   seeds; the report shows each run's figures and their spread.
4. Knee of latency versus offered load (Kneedle), and, given a trace, replicas for its peak.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from replay.capacity.options import Budget as _Budget
from replay.capacity.options import CapacityOptions
from replay.capacity.slo import Slo, goodput, read_requests
from replay.capacity.stats import (
    ended_ok,
    knee,
    median_of,
    replica_estimate,
    sample_warnings,
    saturation,
    spread,
    window_hists,
)
from replay.capacity.watch import StepWatch
from replay.core.request import Request
from replay.core.target import Target
from replay.run.config import RunConfig
from replay.run.runner import execute, versions
from replay.schedule import arrivals
from replay.schedule import synthetic as schedule
from replay.schedule.prompts import PromptBuilder
from replay.schedule.vocab import id_range
from replay.stats import histogram as H

SCHEMA = 1
CURVE_METRICS = ("ttft", "ttft_intended", "itl", "tpot", "e2e", "e2e_intended")


class CapacitySearch:
    def __init__(
        self,
        target: Target,
        opts: CapacityOptions,
        out_dir: Path,
        log: Callable[[str], None] | None = None,
        demand: dict[str, Any] | None = None,
    ) -> None:
        """`demand`: a trace's peak rates (stats.trace_demand) for the replica estimate."""
        if opts.warmup_s >= opts.step_s:
            raise ValueError("warm-up must be shorter than a step")
        self.target = target
        self.opts = opts
        self.out = out_dir
        self.log = log or (lambda _msg: None)
        self.budget = _Budget(opts.max_steps, opts.max_time_s)
        self.demand = demand
        self.probe: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []
        self.baseline_ttft_s: float | None = None
        self.drain_s = opts.drain_timeout_s or 5.0
        vocab = opts.vocab_size or getattr(target, "vocab_size", None)
        self.low_id, self.high_id = id_range(vocab)

    # --- runs ------------------------------------------------------------------------------------

    def _schedule(self, offsets: Iterator[float], seed: int, duration_s: float) -> Iterator[Request]:
        o = self.opts
        return schedule.synthetic(
            offsets,
            input_tokens=o.input_tokens,
            output_tokens=o.output_tokens,
            prompts=PromptBuilder(seed, self.low_id, self.high_id),  # fresh prompts: no cache reuse
            duration_s=duration_s,
            max_requests=None,
        )

    def _cfg(self, seed: int, **kw: Any) -> RunConfig:
        o = self.opts
        return RunConfig(
            target=o.target_name,
            input_tokens=o.input_tokens,
            output_tokens=o.output_tokens,
            seed=seed,
            interval_s=o.interval_s,
            drain_timeout_s=self.drain_s,
            endpoint=o.endpoint,
            model=o.model,
            quiet=True,
            **kw,
        )

    async def _probe_level(self, c: int) -> dict[str, Any]:
        o = self.opts
        seed = o.seed + c
        run_dir = self.out / "probe" / f"c{c:03d}"
        cfg = self._cfg(seed, concurrency=c, duration_s=o.probe_s)
        sched = self._schedule(itertools.repeat(0.0), seed, o.probe_s)
        await execute(cfg, self.target, sched, run_dir, None, manage_target=False)
        # Leave out about the first fifth (filling the pipeline), whole intervals only: the
        # histograms come from the interval log.
        w0 = (0.2 * o.probe_s // o.interval_s) * o.interval_s
        lines = list(read_requests(run_dir / "requests.jsonl"))
        done = ended_ok(lines, w0, o.probe_s)
        gp = goodput(lines, o.slo, w0)
        hists = window_hists(run_dir, w0)
        verdict = o.slo.evaluate(hists, gp.scheduled, gp.failed)
        level = {
            "concurrency": c,
            "run_dir": str(run_dir.relative_to(self.out)),
            "throughput_req_s": round(len(done) / (o.probe_s - w0), 4),
            "output_tok_s": round(sum(ln["output_tokens"] for ln in done) / (o.probe_s - w0), 2),
            "error_rate": round(gp.failed / gp.scheduled, 6) if gp.scheduled else None,
            "slo_met": verdict.passed,
            "verdict": verdict.to_json(),
            "latency_ms": _latency(hists),
        }
        self.log(
            f"probe c={c}: {level['throughput_req_s']:.3g} req/s, ttft p50 "
            f"{level['latency_ms']['ttft']['p50']} ms, SLO {'met' if verdict.passed else 'missed'}"
        )
        return level

    async def _open_step(self, rate: float, phase: str) -> dict[str, Any]:
        o = self.opts
        rate = float(f"{rate:.4g}")  # rates named in files and compared across repeats
        idx = len(self.steps)
        seed = o.seed + 1000 + idx
        run_dir = self.out / "steps" / f"{idx:02d}-{phase}-{rate:.4g}rps"
        cfg = self._cfg(seed, rate=rate, duration_s=o.step_s, arrival=o.arrival, burstiness=o.burstiness)
        spec = cfg.arrival_spec()
        watch = StepWatch(self.target, o.slo, o.warmup_s, rate * (o.step_s - o.warmup_s))
        sched = watch.gate(self._schedule(arrivals.offsets(spec, seed), seed, o.step_s))
        t_start = time.monotonic()
        monitor = asyncio.ensure_future(watch.monitor())
        try:
            res = await execute(cfg, watch, sched, run_dir, rate, manage_target=False)
        finally:
            monitor.cancel()
        self.budget.steps += 1
        step = self._analyse(run_dir, rate, seed, phase, watch.abort_reason, res.summary)
        step["wall_s"] = round(time.monotonic() - t_start, 2)
        self.steps.append(step)
        why = "" if step["passed"] else " — " + "; ".join(step["reasons"])
        self.log(f"step {idx} ({phase}) {rate:.4g} req/s: {'PASS' if step['passed'] else 'FAIL'}{why}")
        self.write()
        return step

    def _analyse(
        self, run_dir: Path, rate: float, seed: int, phase: str, aborted: str | None, summary: dict[str, Any]
    ) -> dict[str, Any]:
        o = self.opts
        w0, w1 = o.warmup_s, o.step_s
        lines = list(read_requests(run_dir / "requests.jsonl"))
        hists = window_hists(run_dir, w0)
        # An early stop ends the schedule at its last request: per-second rates are over the part
        # of the window that ran, not the whole of it (that would understate them).
        end = min(w1, max((ln["intended_s"] for ln in lines), default=w0)) if aborted else w1
        span = end - w0
        gp = goodput(lines, o.slo, w0, end)
        verdict = o.slo.evaluate(hists, gp.scheduled, gp.failed)
        sat = saturation(lines, w0, w1, self.baseline_ttft_s)
        reasons = verdict.failures() + list(sat.reasons)
        if aborted:
            reasons.insert(0, f"stopped early: {aborted}")
        return {
            "index": len(self.steps),
            "phase": phase,
            "rate_req_s": rate,
            "seed": seed,
            "run_dir": str(run_dir.relative_to(self.out)),
            "passed": verdict.passed and not sat.saturated and not aborted,
            "reasons": reasons,
            "aborted": aborted,
            "verdict": verdict.to_json(),
            "goodput": gp.to_json(),
            "window_s": round(span, 3),
            "arrived_req_s": round(gp.scheduled / span, 4) if span > 0 else None,  # what the draw offered
            "achieved_req_s": round(len(ended_ok(lines, w0, end)) / span, 4) if span > 0 else None,
            "saturation": sat.to_json(),
            "latency_ms": _latency(hists),
            "trustworthy": summary["selfcheck"]["trustworthy"],
            "warnings": sample_warnings(o.slo, hists),
        }

    # --- the search ------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Start the target, probe, search, confirm; return (and write) the capacity document."""
        await self.target.start()
        try:
            return await self._run()
        finally:
            await self.target.close()

    async def _run(self) -> dict[str, Any]:
        o = self.opts
        self.result: dict[str, Any] = {}
        c, prev, saturated = 1, 0.0, False
        while c <= o.probe_max_concurrency and self.budget.elapsed() + o.probe_s <= o.max_time_s:
            level = await self._probe_level(c)
            self.probe.append(level)
            if c == 1:
                self.baseline_ttft_s = (level["latency_ms"]["ttft"]["p50"] or 0) / 1000
                e2e = (level["latency_ms"]["e2e"]["p50"] or 0) / 1000
                self.drain_s = o.drain_timeout_s or max(5.0, 10 * e2e)
            x = level["throughput_req_s"]
            if (level["error_rate"] or 0) > 0.5:
                break
            if prev and x < o.probe_growth * prev:
                saturated = True
                break
            prev = max(prev, x)
            c *= 2
        if not self.probe:
            return self._finish(0.0, None, "time budget ended before the probe")
        x_max = max(lv["throughput_req_s"] for lv in self.probe)
        base = self.probe[0]
        hopeless = _hopeless(base, o.slo)
        if hopeless:
            return self._finish(0.0, None, f"even one request at a time misses the SLO: {hopeless}")
        if x_max <= 0:
            return self._finish(0.0, None, "no request succeeded in the probe")
        lo, hi, hi_tested = 0.0, float(f"{x_max:.4g}"), False
        if not saturated:  # throughput still grew at the last level: find a failing rate first
            r = x_max
            while self.budget.allows(o.step_s):
                step = await self._open_step(r, "expand")
                r = step["rate_req_s"]
                if not step["passed"]:
                    hi, hi_tested = r, True
                    break
                lo, r = r, 2 * r
            else:
                return self._finish(lo, None, "budget ended before a failing rate was found")
        met = [lv["throughput_req_s"] for lv in self.probe if lv["slo_met"]]
        guess = max(met) if met else hi / 2
        r = min(max(guess, lo + 0.25 * (hi - lo)), lo + 0.9 * (hi - lo))
        stop = "converged"
        while True:
            if not self.budget.allows(o.step_s):
                stop = "budget"
                break
            step = await self._open_step(r, "search")
            r = step["rate_req_s"]
            if step["passed"]:
                lo = r
                if r >= hi:  # the assumed upper bound passed: look above it
                    hi, hi_tested = r * (1 + 4 * o.tolerance), False
            else:
                hi, hi_tested = r, True
            if lo > 0 and hi - lo <= o.tolerance * hi:
                if hi_tested:
                    break
                r = hi  # the bracket's top is still an assumption (the probe's plateau): test it
                continue
            if lo == 0 and hi < x_max / 32:
                stop = "no rate met the SLO"
                break
            r = (lo + hi) / 2
        for rate in (lo, hi) if lo > 0 else (hi,):
            tested = any(s["rate_req_s"] == rate for s in self.steps)
            for _ in range(o.repeats if tested else max(1, o.repeats)):
                if not self.budget.allows(o.step_s):
                    break
                await self._open_step(rate, "confirm")
        if not hi_tested and any(s["rate_req_s"] == hi for s in self.steps):
            hi_tested = True
        return self._finish(lo, hi if hi_tested else None, stop, x_max=x_max)

    # --- results ---------------------------------------------------------------------------------

    def _finish(self, lo: float, hi: float | None, stop: str, x_max: float | None = None) -> dict[str, Any]:
        runs = {r: [s for s in self.steps if s["rate_req_s"] == r] for r in (lo, hi) if r}
        # Confirmed: every run at the last pass passed and every run at the first fail failed,
        # with at least two runs at the pass rate; None when nothing was repeated.
        consistent = all(s["passed"] for s in runs.get(lo, [])) and all(
            not s["passed"] for s in runs.get(hi, [])
        )
        repeated = len(runs.get(lo, [])) >= 2
        confirmed: bool | None = (consistent if repeated else None) if lo else False
        pts: dict[float, list[float]] = {}
        for s in self.steps:
            v = s["latency_ms"][self.opts.knee_metric]["p99"]
            if v is not None:
                pts.setdefault(s["rate_req_s"], []).append(v)
        k = knee([(r, statistics.median(v)) for r, v in pts.items()])
        at_lo = runs.get(lo, [])
        self.result = {
            "max_slo_rate_req_s": round(lo, 4),
            "first_fail_rate_req_s": None if hi is None else round(hi, 4),
            "resolution": None if not (lo and hi) else round((hi - lo) / hi, 4),
            "stop_reason": stop,
            "confirmed": confirmed,
            "decisive": {str(round(r, 4)): spread(v) for r, v in runs.items()},
            "goodput_at_max_req_s": median_of([s["goodput"]["goodput_req_s"] for s in at_lo]),
            "attainment_at_max": median_of([s["goodput"]["attainment"] for s in at_lo]),
            "max_throughput_req_s": x_max,
            "knee": None if k is None else {"rate_req_s": k[0], f"{self.opts.knee_metric}_p99_ms": k[1]},
            "elapsed_s": round(self.budget.elapsed(), 1),
            "open_loop_steps": self.budget.steps,
            "warnings": sorted({w for st in self.steps for w in st["warnings"]})[:5],
        }
        return self.write()

    def document(self) -> dict[str, Any]:
        base = self.probe[0] if self.probe else None
        return {
            "schema": SCHEMA,
            "kind": "capacity",
            "slo": self.opts.slo.text,
            "options": self.opts.to_json(),
            "target": self.target.describe(),
            "versions": versions(),
            "baseline": None if base is None else {"concurrency": 1, "latency_ms": base["latency_ms"]},
            "probe": self.probe,
            "steps": self.steps,
            "result": getattr(self, "result", {}),
            "replicas": self._replicas(),
        }

    def _replicas(self) -> dict[str, Any] | None:
        rate = getattr(self, "result", {}).get("max_slo_rate_req_s")
        if self.demand is None or not rate:
            return None if self.demand is None else {"demand": self.demand, "replicas": None}
        o = self.opts
        return replica_estimate(self.demand, rate, o.output_tokens, o.input_tokens, o.headroom)

    def write(self) -> dict[str, Any]:
        doc = self.document()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "capacity.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        return doc


def _latency(hists: dict[str, Any]) -> dict[str, dict[str, Any]]:
    keep = ("p50", "p90", "p99", "max", "mean", "count")
    return {m: {k: v for k, v in H.summary_ms(hists[m]).items() if k in keep} for m in CURVE_METRICS}


def _hopeless(level: dict[str, Any], slo: Slo) -> str | None:
    """A latency upper bound that the single-request baseline's *median* already breaks.

    Load only adds to latency, and any bounded stat (p50 and up, mean or max) is at least about the
    median, so no rate can meet it. A miss only in the tail of a short probe (one hiccup in a few
    samples) is not decisive: the search finds out.
    """
    for b in slo.bounds:
        lat = level["latency_ms"].get(b.metric)
        if not b.upper or lat is None or lat["p50"] is None:
            continue
        if not b.holds(lat["p50"] / 1000):
            return f"{b.text} (median at concurrency 1: {lat['p50']:.1f} ms)"
    return None
