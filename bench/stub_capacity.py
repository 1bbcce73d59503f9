"""How many token writes a second the stub server sustains on one core while staying on schedule.

    PYTHONPATH=. python bench/stub_capacity.py [--rates 100,200,300,400] [--seconds 10] [--tokens 128]

The stub runs in its own process (uvloop, one core); this process drives it open-loop at a
constant request rate with a raw-socket client that only counts bytes, so the client costs far
less than the stub. Each level resets the stub's truth, runs, drains, and reads GET /stub/truth:
the stub's own record of how late each write was and the ITL it actually served. A level passes
when served ITL p99 stays within 1 ms of the schedule's ITL and no write went into a full socket
buffer (the client kept up, so write times are delivery times).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import urllib.request
from typing import Any

import orjson
import uvloop

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from replay.stub.server import StubProcess  # noqa: E402

_END = b"\r\n0\r\n\r\n"


class _Conn(asyncio.Protocol):
    """A keep-alive connection that sends one streaming request at a time and counts what comes back."""

    def __init__(self, idle: list[_Conn], stats: dict[str, int]) -> None:
        self.idle = idle
        self.stats = stats
        self.tail = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.stats["bytes"] += len(data)
        self.tail = (self.tail + data)[-len(_END) :]
        if self.tail == _END:
            self.tail = b""
            self.stats["done"] += 1
            self.idle.append(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats["lost"] += 1


async def drive(port: int, rate: float, seconds: float, request: bytes) -> dict[str, int]:
    loop = asyncio.get_running_loop()
    idle: list[_Conn] = []
    stats = {"sent": 0, "done": 0, "bytes": 0, "lost": 0, "opened": 0, "late_sends": 0}
    t0 = time.perf_counter() + 0.05
    n = int(rate * seconds)
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.002:
            stats["late_sends"] += 1
        if idle:
            conn = idle.pop()
        else:
            _, conn = await loop.create_connection(lambda: _Conn(idle, stats), "127.0.0.1", port)
            stats["opened"] += 1
        assert conn.transport is not None
        conn.transport.write(request)
        stats["sent"] += 1
    deadline = time.perf_counter() + 30
    while stats["done"] < n and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    return stats


def http(port: int, method: str, path: str) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    with urllib.request.urlopen(req, timeout=30) as r:
        return orjson.loads(r.read())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rates", default="100,200,300,400,500")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--ttft-ms", type=float, default=20.0)
    ap.add_argument("--itl-ms", type=float, default=5.0)
    ap.add_argument("--spin-ms", type=float, default=1.0)
    ap.add_argument("--stub-cpu", type=int, default=None, help="pin the stub to this CPU")
    a = ap.parse_args()
    opts = {"include_usage": True, "continuous_usage_stats": True}
    body = orjson.dumps({"model": "stub-model", "prompt": [1] * 64, "max_tokens": a.tokens, "stream": True,
                         "stream_options": opts})  # fmt: skip
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
    args = ["--ttft-ms", str(a.ttft_ms), "--itl-ms", str(a.itl_ms), "--vllm", "--continuous-usage",
            "--spin-ms", str(a.spin_ms)]  # fmt: skip
    with StubProcess(args) as p:
        if a.stub_cpu is not None:
            os.sched_setaffinity(p.proc.pid, {a.stub_cpu})  # type: ignore[union-attr]
        for rate in [float(r) for r in a.rates.split(",")]:
            http(p.port, "POST", "/stub/reset")
            cpu0 = _proc_cpu(p.proc.pid)  # type: ignore[union-attr]
            w0 = time.perf_counter()
            stats = uvloop.run(drive(p.port, rate, a.seconds, request))
            wall = time.perf_counter() - w0
            cpu = _proc_cpu(p.proc.pid) - cpu0  # type: ignore[union-attr]
            t = http(p.port, "GET", "/stub/truth")
            itl, late, ttft = t["itl_ms"], t["late_ms"], t["ttft_ms"]
            ok = itl["p99"] is not None and itl["p99"] <= a.itl_ms + 1.0 and t["writes_while_paused"] == 0
            row = {
                "rate": rate,
                "token_writes_per_s": round(t["chunks"] / a.seconds),
                "served": t["served"],
                "sent": stats["sent"],
                "conns": stats["opened"],
                "client_late_sends": stats["late_sends"],
                "stub_cpu_frac": round(cpu / wall, 2),
                "stub_cpu_us_per_write": round(cpu / max(t["chunks"], 1) * 1e6, 1),
                "ttft_p99": ttft["p99"],
                "paused_writes": t["writes_while_paused"],
                "pass": ok,
                "loadavg_1m": round(os.getloadavg()[0], 2),
            }
            row.update({f"itl_{k}": itl[k] for k in ("p50", "p99", "p99.9", "max")})
            row.update({f"late_{k}": late[k] for k in ("p50", "p99", "p99.9", "max")})
            print(orjson.dumps(row).decode(), flush=True)
    return 0


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    sys.exit(main())
