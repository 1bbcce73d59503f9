"""A lean HTTP/1.1 client for streamed POSTs, hand-written because aiohttp costs ~2 us per HTTP chunk
and a token stream is one chunk per token.

One `Conn` (an asyncio.Protocol) per keep-alive connection, one request at a time on it. The response
is parsed inside `data_received`, with one perf_counter stamp per socket read: status line and
headers, then the body de-chunked (Transfer-Encoding: chunked, Content-Length, or until close) and
handed to the request's `Sink` once per read. Nothing wakes a task per read: the sender awaits one
future, resolved when the response has ended (or failed). A connection whose response did not end
cleanly is closed, never reused (`http_pool.Pool` keeps the others).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import deque
from collections.abc import Callable
from itertools import repeat
from typing import Protocol

from replay.core import errors
from replay.targets.http_failures import Failure

FIRST_WRITE = 16 * 1024  # a request body beyond this is written in two steps (see Conn.request)
UPLOAD_BUDGET = 256 * 1024  # body remainders written per loop turn, all connections together (Uploads)
UPLOAD_SLICE = 64 * 1024  # at most this much of one body per turn
_HEAD_MAX = 64 * 1024  # a response head (status line and headers) longer than this is malformed
_LINE_MAX = 4096  # a chunk-size or trailer line longer than this is malformed
_BULK_BYTES = 4096  # a read with this much chunked body left first tries _whole_chunks
# Response states.
_IDLE, _HEAD, _CHUNKED, _LENGTH, _UNTIL_CLOSE = range(5)
# Chunked-body states.
_SIZE, _DATA, _CRLF, _TRAILER = range(4)


class Sink(Protocol):
    """Where one response goes. Each call may raise (a Failure): the request then fails with it and
    its connection is closed."""

    def head(self, status: int, content_type: bytes, t: float) -> None: ...

    def body(self, pieces: list[bytes], t: float) -> None:
        """The body bytes one read brought, in order: one piece per HTTP chunk (or the read's bytes)."""

    def end(self, t: float) -> None: ...


class Uploads:
    """Request-body remainders (see Conn.request), written at most UPLOAD_BUDGET bytes per loop turn
    across connections, round robin. The kernel takes a whole 450 kB body in one write (~0.4 ms on
    loopback here): a burst's bodies written whole would hold the loop ~10 ms, delaying every stream's
    reads; in 256 kB turns the loop stays free between them."""

    def __init__(self) -> None:
        self._conns: deque[Conn] = deque()
        self._armed = False

    def add(self, conn: Conn) -> None:
        self._conns.append(conn)
        if not self._armed:
            self._armed = True
            asyncio.get_running_loop().call_soon(self._turn)

    def _turn(self) -> None:
        conns, budget = self._conns, UPLOAD_BUDGET
        while conns and budget > 0:
            conn = conns.popleft()
            budget -= conn.write_more(min(UPLOAD_SLICE, budget))
            if conn.uploading:
                conns.append(conn)
        self._armed = bool(conns)
        if conns:
            asyncio.get_running_loop().call_soon(self._turn)


class Conn(asyncio.Protocol):
    def __init__(self, on_lost: Callable[[Conn], None], uploads: Uploads | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.keep_alive = True
        self._on_lost = on_lost
        self._sink: Sink | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._state = _IDLE
        self._buf = b""  # bytes not yet parsed: a partial head, chunk-size line or chunk CRLF
        self._cstate = _SIZE
        self._left = 0  # body bytes still to come: of the current chunk, or of a Content-Length body
        self._rest: memoryview | None = None  # the request body's second part, not written yet
        self._uploads = uploads or Uploads()

    # ---- asyncio.Protocol ----------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        t = time.perf_counter()  # one stamp for everything this read completes
        if self._sink is None:
            self.close()  # bytes nobody asked for: the connection is out of step
            return
        try:
            state = self._state
            if state == _HEAD:
                rest = self._head(data, t)
                if rest is None:
                    return
                data = rest
                state = self._state
            if state == _CHUNKED:
                self._chunked(data, t)
            elif state == _LENGTH:
                if data:
                    self._length(data, t)
            elif state == _UNTIL_CLOSE:
                if data:
                    self._sink.body([data], t)
            elif data:
                self.keep_alive = False  # bytes after the response ended
        except Exception as exc:  # noqa: BLE001  (the sink's Failure, or a parse error: the request's outcome)
            self._fail(exc)

    def eof_received(self) -> bool:
        self.keep_alive = False  # the server is closing: no new request goes out on this connection
        return False  # close; connection_lost says whether the response was complete

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._on_lost(self)
        if self._waiter is None:
            return
        if self._state == _UNTIL_CLOSE and exc is None:
            self._finish(time.perf_counter())  # the body is delimited by the close
            return
        if self._state == _HEAD and not self._buf:
            what = "server closed the connection before responding"
        else:
            what = "connection closed mid-response"
        why = f" ({type(exc).__name__}: {exc})" if exc is not None else ""
        self._fail(Failure(errors.CONNECTION_RESET, what + why))

    # ---- requests ------------------------------------------------------------------------------------------

    def request(self, head: bytes, body: bytes, sink: Sink) -> asyncio.Future[None]:
        """Send one request; the future resolves when its response has ended (the sink has it all)."""
        assert self.transport is not None and self._sink is None
        self._sink = sink
        self._waiter = waiter = asyncio.get_running_loop().create_future()
        self._state = _HEAD
        self._buf = b""
        if len(body) <= FIRST_WRITE:
            self.transport.writelines((head, body))
        else:
            # A large body's first bytes go now and the rest on the next loop turn, so that in a
            # burst every request starts at its send time (as many users' uploads would, sharing the
            # bandwidth) instead of after the kernel has copied every body before it (~0.5 ms per
            # 450 kB on loopback here: 10-15 ms for a burst of 30 large prompts).
            view = memoryview(body)
            self.transport.writelines((head, view[:FIRST_WRITE]))
            self._rest = view[FIRST_WRITE:]
            self._uploads.add(self)
        return waiter

    @property
    def uploading(self) -> bool:
        return self._rest is not None

    def write_more(self, n: int) -> int:
        """Write up to `n` more bytes of the body (Uploads); how many were written."""
        rest = self._rest
        if rest is None or self.transport is None or self.transport.is_closing():
            self._rest = None
            return 0
        self.transport.write(rest[:n])
        self._rest = rest[n:] if len(rest) > n else None
        return min(n, len(rest))

    @property
    def reusable(self) -> bool:
        return (
            not self.closed and self.keep_alive and self._state == _IDLE and self._sink is None
            and self._rest is None  # a response before the whole request went out: out of step
        )  # fmt: skip

    def close(self) -> None:
        self._sink = None
        self._waiter = None
        self._rest = None
        self.keep_alive = False
        if self.transport is not None:
            self.transport.close()

    def _finish(self, t: float) -> None:
        sink, waiter = self._sink, self._waiter
        self._state = _IDLE
        self._sink = self._waiter = None
        try:
            if sink is not None:
                sink.end(t)
        except Exception as exc:  # noqa: BLE001
            self._waiter = waiter
            self._fail(exc)
            return
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        waiter = self._waiter
        self.close()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    # ---- response parsing ----------------------------------------------------------------------------------

    def _head(self, data: bytes, t: float) -> bytes | None:
        """Parse the status line and headers once they are all in; returns the body bytes after them."""
        buf = self._buf + data if self._buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _HEAD_MAX:
                    raise Failure(errors.MALFORMED, f"response head longer than {_HEAD_MAX} bytes")
                self._buf = buf
                return None
            lines = buf[:end].split(b"\r\n")
            buf = buf[end + 4 :]
            version, _, rest = lines[0].partition(b" ")
            code = rest[:3]
            if not version.startswith(b"HTTP/1.") or not code.isdigit():
                raise Failure(errors.MALFORMED, f"not an HTTP/1.x response: {lines[0][:60]!r}")
            status = int(code)
            if status >= 200:
                break  # else an interim response (100 Continue, 103 Early Hints): the real one follows
        self._buf = b""
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        conn = headers.get(b"connection", b"").lower()
        self.keep_alive = b"close" not in conn and (version != b"HTTP/1.0" or b"keep-alive" in conn)
        self._sink.head(status, headers.get(b"content-type", b"").split(b";")[0].strip().lower(), t)  # type: ignore[union-attr]
        if self._sink is None:
            return None
        length = headers.get(b"content-length")
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            self._state, self._cstate = _CHUNKED, _SIZE
        elif status in (204, 304) or length is not None:
            try:
                self._left = 0 if status in (204, 304) else int(length)  # type: ignore[arg-type]
            except ValueError:
                raise Failure(errors.MALFORMED, f"bad Content-Length {length[:40]!r}") from None  # type: ignore[index]
            if self._left < 0:
                raise Failure(errors.MALFORMED, f"bad Content-Length {length!r}")
            self._state = _LENGTH
            if self._left == 0:
                self._finish(t)
                if buf:
                    self.keep_alive = False
                return None
        else:
            self._state = _UNTIL_CLOSE
            self.keep_alive = False
        return buf

    def _length(self, data: bytes, t: float) -> None:
        left = self._left
        if len(data) < left:
            self._left = left - len(data)
            self._sink.body([data], t)  # type: ignore[union-attr]
            return
        if len(data) > left:
            self.keep_alive = False  # bytes after the body
            data = data[:left]
        self._left = 0
        self._sink.body([data], t)  # type: ignore[union-attr]
        if self._sink is not None:
            self._finish(t)

    def _chunked(self, data: bytes, t: float) -> None:
        """De-chunk what this read brings; the chunks' data go to the sink as one list, one piece per
        chunk (a token stream writes one event per chunk, so a piece is usually exactly one event)."""
        buf = self._buf + data if self._buf else data
        n = len(buf)
        pos = 0
        st = self._cstate
        left = self._left
        parts: list[bytes] = []
        done = False
        if st == _DATA:  # the rest of a chunk begun in an earlier read
            end = left
            if end > n:
                parts.append(buf)
                left -= n
                pos = n
            else:
                parts.append(buf[:end])
                pos = end
                st = _CRLF
        if st == _CRLF and n - pos >= 2:
            if not buf.startswith(b"\r\n", pos):
                raise Failure(errors.MALFORMED, "chunked body: chunk data not followed by CRLF")
            pos += 2
            st = _SIZE
        if st == _SIZE and n - pos >= _BULK_BYTES:
            pos = _whole_chunks(buf, pos, parts)
        find = buf.find
        append = parts.append
        while st == _SIZE:
            eol = find(b"\r\n", pos)
            if eol < 0:
                if n - pos > _LINE_MAX:
                    raise Failure(errors.MALFORMED, "chunked body: chunk-size line too long")
                break
            try:
                size = int(buf[pos:eol], 16)
            except ValueError:
                size = _chunk_size(buf[pos:eol])  # with extensions, or not a size at all
            if size <= 0:
                if size < 0:
                    raise Failure(errors.MALFORMED, f"chunked body: bad chunk size {buf[pos:eol][:40]!r}")
                pos = eol + 2
                st = _TRAILER
                break
            start = eol + 2
            end = start + size
            if end + 2 <= n:  # the whole chunk and its CRLF are here: the common case
                if buf[end] != 13 or buf[end + 1] != 10:  # CR LF (indexing: no argument parsing)
                    raise Failure(errors.MALFORMED, "chunked body: chunk data not followed by CRLF")
                append(buf[start:end])
                pos = end + 2
            elif end <= n:
                append(buf[start:end])
                pos = end
                st = _CRLF
            else:
                if start < n:
                    append(buf[start:])
                left = end - n
                pos = n
                st = _DATA
        if st == _TRAILER:  # trailer fields (ignored), then an empty line: the body is complete
            if buf.startswith(b"\r\n", pos):
                pos += 2
                done = True
            else:
                eol = buf.find(b"\r\n\r\n", pos)
                if eol >= 0:
                    pos = eol + 4
                    done = True
                elif n - pos > _LINE_MAX:
                    raise Failure(errors.MALFORMED, "chunked body: trailer too long")
        self._cstate = st
        self._left = left
        self._buf = buf[pos:] if pos < n else b""
        if parts:
            self._sink.body(parts, t)  # type: ignore[union-attr]
        if done and self._sink is not None:
            if self._buf:
                self.keep_alive = False  # bytes after the body
                self._buf = b""
            self._finish(t)


def _whole_chunks(buf: bytes, pos: int, parts: list[bytes]) -> int:
    """Take the complete non-empty chunks from `pos` on in C-level passes (split at CRLF, every size
    checked against its data's length) and return where they end; the loop after it takes the rest
    (a partial chunk, the last chunk, extensions, data holding CRLF: any mismatch leaves it all to
    the loop). Why: a burst read holds hundreds of one-event chunks, ~0.4 us each in the loop."""
    segs = (buf[pos:] if pos else buf).split(b"\r\n")
    segs.pop()  # after the last CRLF: a partial line or chunk
    if len(segs) & 1:
        segs.pop()  # a size line whose data has not all arrived
    sizes, datas = segs[0::2], segs[1::2]
    if not datas:
        return pos
    lens = list(map(len, datas))
    if 0 in lens:  # the last chunk (size 0): it and what follows are the loop's
        k = lens.index(0)
        sizes, datas, lens = sizes[:k], datas[:k], lens[:k]
    try:
        if list(map(int, sizes, repeat(16))) != lens:
            return pos
    except ValueError:
        return pos
    parts.extend(datas)
    return pos + sum(lens) + sum(map(len, sizes)) + 4 * len(lens)


def _chunk_size(line: bytes) -> int:
    """A size line int() did not take: `SIZE;extensions` (ignored), else -1."""
    size = line.split(b";", 1)[0].strip()
    try:
        return int(size, 16) if size.isalnum() else -1
    except ValueError:
        return -1
