"""Synthetic conversations: sessions arrive open-loop (any arrival model); within one, turn k+1 is
made when turn k ends (the engine's `follow_up` hook) and sent a drawn think time after that end,
its prompt the previous prompt + ids standing for the output the server reported + the new user
message. Token ids, so a server's prefix cache sees the whole previous turn as a shared prefix.

Ids: session s, turn k has id `s * TURN_STRIDE + k`, so a session's first turn shards by id like any
request and its follow-ups stay in the process that ran the turn before.

A turn that does not end ok (an error, abandoned, unfinished at the drain deadline) ends its session:
the turns that would have followed are never made, and `remainder` hands them to the engine to be
counted `not_sent: session_ended` (or the unsent turn's own reason), so a run of N sessions of K
turns always accounts for N x K requests. `--duration` bounds when sessions start; their later
turns go on after it, within the drain timeout.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from replay.core.request import Request
from replay.schedule import arrivals
from replay.schedule.arrivals import ArrivalSpec
from replay.schedule.behaviour import Dist, uniforms
from replay.schedule.prompts import DEFAULT_HIGH_ID, DEFAULT_LOW_ID, PromptBuilder

TURN_STRIDE = 1024  # at most this many turns a session
_THINK_SALT = 2
_OUTPUT_SEED_SALT = 0x5E55  # the ids standing for a turn's output: a stream apart from prompts'


@dataclass(frozen=True)
class SessionSpec:
    turns: int
    think: Dist
    first_tokens: int
    follow_tokens: int
    output_tokens: int


class Sessions:
    """First turns as a schedule, and `follow_up` for the engine. Deterministic per (seed, id)."""

    def __init__(self, spec: SessionSpec, seed: int, low_id: int = DEFAULT_LOW_ID,
                 high_id: int = DEFAULT_HIGH_ID) -> None:  # fmt: skip
        if not 1 <= spec.turns <= TURN_STRIDE:
            raise ValueError(f"turns must be 1..{TURN_STRIDE}")
        self.spec = spec
        self.seed = seed
        self._prompts = PromptBuilder(seed, low_id, high_id)
        self._outputs = PromptBuilder(seed ^ _OUTPUT_SEED_SALT, low_id, high_id)

    def first_turns(self, offsets: Iterable[float], duration_s: float | None, max_sessions: int | None,
                    shard: tuple[int, int] | None = None) -> Iterator[Request]:  # fmt: skip
        for s, t in enumerate(offsets):
            if (max_sessions is not None and s >= max_sessions) or (
                duration_s is not None and t >= duration_s
            ):
                return
            rid = s * TURN_STRIDE
            if shard is not None and rid % shard[1] != shard[0]:
                continue
            n = self.spec.first_tokens
            yield Request(id=rid, intended_s=t, input_tokens=n, output_tokens=self.spec.output_tokens,
                          prompt_token_ids=self._prompts.token_ids(rid, n), session_id=str(s),
                          turn=1)  # fmt: skip

    def think_s(self, request_id: int) -> float:
        """The think time after the turn `request_id` (drawn per id)."""
        return self.spec.think.at(uniforms(self.seed, _THINK_SALT, request_id)[0])

    def follow_up(self, req: Request, end_s: float, output_tokens: int) -> Request | None:
        """Turn k+1 of `req`'s session, sent think time after turn k ended (`end_s`, run-relative)."""
        if req.session_id is None or req.id % TURN_STRIDE + 1 >= self.spec.turns:
            return None
        rid = req.id + 1
        prev = list(req.prompt_token_ids or ())
        prompt = (
            prev
            + self._outputs.token_ids(req.id, output_tokens)
            + self._prompts.token_ids(rid, self.spec.follow_tokens)
        )
        return Request(id=rid, intended_s=end_s + self.think_s(req.id), input_tokens=len(prompt),
                       output_tokens=self.spec.output_tokens, prompt_token_ids=prompt,
                       session_id=req.session_id, turn=turn_of(rid) + 1)  # fmt: skip

    def remainder(self, req: Request, at_s: float) -> Iterator[Request]:
        """The turns of `req`'s session after it, never to be made (it failed or was not sent): as
        requests to count not_sent, at `at_s` (when the session broke), with no prompt."""
        if req.session_id is None:
            return
        for k in range(turn_of(req.id) + 1, self.spec.turns):
            yield Request(id=req.id - turn_of(req.id) + k, intended_s=at_s, input_tokens=0,
                          output_tokens=self.spec.output_tokens, session_id=req.session_id,
                          turn=k + 1)  # fmt: skip


def turn_of(request_id: int) -> int:
    """0-based turn index of a session request id."""
    return request_id % TURN_STRIDE


@dataclass(frozen=True)
class SessionSchedule:
    """A picklable schedule recipe (`(index, count) -> first turns`) whose `follow_up` and `remainder`
    go to the engine; worker w of n keeps the sessions whose first-turn id has `id % n == w`.
    Sessions start at the arrival model's offsets (`--rate` is new sessions per second)."""

    arrival: ArrivalSpec
    seed: int
    spec: SessionSpec
    duration_s: float | None
    max_sessions: int | None
    low_id: int = DEFAULT_LOW_ID
    high_id: int = DEFAULT_HIGH_ID

    @functools.cached_property
    def sessions(self) -> Sessions:
        return Sessions(self.spec, self.seed, self.low_id, self.high_id)

    def __call__(self, index: int = 0, count: int = 1) -> Iterator[Request]:
        offsets = arrivals.offsets(self.arrival, self.seed)
        shard = None if count == 1 else (index, count)
        return self.sessions.first_turns(offsets, self.duration_s, self.max_sessions, shard)

    def follow_up(self, req: Request, end_s: float, output_tokens: int) -> Request | None:
        return self.sessions.follow_up(req, end_s, output_tokens)

    def remainder(self, req: Request, at_s: float) -> Iterator[Request]:
        return self.sessions.remainder(req, at_s)

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "sessions"}  # rebuilt where unpickled


def chain_hooks(recipe: Any) -> tuple[Any, Any]:
    """(follow_up, remainder) of a schedule recipe for the engine; (None, None) for plain schedules.
    Wrappers (the probe, abandons) pass their inner recipe's hooks on."""
    return getattr(recipe, "follow_up", None), getattr(recipe, "remainder", None)
