"""The stub server's core: HTTP routes and one scheduler for every stream (see server.py).

Each streamed request gets its first content chunk at `admit + ttft` and chunk j at
`admit + ttft + j*k*itl` (k = tokens per chunk), on an absolute schedule, so lateness never
accumulates; `admit` is when the request was received, or when it left the FIFO queue under
`max_concurrency`. The stub records what it really wrote (see `truth.py`), served at
GET /stub/truth and cleared by POST /stub/reset.

Built to stay honest at tens of thousands of token writes a second on one core: a raw
asyncio.Protocol speaking just enough HTTP/1.1 (keep-alive, chunked responses), event bytes
assembled from pre-encoded pieces, and one scheduler for all streams: a heap of
(due, seq, stream) behind a single loop timer, instead of a coroutine and a sleep per token.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import random
import time
from collections import deque
from typing import Any

import orjson

from replay.core.errors import ReplayError
from replay.stub.protocol import Conn, error_body
from replay.stub.stream import FINAL, TOKEN, Stream, StubConfig, content_event, out_of_vocab
from replay.stub.stream import http_chunk as _http_chunk
from replay.stub.stream import parse_request as _parse_request
from replay.stub.truth import Fault, Truth

_INF = float("inf")
_STREAM_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
                b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")  # fmt: skip


def _request_id(req: dict[str, Any], headers: dict[bytes, bytes]) -> str | None:
    """The client's own id for the request, as vLLM takes it (`request_id` in the body, or the
    `X-Request-Id` header), kept in the per-request truth so a test can pair its records one to one."""
    rid = req.get("request_id")
    if rid is not None:
        return str(rid)
    hdr = headers.get(b"x-request-id")
    return hdr.decode("latin-1") if hdr else None


class StubServer:
    def __init__(self, cfg: StubConfig) -> None:
        if cfg.tokens_per_chunk < 1 or min(cfg.ttft_s, cfg.itl_s, cfg.ttft_jitter_s, cfg.max_concurrency) < 0:
            raise ReplayError("stub: tokens_per_chunk >= 1; ttft, itl, jitter, max_concurrency >= 0 required")
        self.cfg = cfg
        self.truth = Truth()
        self.port = 0
        self.host = "127.0.0.1"
        self.conns: set[Conn] = set()
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._heap: list[tuple[float, int, Stream]] = []
        self._seq = itertools.count()
        self._timer: asyncio.Handle | None = None
        self._armed = _INF
        self._running = False
        self._active = 0
        self._queue: deque[Stream] = deque()
        self._index = 0
        self._rng = random.Random(cfg.seed)
        self._jitter = random.Random(f"ttft-jitter-{cfg.seed}")  # its own stream: faults draw the same
        self._created = int(time.time())
        self._model_json = orjson.dumps(cfg.model)
        self._ttft_by_model = dict(cfg.model_ttft)
        self._auth = None if cfg.api_key is None else b"Bearer " + cfg.api_key.encode()

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._loop = asyncio.get_running_loop()
        self._server = await self._loop.create_server(lambda: Conn(self), host, port, backlog=4096)
        self.host = host
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._server is not None:
            self._server.close()
            for conn in list(self.conns):
                conn.transport.abort()
            await self._server.wait_closed()

    # ---- HTTP routes -------------------------------------------------------------------------------------

    def handle(self, conn: Conn, method: bytes, path: bytes, query: bytes, headers: dict[bytes, bytes],
               body: bytes, t_recv: float, keep_alive: bool) -> None:  # fmt: skip
        auth = self._auth
        if auth is not None and path.startswith(b"/v1/") and headers.get(b"authorization") != auth:
            conn.respond(401, b'{"error":"Unauthorized"}', keep_alive)
        elif method == b"POST" and path in (b"/v1/completions", b"/v1/chat/completions"):
            self._generate(conn, path == b"/v1/chat/completions", headers, body, t_recv, keep_alive)
        elif method == b"GET" and path == b"/v1/models":
            owner = "vllm" if self.cfg.vllm else "stub"
            data = [{"id": m, "object": "model", "created": self._created, "owned_by": owner, "root": m,
                     "max_model_len": 1 << 20} for m in (self.cfg.model, *self._ttft_by_model)]  # fmt: skip
            conn.respond(200, orjson.dumps({"object": "list", "data": data}), keep_alive)
        elif method == b"GET" and path == b"/health":
            conn.respond(200, b"", keep_alive, b"text/plain")
        elif method == b"GET" and path == b"/version" and self.cfg.vllm:
            conn.respond(200, b'{"version":"0.0.0+stub"}', keep_alive)
        elif method == b"GET" and path == b"/metrics":
            conn.respond(200, self._metrics(), keep_alive, b"text/plain; version=0.0.4")
        elif method == b"GET" and path == b"/stub/truth":
            out = self.truth.summary(detail=b"detail=1" in query)
            out["config"] = {"ttft_ms": self.cfg.ttft_s * 1e3, "itl_ms": self.cfg.itl_s * 1e3,
                             "ttft_jitter_ms": self.cfg.ttft_jitter_s * 1e3,
                             "tokens_per_chunk": self.cfg.tokens_per_chunk,
                             "max_concurrency": self.cfg.max_concurrency}  # fmt: skip
            conn.respond(200, orjson.dumps(out), keep_alive)
        elif method == b"POST" and path == b"/stub/reset":
            self.truth.reset()
            conn.respond(200, b'{"reset":true}', keep_alive)
        else:
            conn.respond(404, b'{"detail":"Not Found"}', keep_alive)

    def _metrics(self) -> bytes:
        """The few vLLM gauges a scraper reads, so scrapers can be tested against the stub."""
        m = self.cfg.model
        return (
            f'# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{model_name="{m}"}} '
            f"{self._active}\n"
            f'# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting{{model_name="{m}"}} '
            f"{len(self._queue)}\n"
            f'# TYPE vllm:generation_tokens_total counter\nvllm:generation_tokens_total{{model_name="{m}"}} '
            f"{self.truth.tokens}\n"
        ).encode()

    def _generate(self, conn: Conn, chat: bool, headers: dict[bytes, bytes], body: bytes, t_recv: float,
                  keep_alive: bool) -> None:  # fmt: skip
        self.truth.received += 1
        index = self._index
        self._index += 1
        try:
            req, prompt_tokens = _parse_request(body, chat, count_only=not self.cfg.vocab_size)
            n = int(req.get("max_tokens") or req.get("max_completion_tokens") or 16)
        except (ValueError, TypeError) as exc:
            conn.respond(400, error_body(400, f"bad request: {exc}"), keep_alive)
            return
        model = req.get("model")
        if model is not None and model != self.cfg.model and model not in self._ttft_by_model:
            conn.respond(404, error_body(404, f"The model `{model}` does not exist."), keep_alive)
            return
        if n < 1:
            conn.respond(400, error_body(400, "max_tokens must be at least 1"), keep_alive)
            return
        oov = out_of_vocab(req, self.cfg.vocab_size)
        if oov is not None:
            self.truth.out_of_vocab += 1
            conn.respond(400, error_body(400, oov), keep_alive)
            return
        fault = self._pick_fault(index, req, headers)
        if fault is not None:
            self.truth.faults[fault.label()] += 1
            if fault.kind == "http":
                msg = f"stub fault: HTTP {fault.status}"
                conn.respond(fault.status, error_body(fault.status, msg), keep_alive)
                return
        s = Stream(conn, t_recv, keep_alive)
        s.n, s.chat, s.prompt_tokens, s.fault = n, chat, prompt_tokens, fault
        s.request_id = _request_id(req, headers)
        s.ttft_s = self._ttft_by_model.get(model, self.cfg.ttft_s)
        self.truth.by_model[model or self.cfg.model] += 1
        s.stream = bool(req.get("stream"))
        opts = req.get("stream_options") or {}
        s.usage = s.stream and self.cfg.usage and bool(opts.get("include_usage"))
        s.continuous = s.usage and self.cfg.continuous_usage and bool(opts.get("continuous_usage_stats"))
        kind = b"chat.completion.chunk" if chat else b"text_completion"
        s.head = b'{"id":"%s-%d","object":"%s","created":%d,"model":%s,"choices":[' % (
            b"chatcmpl" if chat else b"cmpl",
            index,
            kind,
            self._created,
            self._model_json,
        )
        conn.stream = s
        if self.cfg.max_concurrency and self._active >= self.cfg.max_concurrency:
            self._queue.append(s)
        else:
            self._admit(s, t_recv)

    def _pick_fault(self, index: int, req: dict[str, Any], headers: dict[bytes, bytes]) -> Fault | None:
        spec = headers.get(b"x-stub-fault")
        if spec:
            return Fault.parse(spec.decode("latin-1"))
        if self.cfg.fault_hook is not None:
            hooked = self.cfg.fault_hook(index, req)
            if hooked is not None:
                return hooked
        for fault, p in self.cfg.faults:
            if self._rng.random() < p:
                return fault
        return None

    # ---- scheduling --------------------------------------------------------------------------------------

    def _admit(self, s: Stream, now: float) -> None:
        self._active += 1
        s.admitted = True
        s.t_admit = s.base = now
        if self.cfg.ttft_jitter_s:
            s.base += self._jitter.expovariate(1.0 / self.cfg.ttft_jitter_s)
        self.truth.queue.record_value(int((now - s.t_recv) * 1e6))
        if s.stream:
            s.conn.write(_STREAM_HEAD)
            self._push(s.base + s.ttft_s, s)
        else:
            self._push(s.base + s.ttft_s + (s.n - 1) * self.cfg.itl_s, s)

    def _release(self) -> None:
        self._active -= 1
        cap = self.cfg.max_concurrency
        while self._queue and (not cap or self._active < cap):
            s = self._queue.popleft()
            if not s.dead:
                self._admit(s, time.perf_counter())

    def _push(self, due: float, s: Stream) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), s))
        if not self._running and due < self._armed:
            self._arm(due)

    def _arm(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed = due
        assert self._loop is not None
        delay = due - time.perf_counter() - self.cfg.spin_s
        loop = self._loop
        self._timer = loop.call_later(delay, self._run) if delay > 0 else loop.call_soon(self._run)

    def _run(self) -> None:
        self._timer = None
        self._armed = _INF
        self._running = True
        heap = self._heap
        now = time.perf_counter()
        # Behind schedule, work off the backlog in slices of at most 2 ms, so incoming requests are
        # still read (and stamped) on time instead of waiting behind the whole backlog.
        until = now + 0.002
        try:
            while heap and heap[0][0] <= now and now < until:
                due, _, s = heapq.heappop(heap)
                if not s.dead:
                    if s.stream and self.cfg.itl_s == 0 and s.fault is None:
                        self._emit_burst(s, due, now)
                    elif s.stream:
                        self._emit(s, due, now)
                    else:
                        self._emit_whole(s, due, now)
                now = time.perf_counter()
        finally:
            self._running = False
        if heap:
            self._arm(heap[0][0])

    def _emit(self, s: Stream, due: float, now: float) -> None:
        """Write the next content chunk of `s` (plus the ending, if last) and schedule the one after."""
        cfg = self.cfg
        k = min(cfg.tokens_per_chunk, s.n - s.sent)
        fault = s.fault
        at_fault = fault is not None and s.sent == fault.at_chunk * cfg.tokens_per_chunk
        if at_fault and self._fault(s, fault, due):  # type: ignore[arg-type]
            return
        first = s.sent == 0
        out = content_event(s, s.sent + k)
        s.sent += k
        last = s.sent >= s.n
        c = s.sent
        if last:
            if s.usage:
                out += FINAL % (s.head, s.prompt_tokens, s.prompt_tokens + c, c)
            out += b"data: [DONE]\n\n"
            s.conn.write(_http_chunk(out) + b"0\r\n\r\n")
        else:
            s.conn.write(_http_chunk(out))
        if s.conn.paused:
            self.truth.writes_while_paused += 1
        self.truth.chunk(now, due, s.t_prev, s.t_recv, k)
        if first:
            s.t_first = now
        s.t_prev = now
        if last:
            self.truth.served += 1
            self._end(s, now)
        else:
            self._push(s.base + s.ttft_s + c * cfg.itl_s, s)

    def _emit_burst(self, s: Stream, due: float, now: float) -> None:
        """ITL 0: every remaining event (chunk by chunk, as `_emit` shapes them) in one write. A burst
        of 256 events written one by one costs the stub 256 syscalls, and at 1,000 req/s it, not the
        client under test, would set the pace."""
        events: list[bytes] = []
        k = self.cfg.tokens_per_chunk
        first = s.sent == 0
        n_chunks = 0
        while s.sent < s.n:
            c = min(s.sent + k, s.n)
            events.append(content_event(s, c))
            s.sent = c
            n_chunks += 1
        if s.usage:
            events.append(FINAL % (s.head, s.prompt_tokens, s.prompt_tokens + s.n, s.n))
        events.append(b"data: [DONE]\n\n")
        s.conn.write(b"".join([_http_chunk(e) for e in events]) + b"0\r\n\r\n")
        if s.conn.paused:
            self.truth.writes_while_paused += 1
        self.truth.burst(now, due, s.t_prev, s.t_recv, n_chunks, k, s.n)
        if first:
            s.t_first = now
        s.t_prev = now
        self.truth.served += 1
        self._end(s, now)

    def _fault(self, s: Stream, fault: Fault, due: float) -> bool:
        """Apply a mid-stream fault before the chunk due now; True when the stream is over."""
        if fault.kind == "stall":
            s.fault = None  # once
            s.base += fault.stall_s
            self._push(due + fault.stall_s, s)
            return True
        if fault.kind == "reset":
            s.dead = True
            self._end(s, time.perf_counter())
            s.conn.transport.abort()
            return True
        if fault.kind == "malformed":
            s.conn.write(_http_chunk(b'data: {"choices":[{"text": broken\n\n') + b"0\r\n\r\n")
        elif fault.kind == "truncate":
            s.conn.write(b"0\r\n\r\n")
        self._end(s, time.perf_counter())
        return True

    def _emit_whole(self, s: Stream, due: float, now: float) -> None:
        text = (TOKEN * s.n).decode()
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
        if s.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        body = orjson.loads(s.head + b"]}")
        body["object"] = "chat.completion" if s.chat else "text_completion"
        body["choices"] = [choice]
        body["usage"] = {"prompt_tokens": s.prompt_tokens, "total_tokens": s.prompt_tokens + s.n,
                         "completion_tokens": s.n}  # fmt: skip
        s.conn.stream = None
        self.truth.late_us(int((now - due) * 1e6))
        self.truth.tokens += s.n
        self.truth.served += 1
        self._finish_truth(s, now)
        self._release()
        s.conn.respond(200, orjson.dumps(body), s.keep_alive)

    def _end(self, s: Stream, now: float) -> None:
        """The stream's last byte is written: free its slot and let the connection take the next request."""
        self._finish_truth(s, now)
        conn = s.conn
        conn.stream = None
        self._release()
        if not s.dead:
            conn.done(s.keep_alive)

    def _finish_truth(self, s: Stream, now: float) -> None:
        self.truth.e2e.record_value(int((now - s.t_recv) * 1e6))
        first = s.t_first if s.stream else now
        tokens = s.sent if s.stream else s.n
        self.truth.requests.append((s.t_recv, s.t_admit, first, now, tokens, s.request_id))
        self.truth.first_byte.append(s.t_head)
        self.truth.prompt_tokens.append(s.prompt_tokens)

    def lost(self, conn: Conn) -> None:
        """The client closed the connection; an unfinished stream stops and frees its slot."""
        s = conn.stream
        if s is None or s.dead:
            return
        s.dead = True
        conn.stream = None
        self.truth.disconnected += 1
        self.truth.lost.append((s.t_recv, time.perf_counter(), s.sent, s.request_id))
        if s.admitted:
            self._release()
