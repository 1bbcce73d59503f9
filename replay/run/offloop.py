"""A run's periodic work off the event loop: one worker thread, one job at a time.

Why: closing an interval (adding to the run totals, HDR encoding and compression, the timeseries
row, drift, file writes) took ~35 ms on the loop, and every stream in flight then read its tokens
that much late. On the loop only an O(1) swap of histogram sets remains; the rest runs here. A
Python thread still needs the GIL, which the interpreter hands back to a waiting thread only every
`sys.getswitchinterval()` (5 ms by default), so while a job runs the interval is 0.5 ms: the loop
waits at most that long for the GIL. zlib and numpy release the GIL in their heavy parts anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
JOB_SWITCH_INTERVAL_S = 0.0005

_switch_lock = threading.Lock()
_switch_users = 0
_switch_saved = 0.0


@contextlib.contextmanager
def short_switch_interval() -> Iterator[None]:
    """The short GIL switch interval while any off-loop job runs. The interval is process-wide and
    several threads use this (interval closes, the live display), so it is counted: the first user
    saves the interval, the last one restores it (a plain save/restore per thread would race)."""
    global _switch_users, _switch_saved
    with _switch_lock:
        if _switch_users == 0:
            _switch_saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_switch_saved, JOB_SWITCH_INTERVAL_S))
        _switch_users += 1
    try:
        yield
    finally:
        with _switch_lock:
            _switch_users -= 1
            if _switch_users == 0:
                sys.setswitchinterval(_switch_saved)


def _job(fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    with short_switch_interval():
        return fn(*args)


class OffLoop:
    def __init__(self, name: str = "replay-offloop") -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._last: asyncio.Future[Any] | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the worker thread. Cancelling the caller does not cancel the job: it
        finishes, and `idle()` waits for it (a half-written interval is never left behind)."""
        fut = asyncio.get_running_loop().run_in_executor(self._pool, _job, fn, args)
        self._last = fut
        return await asyncio.shield(fut)

    async def idle(self) -> None:
        """Wait for the job in progress, if any (its error, if any, was the caller's to see)."""
        if self._last is not None:
            await asyncio.gather(self._last, return_exceptions=True)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
