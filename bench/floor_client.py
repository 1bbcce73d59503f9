"""The floor: the least a streaming load client can do, to show what measurement error is unavoidable.

    python bench/floor_client.py --url http://127.0.0.1:PORT --rate 100 --seconds 30 --tokens 128

Open-loop Poisson arrivals on an absolute timeline, one raw asyncio Protocol per connection (uvloop,
keep-alive pool), the HTTP/1.1 chunked body scanned for SSE events with bytes.find only. Per request
it keeps the send time and the time of each read that completed a token event; nothing else: no
histograms, no files, no JSON parsing. Percentiles at the end with numpy (exact order statistics).
One probe like replay's self-check measures its loop lag (max), to tell the machine's and the
stub's share of replay's stalls from replay's own. Prints one JSON object. Not part of replay: a yardstick of our own, written for the benchmark only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import time
from urllib.parse import urlsplit

import numpy as np
import uvloop

perf = time.perf_counter


class Stream(asyncio.Protocol):
    """One keep-alive connection; `start()` sends a request and returns a future of its token times."""

    def __init__(self, pool: list[Stream]) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.times: list[float] = []
        self.done: asyncio.Future[list[float]] | None = None
        self.headers_seen = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def start(self, request: bytes) -> asyncio.Future[list[float]]:
        self.buf, self.times, self.headers_seen = b"", [], False
        self.done = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(request)
        return self.done

    def data_received(self, data: bytes) -> None:
        t = perf()
        buf = self.buf + data
        if not self.headers_seen:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                self.buf = buf
                return
            self.headers_seen = True
            buf = buf[i + 4 :]
        # Count token events ('"text"' inside a data line), one timestamp per event in this read.
        n = buf.count(b'"text"')
        self.times.extend([t] * n)
        if b"[DONE]" in buf:
            self.buf = b""
            if self.done is not None and not self.done.done():
                self.done.set_result(self.times)
                self.pool.append(self)
            return
        # Keep a tail that may hold half of a '"text"' marker.
        cut = max(0, len(buf) - 8)
        self.buf = buf[cut:].replace(b'"text"', b"")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError("closed"))
        if self in self.pool:
            self.pool.remove(self)


async def one(loop: asyncio.AbstractEventLoop, host: str, port: int, pool: list[Stream], request: bytes,
              out: list[tuple[float, list[float]]]) -> None:  # fmt: skip
    conn = pool.pop() if pool else None
    if conn is None:
        _, conn = await loop.create_connection(lambda: Stream(pool), host, port)
    sent = perf()
    times = await conn.start(request)
    out.append((sent, times))


async def main_async(a: argparse.Namespace) -> dict[str, object]:
    u = urlsplit(a.url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    body = json.dumps({"model": a.model, "prompt": [7] * a.input_tokens, "max_tokens": a.tokens,
                       "stream": True, "ignore_eos": True}).encode()  # fmt: skip
    request = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body  # fmt: skip
    rng = random.Random(a.seed)
    arrivals, t = [], 0.0
    while True:
        t += rng.expovariate(a.rate)
        if t >= a.seconds:
            break
        arrivals.append(t)
    loop = asyncio.get_running_loop()
    pool: list[Stream] = []
    out: list[tuple[float, list[float]]] = []
    tasks = []
    lags: list[float] = []
    running = True

    async def lag_probe() -> None:
        """The same probe as replay's self-check (10 ms sleeps, their overshoot): what the loop of a
        client doing the least shows of the machine and the stub's clumped writes."""
        while running:
            t = perf()
            await asyncio.sleep(0.01)
            lags.append(perf() - t - 0.01)

    probe = loop.create_task(lag_probe())
    t0 = perf() + 0.05
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    for at in arrivals:
        delay = t0 + at - perf()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(loop, host, port, pool, request, out)))
    res = await asyncio.gather(*tasks, return_exceptions=True)
    wall = perf() - t0
    running = False
    await probe
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    ttft = np.array([(ts[0] - s) * 1e3 for s, ts in out if ts])
    itl = np.concatenate([np.diff(ts) * 1e3 for _, ts in out if len(ts) > 1]) if out else np.array([])
    ok = sum(1 for r in res if not isinstance(r, BaseException))
    return {
        "scheduled": len(arrivals), "ok": ok, "req_s": round(ok / wall, 3),
        "tok_s": round(sum(len(ts) for _, ts in out) / wall, 1),
        "ttft_p50": round(float(np.percentile(ttft, 50)), 3), "ttft_p99": round(float(np.percentile(ttft, 99)), 3),
        "itl_p50": round(float(np.percentile(itl, 50)), 3), "itl_p99": round(float(np.percentile(itl, 99)), 3),
        "client_cpu": round(100 * cpu / wall, 1),
        "loop_lag_max": round(max(lags) * 1e3, 3) if lags else None,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--input-tokens", type=int, default=32)
    ap.add_argument("--model", default="stub")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    os.environ.setdefault("PYTHONHASHSEED", "0")
    print(json.dumps(uvloop.run(main_async(a))))


if __name__ == "__main__":
    main()
