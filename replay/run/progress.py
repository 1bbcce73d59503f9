"""A one-line live progress display on stderr; off when not a TTY or with --quiet. Never a result."""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from replay.stats import histogram as H


class Progress:
    def __init__(self, run: Any, planned_s: float | None, offered_rate: float | None) -> None:
        self.run = run
        self.planned_s = planned_s
        self.offered = offered_rate
        self._task: asyncio.Task[None] | None = None

    @staticmethod
    def wanted(quiet: bool) -> bool:
        return not quiet and sys.stderr.isatty()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            sys.stderr.write("\n")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            sys.stderr.write("\r" + self.line() + "\x1b[K")
            sys.stderr.flush()

    def line(self) -> str:
        run = self.run
        st = run.engine.state
        elapsed = time.perf_counter() - run.t0
        done = run.recorder.counts.ok
        rate = done / elapsed if elapsed > 0 else 0.0
        ttft = H.summary_ms(run.recorder.interval["ttft"])
        remaining = f"/{self.planned_s:.0f}s" if self.planned_s else "s"
        offered = f"{self.offered:g}" if self.offered else "?"
        p50 = "-" if ttft["p50"] is None else f"{ttft['p50']:.0f}"
        p99 = "-" if ttft["p99"] is None else f"{ttft['p99']:.0f}"
        return (
            f"{elapsed:6.0f}{remaining}  rate {rate:6.1f}/{offered} req/s  in-flight {st.in_flight:4d}"
            f"  ttft p50/p99 {p50}/{p99} ms  ok {done}  errors {st.errors}"
        )
