"""Command line: parse arguments into config, hand over, print one line on bad input. No logic here."""

from __future__ import annotations

import argparse
import itertools
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from replay import arrivals, schedule
from replay.config import RunConfig, parse_duration
from replay.errors import ReplayError
from replay.prompts import DEFAULT_HIGH_ID, DEFAULT_LOW_ID, PromptBuilder
from replay.report import console_table


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target", required=True, help="named target (targets/NAME.toml) or an OpenAI-compatible URL"
    )
    p.add_argument("--rate", type=float, help="mean offered rate, requests/s")
    p.add_argument(
        "--duration", type=_duration, default=None, help="run length: 60, 90s, 15m, 4h (default 60s)"
    )
    p.add_argument("--requests", type=int, default=None, help="stop after this many requests")
    p.add_argument("--arrival", default="poisson", choices=arrivals.KINDS)
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: <1 burstier, 1 = Poisson")
    p.add_argument("--ramp-to", type=float, default=None, help="ramp linearly from --rate to this rate")
    p.add_argument("--input-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--concurrency-cap", type=int, default=None, help="at most C in flight; waits are counted")
    p.add_argument("--concurrency", type=int, default=None, help="closed loop: N back-to-back streams")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/<stamp>-<target>/)")
    p.add_argument("--strict", action="store_true", help="exit 1 when the generator fell behind")
    p.add_argument(
        "--drain-timeout", type=_duration, default=60.0, help="grace for in-flight requests at the end"
    )
    p.add_argument("--interval", type=_duration, default=10.0, help="interval log period (default 10s)")
    p.add_argument("--endpoint", default="completions", choices=("completions", "chat"))
    p.add_argument("--model", default=None, help="model name on the server (default: the first it lists)")
    p.add_argument("--quiet", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="replay", description="Open-loop traffic replay for LLM servers")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="replay a synthetic or recorded schedule against a target")
    _add_run_args(run)
    return parser


def _config(ns: argparse.Namespace) -> RunConfig:
    duration = ns.duration
    if duration is None and ns.requests is None:
        duration = 60.0
    return RunConfig(
        target=ns.target,
        rate=ns.rate,
        duration_s=duration,
        requests=ns.requests,
        arrival=ns.arrival,
        burstiness=ns.burstiness,
        ramp_to=ns.ramp_to,
        input_tokens=ns.input_tokens,
        output_tokens=ns.output_tokens,
        concurrency_cap=ns.concurrency_cap,
        concurrency=ns.concurrency,
        seed=ns.seed,
        out=ns.out,
        strict=ns.strict,
        drain_timeout_s=ns.drain_timeout,
        interval_s=ns.interval,
        endpoint=ns.endpoint,
        model=ns.model,
        quiet=ns.quiet,
    )


def default_run_dir(target: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", target.split("://")[-1]).strip("_") or "run"
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"


def cmd_run(ns: argparse.Namespace) -> int:
    from replay.run import execute, run_in_uvloop
    from replay.targets.registry import load_target

    cfg = _config(ns)
    problems = cfg.problems()
    if problems:
        raise ReplayError(
            problems[0] + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else "")
        )
    run_dir = cfg.out or default_run_dir(cfg.target)
    target = load_target(cfg.target, run_dir, {"endpoint": cfg.endpoint, "model": cfg.model})
    vocab = getattr(target, "vocab_size", None)
    prompts = PromptBuilder(
        cfg.seed, DEFAULT_LOW_ID, min(vocab, DEFAULT_HIGH_ID) if vocab else DEFAULT_HIGH_ID
    )
    sched = schedule.synthetic(
        itertools.repeat(0.0) if cfg.concurrency else arrivals.offsets(cfg.arrival_spec(), cfg.seed),
        input_tokens=cfg.input_tokens,
        output_tokens=cfg.output_tokens,
        prompts=prompts,
        duration_s=cfg.duration_s,
        max_requests=cfg.requests,
    )
    offered = arrivals.mean_rate(cfg.arrival_spec(), cfg.duration_s) if cfg.duration_s else cfg.rate
    if cfg.concurrency:
        offered = None  # closed loop: the server sets the pace
    result = run_in_uvloop(execute(cfg, target, sched, run_dir, offered))
    print(console_table(result.summary))
    print(f"run directory: {result.run_dir}")
    if result.exit_code == 3:
        print("replay: no request succeeded (see error kinds above)", file=sys.stderr)
    return result.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        if ns.command == "run":
            return cmd_run(ns)
    except ReplayError as exc:
        print(f"replay: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("replay: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {ns.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
