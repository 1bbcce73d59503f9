"""What a capacity search is asked to do (`CapacityOptions`) and how long it may take (`Budget`)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from replay.capacity.slo import Slo
from replay.schedule.classes import TrafficClass


@dataclass(frozen=True)
class CapacityOptions:
    slo: Slo
    target_name: str = "target"
    input_tokens: int = 64
    output_tokens: int = 64
    arrival: str = "poisson"
    burstiness: float = 1.0
    step_s: float = 60.0  # the longest an open-loop step runs, warm-up included (it stops once decided)
    warmup_s: float = 10.0
    probe_s: float = 10.0  # one closed-loop level
    probe_max_concurrency: int = 256
    probe_growth: float = 1.1  # a doubling that adds less than 10% throughput ends the probe
    tolerance: float = 0.05  # stop once the answer's 95% interval is within +-tolerance of it
    max_steps: int = 30  # open-loop steps, re-runs included
    max_time_s: float = 720.0  # whole search, probe included (a started server's start-up is not)
    client_retries: int = 2  # re-runs of a step whose client fell behind, before the search gives up
    seed: int = 0
    interval_s: float = 1.0
    drain_timeout_s: float | None = None  # default: max(5 s, 10x the baseline E2E)
    knee_metric: str = "ttft_intended"
    headroom: float = 0.2  # replica estimate: capacity kept spare above the trace's peak
    endpoint: str = "completions"
    model: str | None = None
    vocab_size: int | None = None  # prompt ids stay below it (else the target's own, else 4,096)
    # A --classes mix (replay.schedule.classes): each step draws it, and passes only if every class
    # with an SLO met it too (a point verdict on the step's window; step.class_verdicts).
    classes: tuple[TrafficClass, ...] = ()

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["slo"] = self.slo.text
        return d


@dataclass
class Budget:
    max_steps: int
    max_time_s: float
    t0: float = field(default_factory=time.monotonic)
    steps: int = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def allows(self, seconds: float) -> bool:
        return self.steps < self.max_steps and self.elapsed() + seconds <= self.max_time_s
