"""Just enough HTTP/1.1 for the stub server: request parsing, keep-alive, fixed-length responses.

A raw asyncio.Protocol rather than a web framework: per-request cost is a few microseconds, so
the stub's own overhead stays far below the timings it is meant to serve. Request bodies must
carry Content-Length (every OpenAI client sends one); requests on one connection are handled
strictly one after another (pipelined ones wait in the buffer).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

import orjson

_MAX_HEAD = 64 * 1024
_MAX_BODY = 64 * 1024 * 1024
_REASONS = {200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 404: b"Not Found",
            413: b"Payload Too Large", 429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
            500: b"Internal Server Error", 501: b"Not Implemented", 503: b"Service Unavailable"}  # fmt: skip


def error_body(status: int, message: str) -> bytes:
    """An error in vLLM's / OpenAI's shape."""
    return orjson.dumps({"object": "error", "message": message, "type": "stub_error", "param": None,
                         "code": status})  # fmt: skip


class Responder(Protocol):
    conns: set[Conn]

    def handle(self, conn: Conn, method: bytes, path: bytes, query: bytes, headers: dict[bytes, bytes],
               body: bytes, t_recv: float, keep_alive: bool) -> None: ...  # fmt: skip

    def lost(self, conn: Conn) -> None: ...


class Conn(asyncio.Protocol):
    """One client connection. `stream` is the server's in-flight stream on it, if any."""

    def __init__(self, server: Responder) -> None:
        self.server = server
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set in connection_made
        self.buf = bytearray()
        self.busy = False  # a request is being answered; further ones wait in buf
        self.paused = False  # the socket buffer is full: the client is not reading
        self.closed = False
        self.stream: Any = None
        # When the first bytes of the next request in `buf` arrived, and of the one being answered
        # (`t_head`): a large body takes a while to arrive whole; this says when its sending began.
        self.t_first_byte = 0.0
        self.t_head = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        self.server.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.conns.discard(self)
        self.server.lost(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def data_received(self, data: bytes) -> None:
        if not self.buf:
            self.t_first_byte = time.perf_counter()
        self.buf += data
        if not self.busy:
            self.next_request()

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def next_request(self) -> None:
        """Parse and dispatch one complete request from the buffer, if there is one."""
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEAD:
                self._fail(431)
            return
        lines = bytes(buf[:end]).split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self._fail(400)
            return
        method, target, version = parts
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"transfer-encoding" in headers:
            self._fail(501)  # chunked request bodies: no OpenAI client sends them
            return
        try:
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            self._fail(400)
            return
        if length > _MAX_BODY:
            self._fail(413)
            return
        start = end + 4
        if len(buf) < start + length:
            return
        body = bytes(buf[start : start + length])
        del buf[: start + length]
        self.t_head = self.t_first_byte
        self.t_first_byte = time.perf_counter()  # a pipelined request's bytes are in by now
        conn_hdr = headers.get(b"connection", b"").lower()
        keep_alive = conn_hdr != b"close" if version == b"HTTP/1.1" else conn_hdr == b"keep-alive"
        path, _, query = target.partition(b"?")
        self.busy = True
        self.server.handle(self, method, path, query, headers, body, time.perf_counter(), keep_alive)

    def respond(self, status: int, body: bytes, keep_alive: bool, ctype: bytes = b"application/json") -> None:
        head = b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n" % (
            status, _REASONS.get(status, b"Status"), ctype, len(body),
            b"" if keep_alive else b"connection: close\r\n")  # fmt: skip
        self.transport.write(head + body)
        self.done(keep_alive)

    def done(self, keep_alive: bool) -> None:
        """The current response is complete: close, or go on to the next buffered request."""
        self.busy = False
        if not keep_alive:
            self.transport.close()
        elif self.buf and not self.closed:
            self.next_request()

    def _fail(self, status: int) -> None:
        self.buf.clear()
        self.respond(status, error_body(status, "malformed or unsupported HTTP request"), keep_alive=False)
