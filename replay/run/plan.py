"""From a run's configuration to its schedule: a picklable recipe, so every worker process or
Ray actor rebuilds the one schedule and keeps its share (`id % count == index`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from replay.core.request import Request
from replay.run.config import RunConfig
from replay.schedule import arrivals
from replay.schedule.behaviour import Dist
from replay.schedule.from_trace import schedule_from_trace, trace_timing
from replay.schedule.prompts import DEFAULT_HIGH_ID, DEFAULT_LOW_ID, PromptBuilder
from replay.schedule.sessions import SessionSchedule, SessionSpec
from replay.schedule.vocab import id_range
from replay.trace.formats import load_trace


@dataclass(frozen=True)
class TraceSchedule:
    """A recorded trace with its time knobs; `(index, count)` gives one worker's share."""

    path: Path
    fmt: str | None
    skip_bad_rows: bool
    speedup: float
    rate: float | None
    window: tuple[float, float] | None
    loop: bool
    jitter_s: float
    duration_s: float | None
    max_requests: int | None
    seed: int
    low_id: int = DEFAULT_LOW_ID
    high_id: int = DEFAULT_HIGH_ID

    @classmethod
    def from_config(cls, cfg: RunConfig, vocab_size: int | None = None) -> TraceSchedule:
        assert cfg.trace is not None
        low, high = id_range(vocab_size)
        return cls(
            path=Path(cfg.trace),
            fmt=cfg.trace_format,
            skip_bad_rows=cfg.skip_bad_rows,
            speedup=cfg.speedup,
            rate=cfg.rate,
            window=cfg.window,
            loop=cfg.loop,
            jitter_s=cfg.jitter_s,
            duration_s=cfg.duration_s,
            max_requests=cfg.requests,
            seed=cfg.seed,
            low_id=low,
            high_id=high,
        )

    def trace_file(self):  # noqa: ANN201 - replay.trace.formats.TraceFile
        return load_trace(self.path, self.fmt, skip_bad_rows=self.skip_bad_rows)

    def offered_rate(self) -> float | None:
        """Mean requests/s the replay offers: the rescale target, else the trace's own rate x speedup."""
        if self.rate is not None:
            return self.rate
        timing = trace_timing(self.trace_file(), self.window)
        return timing.mean_rate * self.speedup if timing.mean_rate else None

    def __call__(self, index: int = 0, count: int = 1) -> Iterator[Request]:
        reqs = schedule_from_trace(
            self.trace_file(),
            speedup=self.speedup,
            rate=self.rate,
            window=self.window,
            loop=self.loop,
            duration_s=self.duration_s,
            max_requests=self.max_requests,
            jitter_bucket_s=self.jitter_s,
            seed=self.seed,
            prompts=PromptBuilder(self.seed, self.low_id, self.high_id),
        )
        if count == 1:
            return reqs
        return (r for r in reqs if r.id % count == index)


def session_schedule(cfg: RunConfig, vocab_size: int | None = None) -> tuple[SessionSchedule, float | None]:
    """The synthetic conversations of `cfg` (--turns), and the request rate they offer in the long
    run: new sessions/s x turns (a session's later turns come think times later, past --duration)."""
    assert cfg.turns is not None
    low, high = id_range(vocab_size)
    spec = SessionSpec(turns=cfg.turns, think=Dist.parse(cfg.think_time, "--think-time"),
                       first_tokens=cfg.input_tokens, follow_tokens=cfg.follow_up_tokens,
                       output_tokens=cfg.output_tokens)  # fmt: skip
    recipe = SessionSchedule(cfg.arrival_spec(), cfg.seed, spec, cfg.duration_s, cfg.sessions, low, high)
    rate = arrivals.mean_rate(cfg.arrival_spec(), cfg.duration_s) if cfg.duration_s else cfg.rate
    return recipe, None if rate is None else rate * cfg.turns
