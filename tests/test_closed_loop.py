"""Closed loop against the in-process fake, whose service time is exact by construction."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from replay.core.request import Request
from replay.engine.closed_loop import ClosedLoopEngine
from replay.engine.open_loop import EngineOptions
from replay.run.config import RunConfig
from replay.targets.fake import FakeTarget


class Counting(FakeTarget):
    """The fake, recording the most requests it ever held at once."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.now = 0
        self.peak = 0

    async def send(self, request, record):
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await super().send(request, record)
        finally:
            self.now -= 1


def endless(n_out=5):
    for i in itertools.count():
        yield Request(id=i, intended_s=123.0, input_tokens=4, output_tokens=n_out)


async def drive(target, schedule, streams, duration_s, stop_after=None):
    got = []
    await target.start()
    eng = ClosedLoopEngine(target, got.append, EngineOptions(drain_timeout_s=5), streams, duration_s)
    if stop_after is not None:
        asyncio.get_running_loop().call_later(stop_after, eng.stop)
    t0 = time.perf_counter() + 0.02
    await eng.run(schedule, t0)
    await target.close()
    return got


async def test_streams_send_back_to_back_and_intended_is_the_eligible_moment():
    service = 0.03 + 4 * 0.01  # TTFT + 4 more tokens at 10 ms
    target = Counting(ttft_s=0.03, itl_s=0.01)
    got = await drive(target, endless(), streams=3, duration_s=1.0)
    assert target.peak == 3
    assert all(r.status == "ok" for r in got)
    got.sort(key=lambda r: r.intended_s)
    assert [round(r.intended_s, 2) for r in got[:3]] == [0.0, 0.0, 0.0]
    ends = sorted(r.end_s for r in got)
    for r in got[3:]:
        # Each later request became eligible when some earlier one ended (its stream's previous).
        assert min(abs(r.intended_s - e) for e in ends) < 0.003
        assert r.send_lag() < 0.003  # no coordinated-omission gap: sent when eligible
    assert max(r.intended_s for r in got) < 1.0  # nothing starts after the duration
    expected = 3 * 1.0 / service
    assert 0.6 * expected <= len(got) <= expected + 3


async def test_request_bound_and_stop_account_every_request():
    got = await drive(
        FakeTarget(ttft_s=0.01, itl_s=0.005), (r for r in itertools.islice(endless(), 7)), 3, None
    )
    assert sorted(r.id for r in got) == list(range(7))
    got = await drive(FakeTarget(ttft_s=0.05, itl_s=0.01), endless(), 2, 10.0, stop_after=0.3)
    assert all(r.status == "ok" for r in got)  # in-flight ones drained, nothing recorded not_sent
    assert max(r.intended_s for r in got) < 0.35
    assert len(got) >= 2


async def test_drain_timeout_cancels_what_is_left():
    got = []
    target = FakeTarget(ttft_s=5.0, itl_s=0.01)
    await target.start()
    eng = ClosedLoopEngine(target, got.append, EngineOptions(drain_timeout_s=0.2), 2, 0.1)
    t0 = time.perf_counter()
    await eng.run(endless(), t0)
    assert time.perf_counter() - t0 < 2.0
    assert [r.status for r in got] == ["unfinished", "unfinished"]


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"concurrency": 0}, "--concurrency: must be >= 1"),
        ({"concurrency": 2, "rate": 5.0}, "drop --rate"),
        ({"concurrency": 2, "concurrency_cap": 4}, "drop --rate/--concurrency-cap"),
        ({}, "--rate: required"),
    ],
)
def test_config_problems(kw, needle):
    problems = RunConfig(target="x", **kw).problems()
    assert any(needle in p for p in problems), problems


def test_closed_loop_config_is_valid_without_rate():
    assert RunConfig(target="x", concurrency=4, duration_s=5).problems() == []
