"""An in-process target with an exact token schedule, for engine and recorder tests.

First token `ttft_s` after the request is admitted, then one chunk of `tokens_per_chunk` tokens
every `itl_s * tokens_per_chunk`; at most `max_concurrency` requests are served at once and the
rest queue FIFO (injecting known queueing). No sockets: timing truth is exact up to the event
loop's timer resolution.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from replay.core.request import Request, RequestRecord


class FakeTarget:
    name = "fake"
    vocab_size = 1000

    def __init__(
        self,
        ttft_s: float = 0.02,
        itl_s: float = 0.005,
        tokens_per_chunk: int = 1,
        max_concurrency: int | None = None,
        fail_every: int = 0,
    ) -> None:
        self.ttft_s = ttft_s
        self.itl_s = itl_s
        self.tokens_per_chunk = tokens_per_chunk
        self.max_concurrency = max_concurrency
        self.fail_every = fail_every
        self._sem: asyncio.Semaphore | None = None
        self.served = 0
        self.started = False
        self.closed = False

    async def start(self) -> None:
        self._sem = asyncio.Semaphore(self.max_concurrency) if self.max_concurrency else None
        self.started = True

    async def close(self) -> None:
        self.closed = True

    def describe(self) -> dict[str, Any]:
        return {"kind": "fake", "ttft_s": self.ttft_s, "itl_s": self.itl_s}

    async def send(self, request: Request, record: RequestRecord) -> None:
        if self._sem is None:
            await self._serve(request, record)
            return
        async with self._sem:
            await self._serve(request, record)

    async def _serve(self, request: Request, record: RequestRecord) -> None:
        self.served += 1
        if self.fail_every and self.served % self.fail_every == 0:
            record.status = "error"
            record.error = "http_500"
            record.end_s = time.perf_counter()
            return
        start = time.perf_counter()
        n = request.output_tokens
        k = self.tokens_per_chunk
        sent = 0
        while sent < n:
            step = min(k, n - sent)
            due = start + self.ttft_s + sent * self.itl_s  # chunk j at ttft + j*K*itl, as the stub
            # Loop timers can fire up to 1 ms early; the truth must never be early.
            while (delay := due - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            record.add_chunk(time.perf_counter(), step)
            sent += step
        record.usage_output_tokens = n
        record.usage_input_tokens = request.input_tokens
        record.end_s = time.perf_counter()
