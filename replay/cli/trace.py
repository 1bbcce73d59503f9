"""`replay trace stats|convert|synth`. The lead's `replay/cli/main.py` mounts these with
`add_trace_subparser(subparsers)`; `python -m replay.cli.trace ...` runs them alone.

Each command is a function of parsed arguments returning an exit code; bad input raises
ReplayError (one line, no traceback) for the caller to print.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from replay.core import extras
from replay.core.errors import ReplayError
from replay.run.config import duration_arg
from replay.schedule import arrivals
from replay.trace.formats import FORMATS, TraceFile, load_trace
from replay.trace.model import TraceRecord, make_header, write_trace
from replay.trace.stats import format_stats, stats_for_file


def _add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=sorted(FORMATS), default=None, help="skip detection")
    p.add_argument("--skip-bad-rows", action="store_true", help="count malformed rows instead of failing")
    p.add_argument(
        "--keep-failures", action="store_true", help="BurstGPT: keep failed (0 response token) rows"
    )
    p.add_argument("--tokenizer", default=None, help="ShareGPT: tokenizer.json or HF model dir for lengths")
    p.add_argument(
        "--default-output-tokens", type=int, default=None, help="output length for traces without one"
    )


def add_trace_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `trace {stats,convert,synth}` to a `parser.add_subparsers()` object. Each leaf sets
    `func` (args -> exit code)."""
    trace = subparsers.add_parser("trace", help="inspect, convert and synthesise traces")
    sub = trace.add_subparsers(dest="trace_command", required=True)

    st = sub.add_parser("stats", help="request count, rates over time, peak windows, length percentiles")
    st.add_argument("file", type=Path)
    _add_load_args(st)
    st.add_argument("--json", action="store_true", help="print JSON instead of the table")
    st.set_defaults(func=cmd_stats)

    cv = sub.add_parser("convert", help="convert any supported trace to replay's JSONL")
    cv.add_argument("input", type=Path)
    cv.add_argument("output", type=Path)
    _add_load_args(cv)
    cv.add_argument("--sort", action="store_true", help="sort by arrival (holds the trace in memory)")
    cv.set_defaults(func=cmd_convert)

    sy = sub.add_parser("synth", help="synthetic trace from arrival and length distributions")
    sy.add_argument("output", type=Path)
    sy.add_argument("--rate", type=float, required=True, help="mean requests/s")
    sy.add_argument("--duration", type=duration_arg, default=None, help="trace length: 60, 90s, 15m")
    sy.add_argument("--requests", type=int, default=None, help="number of requests")
    sy.add_argument("--arrival", choices=arrivals.KINDS, default="poisson")
    sy.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: <1 burstier, 1 = Poisson")
    sy.add_argument("--input-dist", required=True, help="lognormal:MEAN,SIGMA | const:N | empirical:FILE")
    sy.add_argument("--output-dist", required=True, help="as --input-dist")
    sy.add_argument("--prefix-groups", type=int, default=0, help="G shared system prompts (hash ids)")
    sy.add_argument("--prefix-tokens", type=int, default=0, help="length of each shared prompt")
    sy.add_argument("--block-size", type=int, default=16, help="tokens per hash-id block")
    sy.add_argument("--seed", type=int, default=0)
    sy.set_defaults(func=cmd_synth)
    return trace


# --- loading --------------------------------------------------------------------------------


def token_counter(spec: str) -> Callable[[str], int]:
    """A text -> token count function from a tokenizer.json file or a local HF model directory."""
    path = Path(spec)
    extras.require("local", f"tokenizer {spec}", *(("tokenizers",) if path.is_file() else extras.LOCAL[1:]))
    try:
        if path.is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(path))
            return lambda text: len(tok.encode(text, add_special_tokens=False).ids)
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        return lambda text: len(hf.encode(text, add_special_tokens=False))
    except Exception as exc:  # library errors become one line at this boundary
        raise ReplayError(f"tokenizer {spec}: cannot load: {type(exc).__name__}: {exc}") from None


def open_trace(args: argparse.Namespace, path: Path, **extra: Any) -> TraceFile:
    return load_trace(
        path,
        args.format,
        skip_bad_rows=args.skip_bad_rows,
        keep_failures=args.keep_failures,
        count_tokens=token_counter(args.tokenizer) if args.tokenizer else None,
        default_output_tokens=args.default_output_tokens,
        **extra,
    )


# --- commands -------------------------------------------------------------------------------


def cmd_stats(args: argparse.Namespace) -> int:
    res = stats_for_file(open_trace(args, args.file))
    if args.json:
        sys.stdout.write(orjson.dumps(res, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(format_stats(res))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    if args.output.resolve() == args.input.resolve():
        raise ReplayError(f"{args.output}: refusing to overwrite the input trace")
    tf = open_trace(args, args.input, allow_unsorted=args.sort)
    records: Iterator[TraceRecord] | list[TraceRecord] = iter(tf)
    if args.sort:
        records = sorted(tf, key=lambda r: r.arrival_s)  # stable: ties keep file order
        t0 = records[0].arrival_s if records else 0.0
        for r in records:
            r.arrival_s -= t0
    header = make_header(
        args.input.name,
        source_format=tf.format,
        timed=tf.timed,
        lengths_estimated=tf.lengths_estimated,
        converted_by="replay trace convert",
    )
    n = write_trace(args.output, records, header)
    st = tf.stats
    notes = [f"{st.bad_rows} bad rows skipped"] if st.bad_rows else []
    notes += [f"{k} dropped: {why}" for why, k in st.dropped.items()]
    print(f"wrote {n} records to {args.output}" + (f" ({'; '.join(notes)})" if notes else ""))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    if args.duration is None and args.requests is None:
        raise ReplayError("synth: give --duration or --requests")
    spec = arrivals.ArrivalSpec(kind=args.arrival, rate=args.rate, burstiness=args.burstiness)
    problems = spec.problems()
    if problems:
        raise ReplayError(problems[0])
    if args.prefix_groups < 0 or args.prefix_tokens < 0 or args.block_size <= 0:
        raise ReplayError("synth: --prefix-groups/--prefix-tokens must be >= 0 and --block-size > 0")
    in_len = length_sampler(args.input_dist, "input", np.random.default_rng([args.seed, 1]))
    out_len = length_sampler(args.output_dist, "output", np.random.default_rng([args.seed, 2]))
    group_rng = np.random.default_rng([args.seed, 3])
    blocks = math.ceil(args.prefix_tokens / args.block_size) if args.prefix_groups else 0

    def records() -> Iterator[TraceRecord]:
        for i, t in enumerate(arrivals.offsets(spec, args.seed, first_at_zero=True)):
            if args.requests is not None and i >= args.requests:
                return
            if args.duration is not None and t >= args.duration:
                return
            hashes: tuple[int, ...] = ()
            if blocks:
                g = int(group_rng.integers(args.prefix_groups))
                hashes = tuple(range(g * blocks, (g + 1) * blocks))
            yield TraceRecord(
                t,
                in_len(),
                out_len(),
                hash_ids=hashes,
                block_size=args.block_size if hashes else 0,
                source_line=i + 2,
            )

    params = {
        name: getattr(args, name)
        for name in ("rate", "duration", "requests", "arrival", "burstiness", "input_dist", "output_dist")
    }
    params.update(prefix_groups=args.prefix_groups, prefix_tokens=args.prefix_tokens, seed=args.seed)
    n = write_trace(args.output, records(), make_header("synth", synth=params))
    print(f"wrote {n} synthetic records to {args.output}")
    return 0


def length_sampler(spec: str, which: str, rng: np.random.Generator) -> Callable[[], int]:
    """`lognormal:MEAN,SIGMA` (MEAN is the distribution's mean in tokens, SIGMA the log-space
    standard deviation: mu = ln MEAN - SIGMA^2 / 2), `const:N`, or `empirical:FILE` (resample a
    trace's input or output lengths, or a file of one integer per line). Values are >= 1."""
    kind, _, arg = spec.partition(":")
    try:
        if kind == "const":
            n = int(arg)
            if n < 1:
                raise ValueError
            return lambda: n
        if kind == "lognormal":
            mean_s, sigma_s = arg.split(",")
            mean, sigma = float(mean_s), float(sigma_s)
            if not (mean > 0 and sigma >= 0 and math.isfinite(mean + sigma)):
                raise ValueError
            mu = math.log(mean) - sigma * sigma / 2
            return lambda: max(1, round(float(rng.lognormal(mu, sigma))))
    except ValueError:
        raise ReplayError(f"--{which}-dist: bad {kind} parameters {arg!r}") from None
    if kind == "empirical":
        values = _empirical_values(Path(arg), which)
        return lambda: int(values[rng.integers(len(values))])
    raise ReplayError(
        f"--{which}-dist: expected lognormal:MEAN,SIGMA, const:N or empirical:FILE, got {spec!r}"
    )


def _empirical_values(path: Path, which: str) -> np.ndarray:
    if not path.is_file():
        raise ReplayError(f"--{which}-dist: {path}: no such file")
    try:
        tf = load_trace(path, notice=lambda _: None)
        vals = [max(1, r.input_tokens if which == "input" else r.output_tokens) for r in tf]
    except ReplayError:  # not a trace: one integer per line
        vals = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    v = int(line)
                except ValueError:
                    raise ReplayError(f"{path}:{i}: field 'length': not an integer: {line!r}") from None
                vals.append(max(1, v))
    if not vals:
        raise ReplayError(f"--{which}-dist: {path}: no lengths in it")
    return np.asarray(vals, dtype=np.int64)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="replay")
    add_trace_subparser(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(argv)
    try:
        return int(ns.func(ns))
    except ReplayError as exc:
        print(f"replay: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
