"""A k-slot FIFO queue with deterministic service, simulated: the truth for capacity tests.

Independent of replay's code on purpose (numpy and heapq only). It models the stub server run
with `--max-concurrency K`: a request is admitted to one of K slots in arrival order (FIFO
beyond K), its first token comes `ttft_s` after admission and its slot is busy `service_s`
(ttft + (n - 1) x itl). Its TTFT is the wait for a slot plus `ttft_s`.

With Poisson arrivals this is M/D/K; `max_rate` finds, by bisection over long simulated runs, the
highest arrival rate whose TTFT p99 stays within a bound (the p99 of an M/D/K queue's wait has no
closed form, hence the simulation).
"""

from __future__ import annotations

import heapq

import numpy as np


def waits(arrivals: np.ndarray, k: int, service_s: float) -> np.ndarray:
    """Each request's wait for a slot (FIFO, k slots, deterministic service)."""
    free = [0.0] * k  # when each slot frees up (a heap)
    out = np.empty(len(arrivals))
    for i, t in enumerate(arrivals.tolist()):
        f = free[0]
        start = t if t > f else f
        out[i] = start - t
        heapq.heapreplace(free, start + service_s)
    return out


def poisson(rate: float, seconds: float, rng: np.random.Generator) -> np.ndarray:
    t = np.cumsum(rng.exponential(1.0 / rate, int(rate * seconds * 1.2) + 100))
    return t[t < seconds]


def ttft_exceedance(rate: float, k: int, service_s: float, ttft_s: float, bound_s: float,
                    seconds: float, seed: int) -> float:  # fmt: skip
    """Fraction of requests whose TTFT exceeds `bound_s` over one long run (first 10 s dropped)."""
    rng = np.random.default_rng(seed)
    arr = poisson(rate, seconds, rng)
    w = waits(arr, k, service_s)[arr >= 10.0]
    return float(np.mean(w + ttft_s > bound_s))


def max_rate(k: int, service_s: float, ttft_s: float, bound_s: float, q: float = 0.01,
             seconds: float = 20_000.0, lo: float = 1.0, hi: float | None = None,
             tol: float = 0.02, seed: int = 0) -> float:  # fmt: skip
    """Highest Poisson rate with P(TTFT > bound) <= q, by bisection on long runs (common random
    numbers: the same unit-rate arrival stream scaled to each rate, so the curve is monotone)."""
    rng = np.random.default_rng(seed)
    unit = np.cumsum(rng.exponential(1.0, int(seconds * (hi or k / service_s) * 1.3) + 100))
    hi = hi if hi is not None else k / service_s
    while hi - lo > tol:
        mid = (lo + hi) / 2
        arr = unit / mid
        arr = arr[arr < seconds]
        w = waits(arr, k, service_s)[arr >= 10.0]
        if np.mean(w + ttft_s > bound_s) <= q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
