"""Capacity search: the highest open-loop request rate a server sustains while meeting an SLO,
as an estimate with a 95% interval.

1. Probe (closed loop): concurrency 1, 2, 4, ... until throughput grows by less than
   `probe_growth` per doubling. Concurrency 1 is the single-request latency baseline; the curve
   is throughput versus batch; its plateau X_max brackets the answer from above, since no open-loop
   rate beyond what the server completes at full concurrency keeps a bounded queue.
2. Open-loop steps. Each step knows how sure it is (confidence.py): every SLO bound gets a
   confidence interval from the step's samples, allowing for bursts, and so does saturation; a
   step is PASS or FAIL only when all of them are on one side, and is otherwise extended (the
   live watch looks at doubling lengths up to `step_s`) and, if still not decided, reported
   UNDECIDED. A step whose client fell behind (its self-check failed) is not judged: it is
   re-run, and if the client cannot keep up `client_retries` times over, the search ends with that
   as its answer and no rate. Before each step the server drains and its prefix cache is reset
   where it can be (step.py).
3. Where to step (estimate.next_rate): the first step is the closed-loop throughput at the highest
   concurrency that met the SLO (a free guess near the answer); then bisection of the bracket
   [highest PASS, lowest FAIL] until a crossing of the SLO can be fitted, then steps alternately
   just below and just above that crossing. Why not pure bisection: near the answer a step's
   verdict is a coin flip unless it runs for many minutes (for a p99, bursts make it worse); the
   counts of every step near the answer, decided or not, place it faster (estimate.py).
4. The answer (estimate.answer): the crossing, within the bracket, with its 95% interval; the
   search stops when that interval is within +-`tolerance` of the estimate, or the budget ends.
   Then the knee of latency versus offered load (Kneedle), and, given a trace, replicas for its
   peak at the interval's low end and at the estimate.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from replay.capacity import estimate as E
from replay.capacity.confidence import look_alpha, samples_to_pass
from replay.capacity.options import Budget as _Budget
from replay.capacity.options import CapacityOptions
from replay.capacity.slo import Slo, goodput, read_requests
from replay.capacity.stats import ended_ok, knee, replica_estimate, window_hists
from replay.capacity.step import StepRunner, latency_ms
from replay.core.request import Request
from replay.core.target import Target
from replay.run.config import RunConfig
from replay.run.runner import execute, versions
from replay.schedule import synthetic as schedule
from replay.schedule.classes import with_classes
from replay.schedule.prompts import PromptBuilder
from replay.schedule.vocab import id_range

SCHEMA = 2
CLIENT_BEHIND = "the client could not keep up"
NONE_MET = ("even one request at a time misses", "no request succeeded", "no rate met the SLO")


class CapacitySearch:
    def __init__(
        self,
        target: Target,
        opts: CapacityOptions,
        out_dir: Path,
        log: Callable[[str], None] | None = None,
        demand: dict[str, Any] | None = None,
    ) -> None:
        """`demand`: a trace's peak rates (capacity.stats.trace_demand) for the replica estimate."""
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
        self.result: dict[str, Any] = {}
        self.client_behind: float | None = None  # the rate at which the client fell behind for good
        self.short: list[str] = []  # steps too short to ever pass
        # The user's --vocab-size first, else what a target that knows its model says.
        vocab = opts.vocab_size or getattr(target, "vocab_size", None)
        self.low_id, self.high_id = id_range(vocab)
        self.runner = StepRunner(target, opts, out_dir, self._cfg, self._schedule)

    # --- runs ------------------------------------------------------------------------------------

    def _schedule(self, offsets: Iterator[float], seed: int, duration_s: float) -> Iterator[Request]:
        o = self.opts
        reqs = schedule.synthetic(
            offsets,
            input_tokens=o.input_tokens,
            output_tokens=o.output_tokens,
            prompts=PromptBuilder(seed, self.low_id, self.high_id),  # fresh prompts: no cache reuse
            duration_s=duration_s,
            max_requests=None,
        )
        if not o.classes:
            return reqs
        return with_classes(reqs, o.classes, seed, PromptBuilder(seed ^ 0x7E4A, self.low_id, self.high_id))

    def _cfg(self, seed: int, **kw: Any) -> RunConfig:
        o = self.opts
        return RunConfig(
            target=o.target_name,
            input_tokens=o.input_tokens,
            output_tokens=o.output_tokens,
            seed=seed,
            interval_s=o.interval_s,
            drain_timeout_s=self.runner.drain_s,
            endpoint=o.endpoint,
            model=o.model,
            quiet=True,
            class_mix=o.classes,
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
            "latency_ms": latency_ms(hists),
        }
        self.log(
            f"probe c={c}: {level['throughput_req_s']:.3g} req/s, ttft p50 "
            f"{level['latency_ms']['ttft']['p50']} ms, SLO {'met' if verdict.passed else 'missed'}"
        )
        return level

    async def _step(self, rate: float, phase: str) -> dict[str, Any] | None:
        """A judged step at `rate` (re-run while its client falls behind); None when the client
        could not keep up `client_retries` times over, or the budget ended first."""
        o = self.opts
        rate = float(f"{rate:.4g}")  # rates named in files and compared across steps
        for attempt in range(o.client_retries + 1):
            longest = self._longest(rate)
            if self.budget.steps >= o.max_steps or longest < min(5.0, o.step_s - o.warmup_s):
                return None
            step = await self.runner.run(rate, phase if not attempt else "rerun", len(self.steps), longest)
            self.budget.steps += 1
            self.steps.append(step)
            why = "" if step["verdict"] == "pass" else " — " + "; ".join(step["reasons"])
            head = f"step {step['index']} ({step['phase']}) {rate:.4g} req/s"
            self.log(f"{head}: {step['verdict'].upper()}{why}")
            self.write()
            if step["verdict"] != "untrusted":
                return step
        self.client_behind = rate
        return None

    def _longest(self, rate: float) -> float:
        """A step's longest measurement: --step, stretched (up to 4x, within the budget) to the
        samples a percentile bound needs before it can pass at all at this rate."""
        o = self.opts
        base = o.step_s - o.warmup_s
        left = o.max_time_s - self.budget.elapsed() - 2.0 - o.warmup_s
        per_request = {"itl": max(1, o.output_tokens - 1)}
        need = max(
            (samples_to_pass(b, look_alpha(5)) / per_request.get(b.metric, 1) / rate for b in o.slo.bounds),
            default=0.0,
        )
        longest = min(max(base, need), 4 * base, left)
        if need > longest:
            self.short.append(f"a step at {rate:.4g} req/s needs ~{need:.0f} s of traffic before it can pass "
                              f"the SLO and had {longest:.0f} s: lengthen --step or --budget")  # fmt: skip
        return longest

    # --- the search ------------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Start the target, probe, search; return (and write) the capacity document."""
        await self.target.start()
        try:
            return await self._run()
        finally:
            await self.target.close()

    async def _run(self) -> dict[str, Any]:
        o = self.opts
        c, prev, saturated = 1, 0.0, False
        while c <= o.probe_max_concurrency and self.budget.elapsed() + o.probe_s <= o.max_time_s:
            level = await self._probe_level(c)
            self.probe.append(level)
            if c == 1:
                self.runner.baseline_ttft_s = (level["latency_ms"]["ttft"]["p50"] or 0) / 1000
                e2e = (level["latency_ms"]["e2e"]["p50"] or 0) / 1000
                self.runner.drain_s = o.drain_timeout_s or max(5.0, 10 * e2e)
            x = level["throughput_req_s"]
            if (level["error_rate"] or 0) > 0.5:
                break
            if prev and x < o.probe_growth * prev:
                saturated = True
                break
            prev = max(prev, x)
            c *= 2
        if not self.probe:
            return self._finish("time budget ended before the probe")
        x_max = max(lv["throughput_req_s"] for lv in self.probe)
        hopeless = _hopeless(self.probe[0], o.slo)
        if hopeless:
            return self._finish(f"even one request at a time misses the SLO: {hopeless}")
        if x_max <= 0:
            return self._finish("no request succeeded in the probe")
        ceiling = float(f"{x_max:.4g}")
        if not saturated:  # throughput still grew at the last level: find a failing rate first
            r = x_max
            while True:
                step = await self._step(r, "expand")
                if step is None:
                    return self._finish(self._why_stopped(), x_max)
                if step["verdict"] == "fail":
                    break
                r = 2 * step["rate_req_s"]
            ceiling = step["rate_req_s"]
        met = [lv["throughput_req_s"] for lv in self.probe if lv["slo_met"]]
        lo, hi, _ = E.bracket(self.steps)
        top = hi if hi is not None else ceiling
        guess = max(met) if met else top / 2
        r = min(max(guess, lo + 0.25 * (top - lo)), lo + 0.9 * (top - lo))
        turn = 0
        while True:
            step = await self._step(r, "search")
            if step is None:
                return self._finish(self._why_stopped(), x_max)
            ans = E.answer(self.steps)
            lo, hi, _ = E.bracket(self.steps)
            if hi is None and E.highest_passing(self.steps) >= ceiling:  # the ceiling held: look above
                ceiling = float(f"{1.5 * ceiling:.4g}")
            if self._narrow(ans):
                return self._finish("converged", x_max)
            if hi is not None and hi < x_max / 32 and not lo:
                return self._finish("no rate met the SLO", x_max)
            r = E.next_rate(self.steps, ceiling, turn)
            turn += 1

    def _narrow(self, ans: dict[str, Any]) -> bool:
        high, low, mid = ans["high_req_s"], ans["low_req_s"], ans["rate_req_s"]
        if mid is None or high is None or not low:
            return False
        return high - low <= 2 * self.opts.tolerance * mid

    def _why_stopped(self) -> str:
        if self.client_behind is not None:
            n = self.opts.client_retries + 1
            return f"{CLIENT_BEHIND} at {self.client_behind:.4g} req/s ({n} runs failed its self-check)"
        if self.budget.steps >= self.opts.max_steps:
            return "budget (steps)"
        return "budget (time)"

    # --- results ---------------------------------------------------------------------------------

    def _finish(self, stop: str, x_max: float | None = None) -> dict[str, Any]:
        behind = stop.startswith(CLIENT_BEHIND)
        ans = E.answer(self.steps)
        if behind:  # the client was the bottleneck: no rate is an answer
            ans.update(rate_req_s=None, low_req_s=None, high_req_s=None)
        elif stop.startswith(NONE_MET):
            ans.update(rate_req_s=0.0, low_req_s=0.0)
        pts: dict[float, list[float]] = {}
        for s in E.usable(self.steps):
            v = s["latency_ms"][self.opts.knee_metric]["p99"]
            if v is not None:
                pts.setdefault(s["rate_req_s"], []).append(v)
        k = knee([(r, statistics.median(v)) for r, v in pts.items()])
        lo, hi, _ = E.bracket(self.steps)
        at_lo = [s for s in self.steps if lo and s["rate_req_s"] == lo and s["verdict"] == "pass"]
        self.result = {
            "max_slo_rate_req_s": ans["rate_req_s"],
            "interval_req_s": [ans["low_req_s"], ans["high_req_s"]],
            "confidence": 0.95,
            "method": ans["method"],
            "binding_bound": ans["binding"],
            "crossings": ans["crossings"],
            "highest_pass_req_s": lo or None,
            "first_fail_rate_req_s": hi,
            "notes": ans["notes"],
            "stop_reason": stop,
            "client_kept_up": not behind,
            "steps_by_verdict": {
                v: sum(s["verdict"] == v for s in self.steps)
                for v in ("pass", "fail", "undecided", "untrusted")
            },  # fmt: skip
            "goodput_at_pass_req_s": at_lo[-1]["goodput"]["goodput_req_s"] if at_lo else None,
            "attainment_at_pass": at_lo[-1]["goodput"]["attainment"] if at_lo else None,
            "max_throughput_req_s": x_max,
            "knee": None if k is None else {"rate_req_s": k[0], f"{self.opts.knee_metric}_p99_ms": k[1]},
            "elapsed_s": round(self.budget.elapsed(), 1),
            "open_loop_steps": self.budget.steps,
            "warnings": (self.short[-1:] + sorted({w for st in self.steps for w in st["warnings"]}))[:5],
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
            "result": self.result,
            "replicas": self._replicas(),
        }

    def _replicas(self) -> dict[str, Any] | None:
        """Replicas for the trace's peak at the interval's low end (the safe figure) and at the estimate."""
        if self.demand is None:
            return None
        rate = self.result.get("max_slo_rate_req_s")
        low = (self.result.get("interval_req_s") or [None])[0]
        if not rate:
            return {"demand": self.demand, "replicas": None}
        o = self.opts

        def est(r: float) -> dict[str, Any]:
            return replica_estimate(self.demand or {}, r, o.output_tokens, o.input_tokens, o.headroom)

        at_rate = est(rate)
        at_low = est(low) if low else None
        out = dict(at_rate)
        out["replicas_at_estimate"] = at_rate["replicas"]
        out["replicas_at_low"] = None if at_low is None else at_low["replicas"]
        out["per_replica_low_req_s"] = low
        out["replicas"] = out["replicas_at_low"] if at_low is not None else at_rate["replicas"]
        return out

    def write(self) -> dict[str, Any]:
        doc = self.document()
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "capacity.json").write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
        return doc


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
