"""Pure, seeded arrival models: request index -> intended offset from run start. No clock here.

Every model is a renewal process in *operational time* s (mean rate 1), mapped to wall time
through the inverse of the integrated rate, t = Lambda^-1(s). For a constant rate r,
Lambda(t) = r t. For a linear ramp from r0 to r1 over D seconds,
    Lambda(t) = r0 t + (r1 - r0) t^2 / (2 D)            (0 <= t <= D)
so t = (-r0 + sqrt(r0^2 + 2 a s)) / a with a = (r1 - r0) / D (and t = s / r0 when a = 0);
after D the rate stays r1. Mapping a unit-rate Poisson process this way gives an
inhomogeneous Poisson process with rate r(t) (the time-rescaling theorem).

Inter-arrival gaps in operational time:
  poisson:  Exp(1)
  gamma:    Gamma(shape=b, scale=1/b), mean 1, CV = 1/sqrt(b): b < 1 burstier, b = 1 Poisson
  constant: exactly 1
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

KINDS = ("poisson", "gamma", "constant")
_BLOCK = 4096


@dataclass(frozen=True, slots=True)
class ArrivalSpec:
    kind: str = "poisson"
    rate: float = 1.0  # requests per second (start rate for a ramp)
    burstiness: float = 1.0  # gamma shape; only for kind == "gamma"
    ramp_to: float | None = None  # end rate of a linear ramp
    ramp_s: float = 0.0  # ramp duration

    def problems(self) -> list[str]:
        out = []
        if self.kind not in KINDS:
            out.append(f"arrival: unknown kind {self.kind!r} (expected one of {', '.join(KINDS)})")
        if not (self.rate > 0 and math.isfinite(self.rate)):
            out.append(f"rate: must be a positive number of requests/s, got {self.rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            out.append(f"burstiness: must be > 0, got {self.burstiness}")
        if self.ramp_to is not None:
            if not (self.ramp_to > 0 and math.isfinite(self.ramp_to)):
                out.append(f"ramp-to: must be a positive rate, got {self.ramp_to}")
            if not self.ramp_s > 0:
                out.append(f"ramp: needs a positive duration, got {self.ramp_s}")
        return out


def _unit_gaps(spec: ArrivalSpec, rng: np.random.Generator, n: int) -> np.ndarray:
    if spec.kind == "poisson":
        return rng.exponential(1.0, n)
    if spec.kind == "gamma":
        return rng.gamma(spec.burstiness, 1.0 / spec.burstiness, n)
    return np.ones(n)


def _to_wall(spec: ArrivalSpec, s: np.ndarray) -> np.ndarray:
    """Lambda^-1: operational time (expected arrivals so far) -> seconds."""
    r0 = spec.rate
    if spec.ramp_to is None or spec.ramp_to == r0:
        return s / r0
    r1, d = spec.ramp_to, spec.ramp_s
    a = (r1 - r0) / d
    s_end = r0 * d + a * d * d / 2  # Lambda(D)
    inside = s <= s_end
    t = np.empty_like(s)
    t[inside] = (-r0 + np.sqrt(r0 * r0 + 2 * a * s[inside])) / a
    t[~inside] = d + (s[~inside] - s_end) / r1
    return t


def offsets(spec: ArrivalSpec, seed: int, first_at_zero: bool = False) -> Iterator[float]:
    """Endless intended offsets (seconds, non-decreasing). Same (spec, seed) -> same sequence.

    The first arrival comes after one gap, as in a stationary process started at 0, unless
    `first_at_zero` (then the whole sequence shifts so request 0 goes at t=0).
    """
    rng = np.random.default_rng(seed)
    s = 0.0
    shift: float | None = None
    while True:
        gaps = _unit_gaps(spec, rng, _BLOCK)
        cum = s + np.cumsum(gaps)
        s = float(cum[-1])
        wall = _to_wall(spec, cum)
        if first_at_zero:
            if shift is None:
                shift = float(wall[0])
            wall = wall - shift
        yield from wall.tolist()


def mean_rate(spec: ArrivalSpec, duration_s: float) -> float:
    """Expected requests/s over [0, duration_s]: Lambda(duration) / duration."""
    s = _integrated(spec, duration_s)
    return s / duration_s


def _integrated(spec: ArrivalSpec, t: float) -> float:
    r0 = spec.rate
    if spec.ramp_to is None:
        return r0 * t
    r1, d = spec.ramp_to, spec.ramp_s
    a = (r1 - r0) / d
    if t <= d:
        return r0 * t + a * t * t / 2
    return r0 * d + a * d * d / 2 + r1 * (t - d)
