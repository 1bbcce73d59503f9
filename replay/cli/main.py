"""Command line: parse arguments into config, hand over, print one line on bad input. No logic here."""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from replay.cli.capacity import add_capacity_subparsers
from replay.cli.capture import add_record_subparser
from replay.cli.prompt_args import add_prompt_args, with_prompt_format
from replay.cli.trace import add_trace_subparser
from replay.cli.vocab_args import add_vocab_args
from replay.core.errors import ReplayError
from replay.run.config import RunConfig, duration_arg
from replay.schedule import arrivals
from replay.schedule.classes import load_classes
from replay.schedule.from_trace import parse_window
from replay.stats.summary import console_table


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target", required=True, help="named target (targets/NAME.toml) or an OpenAI-compatible URL"
    )
    p.add_argument("--rate", type=float, help="mean offered rate, requests/s")
    p.add_argument(
        "--duration", type=duration_arg, default=None, help="run length: 60, 90s, 15m, 4h (default 60s)"
    )
    p.add_argument("--requests", type=int, default=None, help="stop after this many requests")
    p.add_argument("--arrival", default="poisson", choices=arrivals.KINDS)
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: <1 burstier, 1 = Poisson")
    p.add_argument("--ramp-to", type=float, default=None, help="ramp linearly from --rate to this rate")
    p.add_argument("--input-tokens", type=int, default=64)
    p.add_argument("--output-tokens", type=int, default=64)
    p.add_argument("--concurrency-cap", type=int, default=None, help="at most C in flight; waits are counted")
    p.add_argument("--concurrency", type=int, default=None, help="closed loop: N back-to-back streams")
    p.add_argument(
        "--max-in-flight", type=int, default=None,
        help="outstanding requests beyond which new ones are counted not_sent (default: what sockets allow)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="run directory (default runs/<stamp>-<target>/)")
    p.add_argument("--strict", action="store_true", help="exit 1 when the generator fell behind")
    p.add_argument(
        "--drain-timeout", type=duration_arg, default=60.0, help="grace for in-flight requests at the end"
    )
    p.add_argument("--interval", type=duration_arg, default=10.0, help="interval log period (default 10s)")
    p.add_argument("--endpoint", default="completions", choices=("completions", "chat"))
    p.add_argument("--model", default=None, help="model name on the server (default: the first it lists)")
    p.add_argument("--model-dir", default=None, help="model a started vLLM or the in-process target loads")
    p.add_argument("--quiet", action="store_true")
    p.add_argument(
        "--abandon", default=None, metavar="SHARE:DIST",
        help="users who leave: SHARE of requests cancelled DIST seconds after their intended send "
        "(exp:MEAN, uniform:LO-HI or SECONDS), e.g. 0.2:exp:1.5; counted abandoned, not as errors",
    )  # fmt: skip
    p.add_argument(
        "--probe-rate", type=float, default=None, metavar="R",
        help="a probe stream beside the load: R requests/s (Poisson) of 32 in / 16 out, reported apart",
    )  # fmt: skip
    p.add_argument(
        "--classes", type=Path, default=None, metavar="FILE",
        help="tenants/adapters: a TOML/JSON mix of classes (name, share, model, input_tokens, "
        "output_tokens, slo); every figure and SLO also per class",
    )  # fmt: skip
    add_vocab_args(p)
    add_prompt_args(p)
    c = p.add_argument_group("conversations (--rate is then new sessions/s; --input-tokens the first turn's)")
    c.add_argument(
        "--turns", type=int, default=None,
        help="K turns a session; turn k+1 re-sends turn k's prompt + output + new user tokens "
        "(token ids: a prefix the server can cache)",
    )  # fmt: skip
    c.add_argument("--sessions", type=int, default=None, help="stop after N sessions have started")
    c.add_argument(
        "--think-time", default="exp:2", metavar="DIST",
        help="seconds from a turn's end to the next turn's send: exp:MEAN, uniform:LO-HI, SECONDS",
    )  # fmt: skip
    c.add_argument("--follow-up-tokens", type=int, default=32, help="new user tokens each later turn adds")
    t = p.add_argument_group("recorded trace (arrival times and lengths come from the trace)")
    t.add_argument(
        "--trace", type=Path, default=None, help="trace file: Azure, BurstGPT, Mooncake, ..., ours"
    )
    t.add_argument("--format", dest="trace_format", default=None, help="trace format (default: detected)")
    t.add_argument("--speedup", type=float, default=1.0, help="X > 1 compresses the trace's time by X")
    t.add_argument("--window", default=None, help="START:END seconds of the trace to replay")
    t.add_argument("--loop", action="store_true", help="repeat the trace back to back (soak)")
    t.add_argument("--jitter", type=duration_arg, default=0.0, help="spread arrivals within a time bucket")
    t.add_argument("--skip-bad-rows", action="store_true", help="count malformed rows instead of failing")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="client processes (default: enough for the load, up to the cores)",
    )
    p.add_argument(
        "--ray", default=None, metavar="auto|ADDRESS", help="run the workers as Ray actors on a cluster"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="replay", description="Open-loop traffic replay for LLM servers")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="replay a synthetic or recorded schedule against a target")
    _add_run_args(run)
    run.set_defaults(func=cmd_run)
    add_trace_subparser(sub)
    add_capacity_subparsers(sub)
    add_record_subparser(sub)
    return parser


def _config(ns: argparse.Namespace) -> RunConfig:
    duration = ns.duration
    if duration is None and ns.requests is None and ns.trace is None and ns.sessions is None:
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
        max_in_flight=ns.max_in_flight,
        seed=ns.seed,
        out=ns.out,
        strict=ns.strict,
        drain_timeout_s=ns.drain_timeout,
        interval_s=ns.interval,
        endpoint=ns.endpoint,
        model=ns.model,
        quiet=ns.quiet,
        trace=ns.trace,
        trace_format=ns.trace_format,
        speedup=ns.speedup,
        window=parse_window(ns.window) if ns.window else None,
        loop=ns.loop,
        jitter_s=ns.jitter,
        skip_bad_rows=ns.skip_bad_rows,
        vocab_size=ns.vocab_size,
        tokenizer=ns.tokenizer,
        abandon=ns.abandon,
        probe_rate=ns.probe_rate,
        prompt_format=ns.prompt_format,
        turns=ns.turns,
        think_time=ns.think_time,
        follow_up_tokens=ns.follow_up_tokens,
        sessions=ns.sessions,
        classes=ns.classes,
        class_mix=load_classes(ns.classes) if ns.classes else (),
    )


def default_run_dir(target: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", target.split("://")[-1]).strip("_") or "run"
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"


def cmd_run(ns: argparse.Namespace) -> int:
    from replay.run.plan import TraceSchedule
    from replay.run.runner import execute, run_in_uvloop
    from replay.scaleout.shard import SyntheticSchedule
    from replay.schedule.sessions import chain_hooks
    from replay.schedule.vocab import resolve as resolve_vocab
    from replay.targets.registry import load_target

    cfg = _config(ns)
    problems = cfg.problems()
    if problems:
        raise ReplayError(
            problems[0] + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else "")
        )
    run_dir = cfg.out or default_run_dir(cfg.target)
    overrides = {"endpoint": cfg.endpoint, "model": cfg.model, "model_dir": ns.model_dir,
                 "also_models": sorted({c.model for c in cfg.class_mix if c.model}) or None}  # fmt: skip
    target = load_target(cfg.target, run_dir, overrides)
    vocab, _ = resolve_vocab(cfg.vocab_size, cfg.tokenizer, getattr(target, "vocab_size", None))
    recipe: Any
    if cfg.trace is not None:
        recipe = TraceSchedule.from_config(cfg, vocab)
        offered = recipe.offered_rate()
    elif cfg.turns is not None:
        from replay.run.plan import session_schedule

        recipe, offered = session_schedule(cfg, vocab)
    else:
        recipe = SyntheticSchedule.from_config(cfg, vocab)
        offered = arrivals.mean_rate(cfg.arrival_spec(), cfg.duration_s) if cfg.duration_s else cfg.rate
    if cfg.concurrency:
        offered = None  # closed loop: the server sets the pace
    if cfg.class_mix:
        from replay.schedule.classes import WithClasses
        from replay.schedule.vocab import id_range

        recipe = WithClasses(recipe, cfg.class_mix, cfg.seed, *id_range(vocab))
    if cfg.abandon:
        from replay.schedule.behaviour import Abandoning, AbandonSpec

        recipe = Abandoning(recipe, AbandonSpec.parse(cfg.abandon), cfg.seed)
    if cfg.probe_rate:
        from replay.schedule.probe import WithProbe
        from replay.schedule.vocab import id_range

        recipe = WithProbe(recipe, cfg.probe_rate, cfg.seed, *id_range(vocab))
    recipe = with_prompt_format(recipe, cfg.prompt_format, cfg.tokenizer, target)
    from replay.run import live
    from replay.run.colour import show_table
    from replay.scaleout.launch import scaled_run

    with live.session(cfg.quiet):  # live progress on stderr while the run runs
        result = scaled_run(cfg, target, recipe, run_dir, offered, ns.workers, ns.ray)  # None: one process
        if result is None:
            hooks = chain_hooks(recipe)  # sessions: later turns made as earlier ones end
            result = run_in_uvloop(execute(cfg, target, recipe(), run_dir, offered, hooks=hooks))
    show_table(console_table(result.summary))
    print(f"run directory: {result.run_dir}")
    for hint in result.summary.get("hints", []):
        print(f"replay: hint: {hint}", file=sys.stderr)
    if result.exit_code == 3:
        print("replay: no request succeeded (see error kinds above)", file=sys.stderr)
    return result.exit_code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        return int(ns.func(ns))
    except ReplayError as exc:
        print(f"replay: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("replay: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
