"""Run configuration: frozen, validated up front so bad input fails before any load is sent."""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from replay.core.errors import ReplayError
from replay.schedule.arrivals import ArrivalSpec
from replay.schedule.behaviour import AbandonSpec, Dist
from replay.schedule.classes import TrafficClass
from replay.stats.classes import class_problems


@dataclass(frozen=True)
class RunConfig:
    target: str
    rate: float | None = None
    duration_s: float | None = 60.0
    requests: int | None = None
    arrival: str = "poisson"
    burstiness: float = 1.0
    ramp_to: float | None = None
    input_tokens: int = 64
    output_tokens: int = 64
    concurrency_cap: int | None = None
    concurrency: int | None = None  # closed loop: N streams back to back (no --rate)
    max_in_flight: int | None = None  # None: as many as open sockets allow (see run.client_limits)
    seed: int = 0
    out: Path | None = None
    strict: bool = False
    drain_timeout_s: float = 60.0
    interval_s: float = 10.0
    endpoint: str = "completions"
    model: str | None = None
    quiet: bool = False
    target_overrides: dict[str, Any] = field(default_factory=dict)
    # Recorded trace replay (rate, if given, rescales the trace to that mean rate).
    trace: Path | None = None
    trace_format: str | None = None
    speedup: float = 1.0
    window: tuple[float, float] | None = None
    loop: bool = False
    jitter_s: float = 0.0
    skip_bad_rows: bool = False
    # Prompt token ids stay below this vocabulary size (replay.schedule.vocab); at most one is set.
    vocab_size: int | None = None
    tokenizer: Path | None = None
    abandon: str | None = None  # SHARE:DIST (replay.schedule.behaviour.AbandonSpec)
    probe_rate: float | None = None  # requests/s of the probe stream beside the load (replay.schedule.probe)
    prompt_format: str = "ids"  # ids | text (replay.schedule.text_prompts): how prompts are sent
    # Conversations (replay.schedule.sessions): --rate is then new sessions/s, each of `turns` turns,
    # turn k+1 sent a think time (behaviour.Dist text) after turn k ended, its prompt the previous
    # prompt + output + `follow_up_tokens` new tokens; `sessions` bounds how many start.
    turns: int | None = None
    think_time: str = "exp:2"
    follow_up_tokens: int = 32
    sessions: int | None = None
    # Tenants and adapters (replay.schedule.classes): the --classes file and its parsed classes, kept
    # here so summary.json's config says what the mix was and the summary can judge each class's SLO.
    classes: Path | None = None
    class_mix: tuple[TrafficClass, ...] = ()

    def arrival_spec(self) -> ArrivalSpec:
        return ArrivalSpec(
            kind=self.arrival,
            rate=self.rate or 0.0,
            burstiness=self.burstiness,
            ramp_to=self.ramp_to,
            ramp_s=self.duration_s or 0.0,
        )

    def problems(self) -> list[str]:
        """Every problem at once, each a one-line message naming the option."""
        out: list[str] = []
        if self.concurrency is not None:
            if self.concurrency < 1:
                out.append(f"--concurrency: must be >= 1, got {self.concurrency}")
            if self.rate is not None or self.concurrency_cap is not None:
                out.append("--concurrency: closed loop sets its own pace; drop --rate/--concurrency-cap")
        elif self.trace is not None:
            if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
                out.append(f"--rate: must be a positive number of requests/s, got {self.rate}")
            if not (self.speedup > 0 and math.isfinite(self.speedup)):
                out.append(f"--speedup: must be a positive factor (>1 compresses time), got {self.speedup}")
            if self.rate is not None and self.speedup != 1.0:
                out.append("--speedup/--rate: give one of them (--rate rescales the trace to a mean rate)")
        elif self.rate is None:
            out.append("--rate: required (requests per second, e.g. --rate 50), or --concurrency N")
        else:
            out.extend(f"--{p}" for p in self.arrival_spec().problems())
        bounded_by_trace = self.trace is not None and not self.loop
        bounded = bounded_by_trace or self.requests is not None or self.sessions is not None
        if self.duration_s is None and not bounded:
            out.append("--duration/--requests: give at least one bound for the run")
        out.extend(self._session_problems())
        if self.duration_s is not None and not (self.duration_s > 0 and math.isfinite(self.duration_s)):
            out.append(f"--duration: must be a positive number of seconds, got {self.duration_s}")
        if self.requests is not None and self.requests <= 0:
            out.append(f"--requests: must be a positive count, got {self.requests}")
        if self.ramp_to is not None and self.duration_s is None:
            out.append("--ramp-to: a ramp needs --duration (it spans the whole run)")
        if self.input_tokens < 1:
            out.append(f"--input-tokens: must be >= 1, got {self.input_tokens}")
        if self.output_tokens < 1:
            out.append(f"--output-tokens: must be >= 1, got {self.output_tokens}")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            out.append(f"--max-in-flight: must be >= 1, got {self.max_in_flight}")
        if self.concurrency_cap is not None and self.concurrency_cap < 1:
            out.append(f"--concurrency-cap: must be >= 1, got {self.concurrency_cap}")
        if self.drain_timeout_s < 0:
            out.append(f"--drain-timeout: must be >= 0, got {self.drain_timeout_s}")
        if not self.interval_s > 0:
            out.append(f"--interval: must be > 0 seconds, got {self.interval_s}")
        if self.endpoint not in ("completions", "chat"):
            out.append(f"--endpoint: expected completions or chat, got {self.endpoint!r}")
        if self.vocab_size is not None and self.vocab_size < 2:
            out.append(f"--vocab-size: must be >= 2, got {self.vocab_size}")
        if self.vocab_size is not None and self.tokenizer is not None:
            out.append("--vocab-size/--tokenizer: give one of them")
        if self.probe_rate is not None:
            if not (self.probe_rate > 0 and math.isfinite(self.probe_rate)):
                out.append(f"--probe-rate: must be a positive number of requests/s, got {self.probe_rate}")
            if self.concurrency is not None:
                out.append("--probe-rate: needs an open-loop run (a timeline beside), not --concurrency")
        if self.abandon is not None:
            try:
                AbandonSpec.parse(self.abandon)
            except ReplayError as exc:
                out.append(str(exc))
        if self.class_mix:
            out.extend(class_problems(self.class_mix, str(self.classes or "--classes")))
        return out

    def _session_problems(self) -> list[str]:
        from replay.schedule.sessions import TURN_STRIDE

        if self.turns is None:
            return ["--sessions: needs --turns K (a session's turns)"] if self.sessions is not None else []
        out = []
        if not 1 <= self.turns <= TURN_STRIDE:
            out.append(f"--turns: must be 1..{TURN_STRIDE}, got {self.turns}")
        if self.sessions is not None and self.sessions < 1:
            out.append(f"--sessions: must be a positive count, got {self.sessions}")
        if self.follow_up_tokens < 1:
            out.append(f"--follow-up-tokens: must be >= 1, got {self.follow_up_tokens}")
        if self.concurrency is not None or self.trace is not None:
            out.append("--turns: synthetic sessions run open loop on their own arrivals; drop "
                       + ("--concurrency" if self.concurrency is not None else "--trace"))  # fmt: skip
        if self.requests is not None:
            out.append("--requests: with --turns, bound the run by --sessions N (each has --turns turns)")
        try:
            Dist.parse(self.think_time, "--think-time")
        except ReplayError as exc:
            out.append(str(exc))
        return out

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out) if self.out else None
        d["trace"] = str(self.trace) if self.trace else None
        d["tokenizer"] = str(self.tokenizer) if self.tokenizer else None
        d["classes"] = str(self.classes) if self.classes else None
        return d


def duration_arg(text: str) -> float:
    """argparse `type=` for durations: a bad one becomes argparse's own one-line usage error."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '4h', '1h30m' -> seconds. Raises ValueError with a clear message."""
    s = text.strip().lower()
    if not s:
        raise ValueError("empty duration")
    try:
        return float(s)
    except ValueError:
        pass
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    total, num = 0.0, ""
    i = 0
    while i < len(s):
        ch = s[i]
        if ch.isdigit() or ch == ".":
            num += ch
            i += 1
            continue
        unit = s[i : i + 2] if s[i : i + 2] == "ms" else ch
        if unit not in units or not num:
            raise ValueError(f"bad duration {text!r} (use e.g. 30s, 15m, 4h)")
        total += float(num) * units[unit]
        num = ""
        i += len(unit)
    if num:
        raise ValueError(f"bad duration {text!r}: number {num!r} has no unit (use e.g. 30s, 15m, 4h)")
    return total
