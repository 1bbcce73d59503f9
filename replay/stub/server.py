"""OpenAI-compatible stub server with a known token schedule, for tests and benchmarks.

Each streamed request gets its first content chunk at `admit + ttft` and chunk j at
`admit + ttft + j*k*itl` (k = tokens per chunk), on an absolute schedule, so lateness never
accumulates; `admit` is when the request was received, or when it left the FIFO queue under
`max_concurrency` (known, injected queueing). The stub records what it really wrote (see
truth.py): GET /stub/truth gives counts and HDR percentiles (with ?detail=1 also one record per
request: receipt, admission, first token written, end, tokens, and the client's `request_id` body
field or X-Request-Id header, so a test pairs its records with the stub's), POST /stub/reset clears them.

    python -m replay.stub.server --port 8000 --ttft-ms 20 --itl-ms 5 [--tokens-per-chunk K]
        [--ttft-jitter-ms J] [--max-concurrency C] [--usage/--no-usage] [--continuous-usage] [--vllm]
        [--fault SPEC:PROB]

Routes: /v1/models, /v1/completions, /v1/chat/completions (streamed or not), /health,
/metrics (a few vLLM gauges), /version (with --vllm only), /stub/truth, /stub/reset.
Faults (truth.Fault) come from an `x-stub-fault` request header, a per-request hook
(tests) or `--fault` probabilities.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import select
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson

from replay.core.errors import ReplayError
from replay.stub.core import StubServer
from replay.stub.stream import StubConfig
from replay.stub.truth import Fault, Truth, parse_fault_rule

__all__ = ["Fault", "StubConfig", "StubProcess", "StubServer", "Truth", "main", "start_stub"]

# ---- running it ------------------------------------------------------------------------------------------


@asynccontextmanager
async def start_stub(cfg: StubConfig | None = None, host: str = "127.0.0.1", port: int = 0,
                     **overrides: Any) -> AsyncIterator[StubServer]:  # fmt: skip
    """Serve in the running loop: `async with start_stub(ttft_s=0.02) as stub: stub.base_url, stub.truth`."""
    if cfg is None:
        cfg = StubConfig(**overrides)
    elif overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    server = StubServer(cfg)
    await server.start(host, port)
    try:
        yield server
    finally:
        await server.close()


class StubProcess:
    """The stub in a child process (its own core and loop), e.g. for benchmarks:
    `with StubProcess(["--ttft-ms", "20"]) as p: p.base_url`."""

    def __init__(self, args: list[str] | None = None, python: str = sys.executable,
                 ready_s: float = 20.0) -> None:  # fmt: skip
        self.argv = [python, "-m", "replay.stub.server", "--port", "0", *(args or [])]
        self.ready_s = ready_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> StubProcess:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], self.ready_s)
        line = self.proc.stdout.readline() if ready else b""
        try:
            self.port = int(orjson.loads(line)["port"])
        except (ValueError, KeyError, TypeError):
            self.__exit__()
            cmd = " ".join(self.argv)
            raise ReplayError(f"stub server did not start: {cmd} printed {line[:200]!r}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _parse_args(argv: list[str] | None) -> tuple[StubConfig, str, int]:
    ap = argparse.ArgumentParser(prog="python -m replay.stub.server", description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on stdout)")
    ap.add_argument("--ttft-ms", type=float, default=20.0)
    ap.add_argument("--itl-ms", type=float, default=5.0)
    ap.add_argument("--ttft-jitter-ms", type=float, default=0.0,
                    help="delay each first token by an exponential draw of this mean (seeded)")  # fmt: skip
    ap.add_argument("--tokens-per-chunk", type=int, default=1)
    ap.add_argument("--max-concurrency", type=int, default=0, help="0: unlimited; beyond it, FIFO queue")
    ap.add_argument("--usage", action=argparse.BooleanOptionalAction, default=True,
                    help="honour stream_options.include_usage")  # fmt: skip
    ap.add_argument("--continuous-usage", action="store_true", help="honour continuous_usage_stats (vLLM)")
    ap.add_argument("--vllm", action="store_true", help="look like vLLM: GET /version, owned_by vllm")
    ap.add_argument("--model", default="stub-model")
    ap.add_argument("--model-ttft-ms", action="append", default=[], metavar="NAME=MS",
                    help="serve model NAME too, first token MS after admission (repeatable)")  # fmt: skip
    ap.add_argument("--spin-ms", type=float, default=1.0, help="poll the loop this long before each write")
    ap.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC:PROB",
        help="fault with a probability: reset@3:0.01, http_500:0.05, stall@2:1.5:0.1",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--api-key", default=None, help="require this bearer key on /v1/* (like vLLM --api-key)")
    ap.add_argument("--vocab-size", type=int, default=0,
                    help="refuse prompt token ids >= N with HTTP 400, as vLLM does (0: any id)")  # fmt: skip
    a = ap.parse_args(argv)
    cfg = StubConfig(ttft_s=a.ttft_ms / 1e3, itl_s=a.itl_ms / 1e3, ttft_jitter_s=a.ttft_jitter_ms / 1e3,
                     tokens_per_chunk=a.tokens_per_chunk,
                     max_concurrency=a.max_concurrency, usage=a.usage, continuous_usage=a.continuous_usage,
                     vllm=a.vllm, model=a.model, model_ttft=_model_ttft(a.model_ttft_ms),
                     spin_s=a.spin_ms / 1e3,
                     faults=tuple(parse_fault_rule(f) for f in a.fault), seed=a.seed,
                     api_key=a.api_key, vocab_size=a.vocab_size)  # fmt: skip
    return cfg, a.host, a.port


def _model_ttft(items: list[str]) -> tuple[tuple[str, float], ...]:
    out = []
    for item in items:
        name, _, ms = item.partition("=")
        try:
            v = float(ms) / 1e3
        except ValueError:
            v = -1.0
        if not name or not v >= 0:
            raise ReplayError(f"--model-ttft-ms: {item!r}: expected NAME=MS, e.g. adapter-a=80")
        out.append((name, v))
    return tuple(out)


async def _serve(cfg: StubConfig, host: str, port: int) -> None:
    server = StubServer(cfg)
    port = await server.start(host, port)
    print(orjson.dumps({"event": "listening", "host": host, "port": port}).decode(), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, host, port = _parse_args(argv)
        import uvloop

        uvloop.run(_serve(cfg, host, port))
    except ReplayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"error: cannot listen: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
