"""Trace schedules: a recorded trace's own arrival times and lengths -> `Request`s in send order.

Time knobs, applied in this order, all on the trace's timeline before scaling:
  window START:END  keep arrivals with START <= t < END, then rebase so START is 0 (a silence
                    between START and the first arrival is kept: it is part of the window);
  loop              repeat the (windowed) trace back to back every D seconds (below);
  jitter B          move each arrival uniformly within [t, t + B): a trace quantised to B-second
                    buckets (BurstGPT 1 s, Mooncake ~3 s) would otherwise send each bucket as one
                    burst; the order inside a bucket is then random (it is unknown anyway);
and then one scale factor s, intended = t / s:
  speedup X         s = X (X > 1 compresses time; gaps shrink X-fold);
  rate R            s = R * D / N, so the replay's mean rate N / (D / s) is exactly R while every
                    gap keeps its proportion to the others (the burst shape).

D, the trace's duration: END - START for a closed window; otherwise the span of the arrivals plus
one mean gap, t_span * N / (N - 1), so that a looped trace's mean rate equals the trace's own
N / D across every seam. Rate and loop need N and D before the first request, so they take one
extra pass over the records: a `TraceFile` re-reads its file; a one-shot iterator is buffered.

Each loop pass gets its own prefix blocks (hash id + pass * 2**40) and session ids ("sid#pass"):
the second pass of a trace is new traffic, so it must not hit cache the first pass filled.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from replay.core.errors import ReplayError
from replay.core.request import Request
from replay.schedule.prompts import PromptBuilder
from replay.trace.model import HASH_ID_LIMIT, TraceRecord


@dataclass(frozen=True, slots=True)
class TraceTiming:
    count: int  # arrivals per pass (inside the window)
    duration_s: float  # D, on the trace's timeline
    mean_rate: float  # count / duration_s (0 when the trace has no time span)


def trace_timing(records: Iterable[TraceRecord], window: tuple[float, float] | None = None) -> TraceTiming:
    """N and D of a trace (one pass). See the module docstring for D."""
    start, end = _check_window(window)
    n = 0
    first = last = None
    for rec in records:
        t = rec.arrival_s
        if t < start:
            continue
        if t >= end:
            break
        n += 1
        if first is None:
            first = t
        last = t
    if n == 0 or last is None:
        return TraceTiming(0, 0.0 if math.isinf(end) else end - start, 0.0)
    if math.isfinite(end):
        d = end - start
    else:
        span = last - start
        d = span * n / (n - 1) if n > 1 else 0.0
    return TraceTiming(n, d, n / d if d > 0 else 0.0)


def schedule_from_trace(
    records: Iterable[TraceRecord],
    *,
    speedup: float = 1.0,
    rate: float | None = None,
    window: tuple[float, float] | None = None,
    loop: bool = False,
    duration_s: float | None = None,
    max_requests: int | None = None,
    jitter_bucket_s: float = 0.0,
    seed: int = 0,
    prompts: PromptBuilder | None,
    require_full_coverage: bool = False,
) -> Iterator[Request]:
    """Requests with ids 0..N-1 in send order, `intended_s` from the scaled arrival.

    With `prompts`, records without prompt text or ids get exact-length token-id prompts (prefix
    blocks from their hash ids); without it they carry only their hash ids and lengths.
    Raises ReplayError up front for contradictory or unbounded knobs.
    """
    _check_knobs(speedup, rate, loop, duration_s, max_requests, jitter_bucket_s)
    start, end = _check_window(window)
    if (rate is not None or loop) and iter(records) is records:
        records = list(records)  # one-shot iterator: the extra pass needs it twice
    period = 0.0
    scale = speedup
    if rate is not None or loop:
        timing = trace_timing(records, window)
        if timing.count == 0:
            raise ReplayError(f"trace window {_fmt_window(window)} contains no requests")
        if timing.duration_s <= 0:
            raise ReplayError(
                "trace has no time span (every arrival at the same instant): it cannot be "
                "rescaled to a rate or looped; use a synthetic arrival process with it instead"
            )
        period = timing.duration_s
        if rate is not None:
            scale = rate / timing.mean_rate
    stream = _passes(records, start, end, loop, period)
    if jitter_bucket_s > 0:
        stream = _jitter(stream, jitter_bucket_s, np.random.default_rng(seed))
    return _requests(stream, scale, duration_s, max_requests, prompts, require_full_coverage)


def _passes(
    records: Iterable[TraceRecord], start: float, end: float, loop: bool, period: float
) -> Iterator[tuple[float, int, TraceRecord]]:
    """(trace time, pass, record): windowed, rebased, passes laid back to back."""
    p = 0
    while True:
        prev = -math.inf
        for rec in records:
            t = rec.arrival_s
            if t < prev:
                raise ReplayError(
                    f"trace record from line {rec.source_line} arrives at {t:g} s, before the previous "
                    f"one ({prev:g} s): records must be sorted by arrival"
                )
            prev = t
            if t < start:
                continue
            if t >= end:
                break
            yield t - start + p * period, p, rec
        if not loop:
            return
        p += 1


def _jitter(
    stream: Iterator[tuple[float, int, TraceRecord]], bucket: float, rng: np.random.Generator
) -> Iterator[tuple[float, int, TraceRecord]]:
    """Move each arrival to t + U[0, bucket), re-sorted on the fly. An arrival's jittered time is
    never below its own t, and the input is sorted, so once the input reaches t every held item
    with jittered time <= t is final: a heap of at most one bucket's worth of arrivals."""
    heap: list[tuple[float, int, int, TraceRecord]] = []
    for seq, (t, p, rec) in enumerate(stream):
        while heap and heap[0][0] <= t:
            j, _, hp, hrec = heapq.heappop(heap)
            yield j, hp, hrec
        heapq.heappush(heap, (t + float(rng.random()) * bucket, seq, p, rec))
    while heap:
        j, _, hp, hrec = heapq.heappop(heap)
        yield j, hp, hrec


def _requests(
    stream: Iterator[tuple[float, int, TraceRecord]],
    scale: float,
    duration_s: float | None,
    max_requests: int | None,
    prompts: PromptBuilder | None,
    require_full_coverage: bool,
) -> Iterator[Request]:
    for i, (t, p, rec) in enumerate(stream):
        if max_requests is not None and i >= max_requests:
            return
        intended = t / scale
        if duration_s is not None and intended >= duration_s:
            return
        hash_ids = rec.hash_ids if p == 0 else tuple(h + p * HASH_ID_LIMIT for h in rec.hash_ids)
        ids = rec.prompt_token_ids
        if ids is None and rec.prompt_text is None and prompts is not None:
            ids = prompts.prompt(
                i, rec.input_tokens, hash_ids, rec.block_size, require_full_coverage=require_full_coverage
            )
        sid = rec.session_id if p == 0 or rec.session_id is None else f"{rec.session_id}#{p}"
        yield Request(
            id=i,
            intended_s=intended,
            input_tokens=rec.input_tokens,
            output_tokens=rec.output_tokens,
            prompt_text=rec.prompt_text,
            prompt_token_ids=ids,
            session_id=sid,
            prefix_hash_ids=hash_ids,
            prefix_block_size=rec.block_size if hash_ids else 0,
        )


def _check_knobs(
    speedup: float,
    rate: float | None,
    loop: bool,
    duration_s: float | None,
    max_requests: int | None,
    jitter: float,
) -> None:
    if not (math.isfinite(speedup) and speedup > 0):
        raise ReplayError(f"speedup: must be a positive number, got {speedup}")
    if rate is not None:
        if not (math.isfinite(rate) and rate > 0):
            raise ReplayError(f"rate: must be a positive number of requests/s, got {rate}")
        if speedup != 1.0:
            raise ReplayError("give either --speedup or --rate, not both: each sets the time scale")
    if loop and duration_s is None and max_requests is None:
        raise ReplayError("loop: needs --duration or --requests to end")
    if duration_s is not None and not duration_s > 0:
        raise ReplayError(f"duration: must be > 0, got {duration_s}")
    if max_requests is not None and max_requests < 0:
        raise ReplayError(f"requests: must be >= 0, got {max_requests}")
    if not (math.isfinite(jitter) and jitter >= 0):
        raise ReplayError(f"jitter: must be a bucket width >= 0 s, got {jitter}")


def _check_window(window: tuple[float, float] | None) -> tuple[float, float]:
    if window is None:
        return 0.0, math.inf
    start, end = window
    if not (start >= 0 and end > start) or math.isnan(start) or math.isnan(end):
        raise ReplayError(f"window: needs 0 <= START < END, got {_fmt_window(window)}")
    return float(start), float(end)


def _fmt_window(window: tuple[float, float] | None) -> str:
    if window is None:
        return "(whole trace)"
    return f"{window[0]:g}:{'' if math.isinf(window[1]) else f'{window[1]:g}'}"


def parse_window(text: str) -> tuple[float, float]:
    """'START:END' in seconds on the trace's timeline; END may be empty (to the end)."""
    head, sep, tail = text.partition(":")
    try:
        if not sep:
            raise ValueError
        start = float(head) if head.strip() else 0.0
        end = float(tail) if tail.strip() else math.inf
    except ValueError:
        raise ReplayError(f"window: expected START:END in seconds (END optional), got {text!r}") from None
    return _check_window((start, end))
