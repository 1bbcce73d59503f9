"""`replay record`: a reverse proxy in front of an OpenAI-compatible server that writes the traffic it
sees as a trace (our JSONL) for `replay run --trace` to replay later.

Responses go through unchanged and unbuffered: each piece of body the upstream sends is written to
the client as soon as it is read (`iter_any` -> `write`), and only then looked at (tap.py).
One thing may be altered, and only for a streamed generation request whose client did not ask for
usage: the proxy adds `stream_options.include_usage: true` to the upstream request (the body is
re-serialised) and removes the usage-only event the server then appends, so the trace gets the
server's token counts. The server may also change other bytes when asked for usage (vLLM leaves
`system_fingerprint` off the last content event; OpenAI adds `"usage": null` to every event);
those are passed on as they come. `inject_usage=False` alters nothing, and output tokens are then
counted as one per text event (marked `estimated`). A client that asked for usage, and every
other route (/v1/models, /health, /metrics, /version, ...), is passed through byte for byte.

Added latency, measured per piece of body: from the proxy reading it off the upstream to
`write()` returning (handed to the client's socket); the first piece of each response is kept
apart because it is the proxy's share of the client's TTFT.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from replay.capture.tap import ResponseTap
from replay.capture.to_trace import (
    ENDPOINTS,
    Encoder,
    OrderedTraceWriter,
    PrefixHasher,
    Prompt,
    parse_prompt,
    trace_line,
)
from replay.core.errors import ReplayError
from replay.stats import histogram as H
from replay.targets.http_config import is_loopback
from replay.trace.model import TraceRecord

# Hop-by-hop headers (RFC 9110 7.6.1) and those aiohttp recomputes; never forwarded as-is.
_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length",
})  # fmt: skip
CLIENT_CLOSED = 499  # nginx's code for a client that went away mid-response
BAD_GATEWAY = 502


@dataclass(frozen=True)
class ProxyConfig:
    upstream: str  # http://host:port (a trailing /v1 is dropped: paths are forwarded as they come)
    out: Path
    host: str = "127.0.0.1"
    port: int = 8081
    allow_remote: bool = False
    keep_prompts: bool = False
    block_size: int = 16
    tokenizer: str | None = None
    inject_usage: bool = True
    drain_timeout_s: float = 30.0
    connect_timeout_s: float = 10.0


def parse_listen(text: str) -> tuple[str, int]:
    """HOST:PORT, [V6]:PORT or PORT (loopback) -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        n = int(port)
        if not 0 <= n <= 65535:
            raise ValueError
    except ValueError:
        raise ReplayError(f"--listen: expected HOST:PORT, got {text!r}") from None
    return host, n


def _upstream_root(url: str) -> str:
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ReplayError(f"--upstream: expected an http:// or https:// URL, got {url!r}")
    return url[:-3] if url.endswith("/v1") else url


class RecordProxy:
    def __init__(self, cfg: ProxyConfig, encoder: Encoder | None = None) -> None:
        if not cfg.allow_remote and not is_loopback(cfg.host):
            raise ReplayError(
                f"--listen {cfg.host}: not a loopback address; the proxy would expose the upstream "
                "(and record others' traffic): give --allow-remote to mean it"
            )
        self.cfg = cfg
        self.upstream = _upstream_root(cfg.upstream)
        self.encoder = encoder
        self.hasher = PrefixHasher(cfg.block_size)
        self.writer: OrderedTraceWriter | None = None
        self.session: aiohttp.ClientSession | None = None
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.t0: float | None = None  # arrival of the first generation request (perf_counter)
        self.first_chunk = H.new()  # us: first body piece read from upstream -> written downstream
        self.chunk = H.new()  # us: every body piece
        self.request = H.new()  # us: request arrival -> forwarded upstream (body read, parsed)
        self.routes: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.usage_injected = 0
        self.usage_stripped = 0
        self.estimated = 0
        self.tasks: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"

    async def start(self) -> None:
        """Check the upstream answers, open the trace, listen. Errors are one line (ReplayError)."""
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=75.0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.connect_timeout_s),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
        try:
            await self._check_upstream()
            self.writer = OrderedTraceWriter(self.cfg.out, self._header())
            app = web.Application(client_max_size=256 << 20)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=self.cfg.drain_timeout_s)
            await self.runner.setup()
            site = web.TCPSite(self.runner, self.cfg.host, self.cfg.port)
            try:
                await site.start()
            except OSError as exc:
                where = f"{self.cfg.host}:{self.cfg.port}"
                raise ReplayError(f"--listen {where}: cannot listen: {exc.strerror}") from None
            self.port = self.runner.addresses[0][1]
        except BaseException:
            await self.close()
            raise

    async def _check_upstream(self) -> None:
        assert self.session is not None
        url = self.upstream + "/v1/models"
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=15)) as resp:
                await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            os_error = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else None
            if isinstance(os_error, ConnectionRefusedError):
                why = "connection refused"
            elif isinstance(exc, TimeoutError):
                why = "no answer within 15 s"
            else:
                why = f"{type(exc).__name__}: {exc}"
            raise ReplayError(f"--upstream {self.upstream}: unreachable ({why})") from None

    def _header(self) -> dict[str, Any]:
        return {
            "timed": True,
            "upstream": self.upstream,
            "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "block_size": self.cfg.block_size,
            "keep_prompts": self.cfg.keep_prompts,
            "usage_injection": self.cfg.inject_usage,
        }

    async def close(self) -> None:
        """Stop listening, let in-flight requests finish (up to drain_timeout_s), close the trace."""
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.writer is not None and not self.writer.closed:
            self.writer.close()
        if self.session is not None:
            await self.session.close()
            self.session = None

    # ---- forwarding ---------------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        arrival = time.perf_counter()
        endpoint = ENDPOINTS.get(request.path) if request.method == "POST" else None
        self.routes[endpoint or request.path] += 1
        if endpoint is None:
            resp, _ = await self._forward(request, arrival, await request.read(), None)
            return resp
        assert self.writer is not None
        if self.t0 is None:
            self.t0 = arrival
        slot = self.writer.slot()
        done = False
        try:
            resp = await self._generation(request, arrival, slot, endpoint)
            done = True
            return resp
        finally:
            if not done:
                self.writer.give_up(slot)  # cancelled at shutdown: nothing to record

    async def _generation(
        self, request: web.Request, arrival: float, slot: int, endpoint: str
    ) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            body = {}
        streaming = body.get("stream") is True
        opts = body.get("stream_options")
        asked = isinstance(opts, dict) and bool(opts.get("include_usage"))
        inject = self.cfg.inject_usage and streaming and not asked and bool(body)
        if inject:
            self.usage_injected += 1
            raw = orjson.dumps({**body, "stream_options": {**(opts or {}), "include_usage": True}})
        tap = ResponseTap(streaming, endpoint == "chat", strip_usage=inject)
        resp, status = await self._forward(request, arrival, raw, tap)
        self.usage_stripped += tap.stripped
        self.statuses[status] += 1
        task = asyncio.ensure_future(self._record(slot, arrival, endpoint, body, status, tap))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return resp

    async def _forward(
        self, request: web.Request, arrival: float, data: bytes, tap: ResponseTap | None
    ) -> tuple[web.StreamResponse, int]:
        """Send upstream, stream back. Returns the response and the status to record."""
        assert self.session is not None
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP]
        url = self.upstream + request.path_qs
        measure = tap is not None  # the added-latency figures are about generation requests
        if measure:
            H.record_seconds(self.request, time.perf_counter() - arrival)
        try:
            up = await self.session.request(
                request.method, url, data=data or None, headers=headers, allow_redirects=False
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            msg = f"replay record: upstream {self.upstream} unreachable: {type(exc).__name__}: {exc}"
            err = {"error": {"message": msg, "type": "BadGateway", "code": BAD_GATEWAY}}
            return web.json_response(err, status=BAD_GATEWAY), BAD_GATEWAY
        status = up.status
        try:
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            for k, v in up.headers.items():
                if k.lower() not in _HOP:
                    resp.headers.add(k, v)
            if up.content_length is not None and not (tap and tap.strip):
                resp.content_length = up.content_length
            if tap is not None and up.headers.get("Content-Encoding", "identity") != "identity":
                tap.unparsed, tap = True, None  # compressed: passed through, not read
            await resp.prepare(request)
            status = await self._pipe(up, resp, tap, status, measure)
            await resp.write_eof()
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            status = CLIENT_CLOSED
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            status = BAD_GATEWAY  # upstream broke mid-body: the client sees the same cut
            if request.transport is not None:
                request.transport.abort()
        finally:
            up.close()
        return resp, status

    async def _pipe(
        self,
        up: aiohttp.ClientResponse,
        resp: web.StreamResponse,
        tap: ResponseTap | None,
        status: int,
        measure: bool,
    ) -> int:
        perf = time.perf_counter
        first = measure
        strip = tap is not None and tap.strip
        async for piece in up.content.iter_any():
            t = perf()
            out = tap.filter(piece) if strip else piece  # type: ignore[union-attr]
            if out:
                await resp.write(out)
            dt = perf() - t
            if measure:
                H.record_seconds(self.chunk, dt)
            if first:
                H.record_seconds(self.first_chunk, dt)
                first = False
            if tap is not None and not strip:
                tap.observe(piece)
        if tap is not None:
            rest = tap.finish()
            if rest:
                await resp.write(rest)
            if tap.error_status is not None and status < 400:
                return tap.error_status  # an error event inside a 200 stream
        return status

    # ---- recording ----------------------------------------------------------------------------------------

    async def _record(
        self, slot: int, arrival: float, endpoint: str, body: dict[str, Any], status: int, tap: ResponseTap
    ) -> None:
        assert self.writer is not None and self.t0 is not None
        prompt = parse_prompt("/v1/chat/completions" if endpoint == "chat" else "/v1/completions", body)
        ids = prompt.token_ids
        if ids is None and self.encoder is not None and not prompt.batched:
            ids = await asyncio.to_thread(self.encoder, prompt)
        out_tokens, estimated = tap.output_tokens()
        in_tokens = tap.prompt_tokens()
        if prompt.token_ids is not None:
            in_tokens = len(prompt.token_ids)  # exact by definition; replay sends these lengths
        elif in_tokens is None:
            estimated = True
            in_tokens = len(ids) if ids is not None else -(-len(prompt.text or "") // 4)
        if status >= 400:
            out_tokens = 0
        self.estimated += estimated
        rec = TraceRecord(
            arrival_s=arrival - self.t0,
            input_tokens=in_tokens,
            output_tokens=out_tokens,
            hash_ids=self.hasher.hash_ids(ids) if ids is not None else (),
        )
        if rec.hash_ids:
            rec.block_size = self.cfg.block_size
        if self.cfg.keep_prompts:
            _keep(rec, prompt)
        model = body.get("model")
        model_name = model if isinstance(model, str) else None
        line = trace_line(rec, endpoint=endpoint, model=model_name, status=status, estimated=estimated)
        self.writer.fill(slot, line)

    def stats(self) -> dict[str, Any]:
        """The sidecar JSON: counts and the proxy's added latency (ms)."""
        w = self.writer
        return {
            "upstream": self.upstream,
            "trace": str(self.cfg.out),
            "requests": dict(self.routes),
            "recorded": w.written if w else 0,
            "incomplete_at_exit": w.incomplete if w else 0,
            "status": {str(k): v for k, v in sorted(self.statuses.items())},
            "usage_injected": self.usage_injected,
            "usage_events_stripped": self.usage_stripped,
            "estimated_lengths": self.estimated,
            "prefix_blocks_seen": len(self.hasher),
            "added_latency_ms": {
                "first_chunk": H.summary_ms(self.first_chunk),
                "chunk": H.summary_ms(self.chunk),
                "request": H.summary_ms(self.request),
            },
        }


def _keep(rec: TraceRecord, prompt: Prompt) -> None:
    """--keep-prompts: the ids when the prompt was ids (their count is the input length), else text."""
    if prompt.token_ids is not None:
        rec.prompt_token_ids = prompt.token_ids
        rec.input_tokens = len(prompt.token_ids)
    elif prompt.text is not None:
        rec.prompt_text = prompt.text


async def serve(cfg: ProxyConfig, stop: asyncio.Event, encoder: Encoder | None = None,
                on_ready: Any = None) -> RecordProxy:  # fmt: skip
    """Run until `stop` is set; then drain and close, leaving a valid trace. Returns the proxy."""
    proxy = RecordProxy(cfg, encoder)
    await proxy.start()
    try:
        if on_ready is not None:
            on_ready(proxy)
        await stop.wait()
    finally:
        with contextlib.suppress(Exception):
            await proxy.close()
    return proxy
