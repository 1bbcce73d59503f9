"""Synthetic schedules: arrival offsets x request shapes -> `Request`s, bounded by count or duration.

A schedule is a lazy iterator in send order, so a million-request soak never sits in memory.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

from replay.core.request import Request
from replay.schedule.prompts import PromptBuilder


def synthetic(
    arrival_offsets: Iterable[float],
    *,
    input_tokens: int,
    output_tokens: int,
    prompts: PromptBuilder,
    duration_s: float | None,
    max_requests: int | None,
    shard: tuple[int, int] | None = None,
) -> Iterator[Request]:
    """Requests at the given offsets until `duration_s` (exclusive) or `max_requests`, whichever first.

    `shard=(w, n)` keeps only ids with `id % n == w` (one worker's share; the union over w is the
    whole schedule) and skips building the others' prompts.
    """
    if duration_s is None and max_requests is None:
        raise ValueError("a schedule needs a duration or a request count")
    for i, t in enumerate(arrival_offsets):
        if max_requests is not None and i >= max_requests:
            return
        if duration_s is not None and t >= duration_s:
            return
        if shard is not None and i % shard[1] != shard[0]:
            continue
        yield Request(
            id=i,
            intended_s=t,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            prompt_token_ids=prompts.prompt(i, input_tokens),
        )


def primed(schedule: Iterable[Request]) -> Iterator[Request]:
    """The same requests, the first one already built. Call it before a run's clock starts: a
    schedule's first step sets up its generators and prompt builder (6-11 ms), which at t0 would
    make request 0 late and stall the event loop being measured."""
    it = iter(schedule)
    first = next(it, None)
    return it if first is None else itertools.chain((first,), it)
