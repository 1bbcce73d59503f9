"""Closed-loop mode: N streams, each sending its next request the moment its previous one ends.

This measures what a server does at a fixed concurrency (the throughput-versus-batch curve and,
at N = 1, the single-request latency baseline), not what users at a given arrival rate see: the
load adapts to the server, so there is no backlog a slow server could hide. A request's
`intended_s` is the moment it became eligible (its stream's previous request ended, or run
start), so send lag is only the client's own overhead and no coordinated-omission correction
applies. Requests the run never reached were never scheduled: a closed loop schedules as it goes,
so nothing is recorded `not_sent`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Iterable, Iterator

from replay.core.request import Request, record_for
from replay.core.target import Target
from replay.engine.open_loop import Engine, EngineOptions, Sink

_POLL_S = 0.25


class ClosedLoopEngine(Engine):
    """`streams` back-to-back senders sharing one schedule iterator (its intended times ignored),
    until the schedule ends or `duration_s` passes; in-flight requests then get `drain_timeout_s`."""

    def __init__(
        self,
        target: Target,
        sink: Sink,
        options: EngineOptions | None,
        streams: int,
        duration_s: float | None,
    ) -> None:
        if streams < 1:
            raise ValueError("closed loop needs at least one stream")
        opts = dataclasses.replace(options or EngineOptions(), concurrency_cap=None)
        super().__init__(target, sink, opts)
        self.streams = streams
        self.duration_s = duration_s
        self._stopped_at: float | None = None

    def stop(self) -> None:
        """Start no new request; in-flight ones finish (within the drain timeout)."""
        if not self._stopping:
            self._stopping = True
            self._stopped_at = time.perf_counter()

    async def prime(self, schedule: Iterable[Request]) -> None:
        """Nothing to make ready ahead: a closed loop's send times are not known in advance."""

    async def run(self, schedule: Iterable[Request], t0: float) -> None:
        self._t0 = t0
        deadline = t0 + self.duration_s if self.duration_s else math.inf
        it = iter(schedule)
        delay = t0 - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        loop = asyncio.get_running_loop()
        workers = {loop.create_task(self._stream(it, deadline)) for _ in range(self.streams)}
        self._tasks.update(workers)
        pending = workers
        while pending:
            _, pending = await asyncio.wait(pending, timeout=_POLL_S)
            end = self._stopped_at if self._stopped_at is not None else deadline
            if pending and time.perf_counter() > end + self.options.drain_timeout_s:
                self._stopping = True
                self._drain_expired = True  # each in-flight request is recorded unfinished
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending)
                break
        self._tasks.difference_update(workers)

    async def _stream(self, it: Iterator[Request], deadline: float) -> None:
        while not self._stopping:
            now = time.perf_counter()
            if now >= deadline:
                return
            req = next(it, None)
            if req is None:
                return
            req = dataclasses.replace(req, intended_s=now - self._t0)  # eligible now
            rec = record_for(req)
            rec.worker = self.options.worker
            rec.dispatch_s = now
            self.state.dispatched += 1
            await self._one(req, rec)
