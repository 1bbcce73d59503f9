"""Subcommands `capacity`, `report` and `compare`: arguments in, one-line errors out, no logic here."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

from replay.cli.vocab_args import add_vocab_args, vocab_problem
from replay.core.errors import ReplayError
from replay.run.config import duration_arg

EXIT_NO_RATE = 1  # no rate met the SLO (or none was judged)
EXIT_CLIENT_BEHIND = 4  # the client could not keep up: the search has no answer


def _fraction(text: str) -> float:
    s = text.strip()
    try:
        return float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction or a percentage, got {text!r}") from None


def add_capacity_subparsers(subparsers: Any) -> None:
    """Add `capacity`, `report` and `compare` to a `parser.add_subparsers()` object (each sets `func`)."""
    p = subparsers.add_parser("capacity", help="find the highest request rate that meets an SLO")
    p.add_argument("--target", required=True, help="named target (targets/NAME.toml) or an OpenAI URL")
    p.add_argument("--slo", required=True, help="e.g. 'ttft_p99<=500ms,itl_p99<=50ms,error_rate<=1%%'")
    p.add_argument("--input-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--arrival", default="poisson", choices=("poisson", "gamma", "constant"))
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape (<1 burstier)")
    p.add_argument(
        "--step", type=duration_arg, default=60.0,
        help="the longest an open-loop step runs, warm-up included (it stops as soon as it is decided)",
    )  # fmt: skip
    p.add_argument("--warmup", type=duration_arg, default=10.0, help="left out of each step's verdict")
    p.add_argument("--probe-duration", type=duration_arg, default=10.0, help="one closed-loop probe level")
    p.add_argument("--probe-max-concurrency", type=int, default=256)
    p.add_argument(
        "--tolerance", type=_fraction, default=0.05,
        help="stop once the answer's 95%% interval is within +- this fraction of it",
    )  # fmt: skip
    p.add_argument("--max-steps", type=int, default=30, help="open-loop steps, re-runs included")
    p.add_argument(
        "--budget", type=duration_arg, default=720.0,
        help="wall-clock limit for the search (a started server's start-up not included)",
    )  # fmt: skip
    p.add_argument(
        "--client-retries", type=int, default=2,
        help="re-runs of a step whose client fell behind before the search ends without a rate",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trace", default=None, help="trace whose peak the replica estimate sizes for")
    p.add_argument("--peak-window", type=duration_arg, default=60.0, help="window for the trace's peak rate")
    p.add_argument("--peak-quantile", type=float, default=99.0, help="percentile of windows taken as peak")
    p.add_argument("--headroom", type=_fraction, default=0.2, help="spare capacity over the peak (20%%)")
    p.add_argument("--endpoint", default="completions", choices=("completions", "chat"))
    p.add_argument("--model", default=None)
    p.add_argument(
        "--classes", type=Path, default=None, metavar="FILE",
        help="a tenant/adapter mix (as in replay run); a step passes only if every class meets its SLO",
    )  # fmt: skip
    add_vocab_args(p)
    p.add_argument(
        "--out", type=Path, default=None, help="output directory (default runs/<stamp>-capacity-…)"
    )
    p.add_argument("--quiet", action="store_true", help="no per-step progress lines")
    p.set_defaults(func=cmd_capacity)

    r = subparsers.add_parser("report", help="re-render report.html and report.md from a run directory")
    r.add_argument("run_dir", type=Path)
    r.set_defaults(func=cmd_report)

    c = subparsers.add_parser("compare", help="two runs side by side; exit 1 on regression")
    c.add_argument("a", type=Path, help="baseline run directory")
    c.add_argument("b", type=Path, help="candidate run directory")
    c.add_argument("--threshold", default=None, help="e.g. ttft_p99=10%%,itl_p99=5ms,req_s=10%%")
    c.set_defaults(func=cmd_compare)


def _options(ns: argparse.Namespace) -> Any:
    from replay.capacity.options import CapacityOptions
    from replay.capacity.slo import parse_slo
    from replay.schedule.classes import load_classes
    from replay.schedule.vocab import tokenizer_vocab_size
    from replay.stats.classes import class_problems

    slo = parse_slo(ns.slo)
    problems = []
    if ns.warmup >= ns.step:
        problems.append(f"--warmup ({ns.warmup:g}s) must be shorter than --step ({ns.step:g}s)")
    for name, v in (("input-tokens", ns.input_tokens), ("output-tokens", ns.output_tokens)):
        if v < 1:
            problems.append(f"--{name}: must be >= 1, got {v}")
    for name, v in (("max-steps", ns.max_steps), ("probe-max-concurrency", ns.probe_max_concurrency)):
        if v < 1:
            problems.append(f"--{name}: must be >= 1, got {v}")
    if ns.client_retries < 0:
        problems.append(f"--client-retries: must be >= 0, got {ns.client_retries}")
    if not 0 < ns.tolerance < 1:
        problems.append(f"--tolerance: must lie between 0 and 100%, got {ns.tolerance}")
    if ns.headroom < 0:
        problems.append(f"--headroom: must be >= 0, got {ns.headroom}")
    if not 0 < ns.peak_quantile <= 100:
        problems.append(f"--peak-quantile: must be in (0, 100], got {ns.peak_quantile}")
    bad_vocab = vocab_problem(ns.vocab_size)
    if bad_vocab:
        problems.append(bad_vocab)
    classes = load_classes(ns.classes) if ns.classes else ()
    problems.extend(class_problems(classes, str(ns.classes)))
    if problems:
        raise ReplayError(problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return CapacityOptions(
        slo=slo,
        target_name=ns.target,
        input_tokens=ns.input_tokens,
        output_tokens=ns.output_tokens,
        arrival=ns.arrival,
        burstiness=ns.burstiness,
        step_s=ns.step,
        warmup_s=ns.warmup,
        probe_s=ns.probe_duration,
        probe_max_concurrency=ns.probe_max_concurrency,
        tolerance=ns.tolerance,
        max_steps=ns.max_steps,
        max_time_s=ns.budget,
        client_retries=ns.client_retries,
        seed=ns.seed,
        headroom=ns.headroom,
        endpoint=ns.endpoint,
        model=ns.model,
        vocab_size=tokenizer_vocab_size(ns.tokenizer) if ns.tokenizer else ns.vocab_size,
        classes=classes,
    )


def cmd_capacity(ns: argparse.Namespace) -> int:
    from replay.capacity.search import CapacitySearch
    from replay.capacity.stats import trace_demand
    from replay.report.html import render
    from replay.run.runner import run_in_uvloop
    from replay.targets.registry import load_target

    opts = _options(ns)  # bad input fails before anything starts
    demand = trace_demand(ns.trace, ns.peak_window, ns.peak_quantile) if ns.trace else None
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", ns.target.split("://")[-1]).strip("_") or "target"
    out = ns.out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-capacity-{name}"
    models = sorted({c.model for c in opts.classes if c.model}) or None  # --classes: checked at start
    target = load_target(ns.target, out, {"endpoint": ns.endpoint, "model": ns.model, "also_models": models})
    from replay.run import live

    with live.session(ns.quiet) as display:  # each run's live progress; step verdicts above it
        log = display.line if display else None
        doc = run_in_uvloop(CapacitySearch(target, opts, out, log=log, demand=demand).run())
    paths = render(out)
    r = doc["result"]
    print(f"max rate meeting {opts.slo.text}: {describe_answer(r)}")
    rep = doc.get("replicas")
    if rep and rep.get("replicas") is not None:
        print(
            f"replicas for the trace's peak: {rep['replicas']} at the interval's low end"
            f" ({rep.get('replicas_at_estimate')} at the estimate)"
        )
    print(f"reports: {out / 'capacity.json'}, {paths[0]}, {paths[1]}")
    if not r.get("client_kept_up", True):
        return EXIT_CLIENT_BEHIND
    return 0 if r.get("max_slo_rate_req_s") else EXIT_NO_RATE


def describe_answer(r: dict[str, Any]) -> str:
    """'18.2 req/s (95% CI 16.9-19.4 req/s; converged)', or why there is no rate."""
    rate = r.get("max_slo_rate_req_s")
    if rate is None:
        return f"no answer ({r.get('stop_reason', '-')})"
    lo, hi = r.get("interval_req_s") or (None, None)
    span = f"{lo:.4g}-{hi:.4g}" if hi is not None else f"at least {lo:.4g}"
    return f"{rate:.4g} req/s (95% CI {span} req/s; {r.get('stop_reason', '-')})"


def cmd_report(ns: argparse.Namespace) -> int:
    from replay.report.html import render

    if not ns.run_dir.is_dir():
        raise ReplayError(f"{ns.run_dir}: not a directory")
    for p in render(ns.run_dir):
        print(p)
    return 0


def cmd_compare(ns: argparse.Namespace) -> int:
    from replay.report.compare import compare, format_rows

    rows = compare(ns.a, ns.b, ns.threshold)
    print(format_rows(rows, ns.a, ns.b))
    return 1 if any(r.regressed for r in rows) else 0
