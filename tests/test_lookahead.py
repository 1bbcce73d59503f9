"""The engine's look-ahead: requests are read, their prompts made and bodies prepared before their
send time, in order, within a time window (bounded memory), and every request is still accounted.

Timing here is the engine's own clock against a fake target; the stub-timed check of a burst of
large prompts is tests/test_burst_prompts.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import orjson
import pytest

from replay.core import errors
from replay.core.errors import ReplayError
from replay.core.prompt import TokenIds
from replay.core.request import Request, RequestRecord
from replay.engine.open_loop import Engine, EngineOptions
from replay.run.runner import run_in_uvloop
from replay.schedule.prompts import PromptBuilder
from replay.targets.fake import FakeTarget


class PreparingTarget(FakeTarget):
    """The fake target with a `prepare` step that stamps when it ran and checks what send gets."""

    def __init__(self) -> None:
        super().__init__(ttft_s=0.001, itl_s=0.001)
        self.prepared_at: dict[int, float] = {}
        self.sent_with: dict[int, bytes | None] = {}

    def prepare(self, request: Request) -> bytes:
        ids = request.prompt_token_ids
        assert isinstance(ids, TokenIds) and all(p.ready for p in ids.pieces)  # made before prepare
        self.prepared_at[request.id] = time.perf_counter()
        return ids.json()

    async def send(self, request: Request, record: RequestRecord) -> None:
        self.sent_with[request.id] = request.prepared
        await super().send(request, record)


def schedule(pb: PromptBuilder, offsets: list[float], n_tokens: int = 2000,
             pulled: dict[int, float] | None = None) -> Iterator[Request]:  # fmt: skip
    for i, t in enumerate(offsets):
        if pulled is not None:
            pulled[i] = time.perf_counter()
        yield Request(i, t, n_tokens, 2, prompt_token_ids=pb.prompt(i, n_tokens, (1, 2, i + 10), 512))


async def run(target, reqs, options=None, prime=True, stop_after=None):
    got: list[RequestRecord] = []
    await target.start()
    eng = Engine(target, got.append, options)
    if prime:
        await eng.prime(reqs)
    t0 = time.perf_counter() + 0.02
    if stop_after is not None:
        asyncio.get_running_loop().call_later(stop_after, eng.stop)
    await eng.run(reqs, t0)
    return got, eng, t0


async def test_bodies_are_prepared_before_their_send_time_and_used():
    pb = PromptBuilder(0)
    offsets = [0.0] * 10 + [0.3] * 10 + [0.6 + 0.01 * i for i in range(10)]
    target = PreparingTarget()
    got, eng, t0 = await run(target, schedule(pb, offsets))
    assert sorted(r.id for r in got) == list(range(30)) and all(r.status == "ok" for r in got)
    ref = PromptBuilder(0)
    for i, t in enumerate(offsets):
        body = target.sent_with[i]
        assert body is not None and orjson.loads(body) == ref.prefix_token_ids(i, 2000, (1, 2, i + 10), 512)
        assert target.prepared_at[i] <= t0 + t  # ready before it was due, the burst at t = 0 too
    assert eng.state.prepared_late == 0


async def test_reads_the_schedule_only_a_window_ahead():
    pb = PromptBuilder(0)
    offsets = [0.05 * i for i in range(20)]  # one second
    pulled: dict[int, float] = {}
    target = PreparingTarget()
    _, _, t0 = await run(target, schedule(pb, offsets, pulled=pulled), EngineOptions(look_ahead_s=0.2))
    for i in range(1, len(offsets)):
        # Request i is read once request i-1 is within the window (the first window before the
        # clock started, up to the 20 ms start lead earlier).
        assert pulled[i] >= t0 + offsets[i - 1] - 0.2 - 0.03, (i, pulled[i] - t0)


async def test_held_bytes_bound_the_window():
    pb = PromptBuilder(0)
    offsets = [0.02 * i for i in range(10)]
    pulled: dict[int, float] = {}
    target = PreparingTarget()
    # A bound smaller than one request: one request is held ready, one more read and waiting.
    opts = EngineOptions(look_ahead_s=10.0, look_ahead_bytes=1)
    got, _, t0 = await run(target, schedule(pb, offsets, pulled=pulled), opts)
    assert len(got) == 10
    for i in range(3, 10):
        assert pulled[i] >= t0 + offsets[i - 3] - 0.002, i  # not before request i-3 went out


async def test_stop_accounts_for_ready_and_unread_requests():
    pb = PromptBuilder(0)
    offsets = [0.01 * i for i in range(100)]
    got, eng, _ = await run(PreparingTarget(), schedule(pb, offsets), stop_after=0.3)
    assert sorted(r.id for r in got) == list(range(100))  # each exactly once
    not_sent = [r for r in got if r.status == "not_sent"]
    assert not_sent and all(r.error == errors.NOT_SENT_STOPPED for r in not_sent)
    assert eng.state.dispatched + eng.state.not_sent == 100


async def test_a_bad_schedule_record_raises_after_the_requests_before_it():
    pb = PromptBuilder(0)

    def bad() -> Iterator[Request]:
        yield from schedule(pb, [0.0, 0.01, 0.02])
        raise ReplayError("trace.jsonl:4: input_length: not an integer")

    got: list[RequestRecord] = []
    target = PreparingTarget()
    await target.start()
    eng = Engine(target, got.append)
    with pytest.raises(ReplayError, match="trace.jsonl:4"):
        await eng.run(bad(), time.perf_counter() + 0.01)
    assert set(target.sent_with) == {0, 1, 2}


async def test_targets_without_prepare_still_get_ready_prompts():
    pb = PromptBuilder(0)
    seen: list[bool] = []

    class Plain(FakeTarget):
        async def send(self, request: Request, record: RequestRecord) -> None:
            ids = request.prompt_token_ids
            seen.append(
                isinstance(ids, TokenIds) and all(p.ready for p in ids.pieces) and not request.prepared
            )
            await super().send(request, record)

    got, _, _ = await run(Plain(ttft_s=0.001, itl_s=0.001), schedule(pb, [0.0, 0.0, 0.05]), prime=False)
    assert len(got) == 3 and seen == [True, True, True]


def test_every_window_wait_wakes_in_time():
    """The builder sleeps until the window reaches the next request; a timer firing a little early
    (uvloop's fire up to 1 ms early, on the loop runs use) must not leave it asleep until the
    dispatcher takes the next request (then the rest of that burst is late)."""
    pb = PromptBuilder(0)
    offsets = [0.1 * b for b in range(12) for _ in range(3)]  # 12 bursts of 3, 100 ms apart
    target = PreparingTarget()
    coro = run(target, schedule(pb, offsets), EngineOptions(look_ahead_s=0.05))
    _, eng, t0 = run_in_uvloop(coro)
    late = [i for i, t in enumerate(offsets) if target.prepared_at[i] > t0 + t]
    assert not late and eng.state.prepared_late == 0, late


async def test_nothing_is_built_before_its_window_even_when_nothing_is_ready():
    """Built the moment the previous burst was taken, the next burst's first request would be made
    while that burst's requests are being written."""
    pb = PromptBuilder(0)
    offsets = [0.3 * b for b in range(4) for _ in range(5)]  # 4 bursts of 5, 300 ms apart
    target = PreparingTarget()
    _, _, t0 = await run(target, schedule(pb, offsets), EngineOptions(look_ahead_s=0.1))
    for i, t in enumerate(offsets):
        assert target.prepared_at[i] >= t0 + t - 0.1 - 0.03, (
            i,
            target.prepared_at[i] - t0,
        )  # 0.03: start lead
        assert target.prepared_at[i] <= t0 + t
