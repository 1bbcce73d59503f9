"""Requests made ready before their send time: the schedule is read, each prompt's pieces made and
the target's body built ahead of the clock, so that at a burst's instant the loop only writes.

Why on the loop in short slices and not in a thread: the work is Python, numpy and orjson, which
hold the GIL, so a builder thread stalls the loop thread anyway, for up to the interpreter's 5 ms
switch interval at a time (measured on 30 prompts of 8k-120k tokens: loop lag max 5-16 ms with a
thread, against one piece's cost here). Here the work comes in pieces of ~0.1 ms (a prompt block,
a chunk of a request's unique ids, one body join, one schedule record) and the builder yields to
the loop once it has used SLICE_S, so no I/O callback or timer waits for it much longer than that.

Bounded memory: a request is made ready only once its intended time is within `window_s` of the
clock, and ready requests are held up to `max_bytes` (estimated); the rest of the schedule is not
read yet. Before the clock starts (`t0` None) the first window is made ready (`primed()`), so a
burst at the very start of a run is as ready as any other. When the builder falls behind (a dense
burst of cold prompts), the dispatcher waits for it, and the wait shows as dispatch lag: nothing is
shifted silently.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator

from replay.core.prompt import TokenIds
from replay.core.request import Request

SLICE_S = 0.0005  # builder work between two yields to the loop
# Held-memory estimate per ready request: the objects, plus ids (4 B) and JSON text (~5 B) a token.
_REQUEST_BYTES = 1024
_TOKEN_BYTES = 9

Prepare = Callable[[Request], bytes]


class LookAhead:
    """`await next()` gives the schedule's requests in order, each made ready ahead of its time."""

    def __init__(self, schedule: Iterable[Request], prepare: Prepare | None, t0: float | None,
                 window_s: float, max_bytes: int) -> None:  # fmt: skip
        self.schedule = schedule
        self._it = iter(schedule)
        self._prepare = prepare
        self._t0 = t0
        self._window_s = window_s
        self._max_bytes = max_bytes
        self._ready: deque[Request] = deque()
        self._bytes = 0
        self._current: Request | None = None  # read from the schedule, not ready yet
        self._done = False
        self._error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake_builder: asyncio.Future[None] | None = None
        self._wake_reader: asyncio.Future[None] | None = None
        self._primed: asyncio.Future[None] | None = None
        self.late = 0  # requests made ready only after their intended send time

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._primed = loop.create_future()
        self._task = loop.create_task(self._build())

    async def primed(self) -> None:
        """Wait until the first window is ready (or the byte bound is reached, or the schedule ended)."""
        assert self._primed is not None
        await asyncio.shield(self._primed)

    def clock_started(self, t0: float) -> None:
        """The run's clock is fixed: from now the window moves with it."""
        self._t0 = t0
        wake(self._wake_builder)

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.wait([self._task])  # a cancellation of the caller still propagates

    async def next(self) -> Request | None:
        """The next request, ready; None once the schedule is exhausted."""
        while not self._ready:
            if self._error is not None:
                raise self._error
            if self._done:
                return None
            self._wake_reader = asyncio.get_running_loop().create_future()
            try:
                await self._wake_reader
            finally:
                self._wake_reader = None
        req = self._ready.popleft()
        self._bytes -= _cost(req)
        wake(self._wake_builder)
        return req

    def rest(self) -> Iterator[Request]:
        """After close(): requests never handed out (ready ones, the one being built, the unread)."""
        yield from self._ready
        self._ready.clear()
        if self._current is not None:
            yield self._current
            self._current = None
        if self._error is None:
            yield from self._it

    async def _build(self) -> None:
        perf = time.perf_counter
        slice_end = perf() + SLICE_S
        try:
            while True:
                req = next(self._it, None)
                if req is None:
                    break
                self._current = req
                # Wait while the request is beyond the window or the held bytes are spent, even with
                # nothing ready: built as soon as the last burst was taken, it would be built during
                # that burst's sends (the dispatcher has until its time anyway).
                while (wait_s := self._wait_s(req)) is not None:
                    await self._sleep(wait_s)
                    slice_end = perf() + SLICE_S
                ids = req.prompt_token_ids
                if isinstance(ids, TokenIds):
                    for _ in ids.steps():
                        if perf() > slice_end:
                            await asyncio.sleep(0)
                            slice_end = perf() + SLICE_S
                if self._prepare is not None:
                    req.prepared = self._prepare(req)
                if self._t0 is not None and perf() > self._t0 + req.intended_s:
                    self.late += 1
                self._current = None
                self._ready.append(req)
                self._bytes += _cost(req)
                wake(self._wake_reader)
                if perf() > slice_end:
                    await asyncio.sleep(0)
                    slice_end = perf() + SLICE_S
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bad schedule record: the dispatcher raises it in order
            self._error = exc
        finally:
            self._done = True
            wake(self._wake_reader)
            wake(self._primed)

    def _wait_s(self, req: Request) -> float | None:
        """None: room for `req` now; else how long until the window reaches it (inf: until next()
        frees bytes or the clock starts). One reading of the clock decides both whether to wait and
        for how long: read twice, a timer that fired a little early (uvloop's can fire up to 1 ms
        early) could find the window not reached, then reached when arming the next one, and the
        builder would sleep with no timer until the dispatcher took the next request."""
        if self._bytes >= self._max_bytes:
            return math.inf
        if self._t0 is None:  # clock not started: the run's first window_s
            return math.inf if req.intended_s > self._window_s else None
        wait = self._t0 + req.intended_s - self._window_s - time.perf_counter()
        return wait if wait > 0 else None

    async def _sleep(self, wait_s: float) -> None:
        """Sleep `wait_s` (inf: no timer), or until next() frees bytes or the clock starts."""
        wake(self._primed)
        loop = asyncio.get_running_loop()
        self._wake_builder = fut = loop.create_future()
        timer = loop.call_later(wait_s, wake, fut) if wait_s != math.inf else None
        try:
            await fut
        finally:
            if timer is not None:
                timer.cancel()
            self._wake_builder = None


def _cost(req: Request) -> int:
    return _REQUEST_BYTES + _TOKEN_BYTES * req.input_tokens


def wake(fut: asyncio.Future[None] | None) -> None:
    """Resolve `fut` unless it is gone or already resolved (a wake-up that may come twice)."""
    if fut is not None and not fut.done():
        fut.set_result(None)
