"""The hand-written HTTP/1.1 client: response parsing fed without sockets (every framing, split at
random points), then over real sockets: the request it writes, keep-alive reuse, the pool bound,
and a connection not reused after a response that did not end cleanly.

Truth: the body bytes each test encodes itself, and what a raw asyncio server records receiving.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import orjson
import pytest

from replay.core import errors
from replay.core.request import OK, Request, record_for
from replay.targets.http_failures import Failure
from replay.targets.http_pool import Pool
from replay.targets.http_stream import Conn
from replay.targets.openai_http import HTTPTargetConfig, OpenAIHTTPTarget

# ---- parsing, fed without sockets -------------------------------------------------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def writelines(self, data: Any) -> None:
        self.written.extend(data)

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str) -> None:
        return None


class Sink:
    def __init__(self) -> None:
        self.status: int | None = None
        self.ctype = b""
        self.pieces: list[bytes] = []
        self.reads = 0
        self.ended = False
        self.stamps: set[float] = set()

    def head(self, status: int, content_type: bytes, t: float) -> None:
        self.status, self.ctype = status, content_type
        self.stamps.add(t)

    def body(self, pieces: list[bytes], t: float) -> None:
        assert pieces and all(pieces)  # never an empty call or piece
        self.pieces += pieces
        self.reads += 1
        self.stamps.add(t)

    def end(self, t: float) -> None:
        self.ended = True


def feed(response: bytes, splits: list[int], lost: bool = False) -> tuple[Conn, Sink, asyncio.Future[None]]:
    """A Conn sent one request, then fed `response` cut at `splits`; `lost`: the peer closes after."""
    loop = asyncio.new_event_loop()
    try:
        conn = Conn(lambda c: None)
        conn.connection_made(FakeTransport())  # type: ignore[arg-type]
        sink = Sink()

        async def go() -> asyncio.Future[None]:
            fut = conn.request(b"POST / HTTP/1.1\r\n\r\n", b"", sink)
            cuts = [0, *sorted(splits), len(response)]
            for a, b in zip(cuts, cuts[1:], strict=False):
                if b > a:
                    conn.data_received(response[a:b])
            if lost:
                conn.connection_lost(None)
            return fut

        fut = loop.run_until_complete(go())
    finally:
        loop.close()
    return conn, sink, fut


def chunked(body: bytes, rng: random.Random, extensions: bool = False, trailers: bool = False) -> bytes:
    out, i = [], 0
    while i < len(body):
        n = rng.randint(1, 40)
        ext = b";name=value" if extensions and rng.random() < 0.5 else b""
        out.append(b"%x%s\r\n%s\r\n" % (len(body[i : i + n]), ext, body[i : i + n]))
        i += n
    out.append(b"0\r\n" + (b"X-Trailer: 1\r\nY: 2\r\n" if trailers else b"") + b"\r\n")
    return b"".join(out)


HEAD_OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
LENGTH_10 = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
BODY = b"".join(b'data: {"n":%d}\n\n' % i for i in range(30)) + b"data: [DONE]\n\n"


def random_cuts(n: int, rng: random.Random) -> list[int]:
    return rng.sample(range(1, n), k=min(n - 1, rng.randint(0, 25)))


@pytest.mark.parametrize("framing", ["chunked", "chunked-ext-trailers", "length", "close"])
def test_every_body_framing_at_random_splits(framing: str) -> None:
    rng = random.Random(framing)
    for _ in range(150):
        if framing.startswith("chunked"):
            extra = framing != "chunked"
            resp = HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(BODY, rng, extra, extra)
        elif framing == "length":
            resp = HEAD_OK + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY
        else:
            resp = HEAD_OK + b"\r\n" + BODY
        conn, sink, fut = feed(resp, random_cuts(len(resp), rng), lost=framing == "close")
        assert fut.done() and fut.exception() is None
        got = (sink.status, sink.ctype, b"".join(sink.pieces), sink.ended)
        assert got == (200, b"text/event-stream", BODY, True)
        assert conn.reusable is (framing != "close")  # a close-delimited body ends its connection


def test_one_piece_per_chunk_and_one_stamp_per_read() -> None:
    """Chunks that arrive in one read reach the sink in one call, one piece per chunk, one stamp."""
    events = [b"data: %d\n\n" % i for i in range(50)]
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events)
    resp = HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n" + chunks
    conn, sink, fut = feed(resp + b"0\r\n\r\n", [])
    assert sink.pieces == events and sink.reads == 1 and len(sink.stamps) == 1 and fut.result() is None


def test_byte_by_byte() -> None:
    rng = random.Random(3)
    resp = HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(BODY, rng, True, True)
    conn, sink, fut = feed(resp, list(range(1, len(resp))))
    assert b"".join(sink.pieces) == BODY and fut.result() is None and conn.reusable


def test_interim_response_no_body_and_keep_alive_rules() -> None:
    body = b"data: x\n\n"
    resp = b"HTTP/1.1 100 Continue\r\n\r\n" + HEAD_OK + b"Content-Length: %d\r\n\r\n" % len(body) + body
    conn, sink, fut = feed(resp, [5, 30])
    assert sink.status == 200 and sink.pieces == [body] and conn.reusable
    conn, sink, fut = feed(b"HTTP/1.1 204 No Content\r\n\r\n", [])
    assert sink.status == 204 and sink.ended and conn.reusable
    for head in (b"HTTP/1.1 200 OK\r\nConnection: close\r\n", b"HTTP/1.0 200 OK\r\n"):
        conn, sink, fut = feed(head + b"Content-Length: 0\r\n\r\n", [])
        assert sink.ended and not conn.reusable
    conn, sink, fut = feed(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", [])
    assert conn.reusable
    # Bytes beyond the end of the response: out of step, so not reused.
    conn, sink, fut = feed(HEAD_OK + b"Content-Length: 2\r\n\r\nokEXTRA", [])
    assert sink.pieces == [b"ok"] and fut.result() is None and not conn.reusable
    conn, sink, fut = feed(HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nEXTRA", [])
    assert sink.pieces == [b"ok"] and fut.result() is None and not conn.reusable


@pytest.mark.parametrize(
    ("response", "lost", "kind", "detail"),
    [
        (CHUNKED + b"5\r\nhel", True, errors.CONNECTION_RESET, "mid-response"),
        (LENGTH_10 + b"hello", True, errors.CONNECTION_RESET, "mid-response"),
        (b"", True, errors.CONNECTION_RESET, "before responding"),
        (CHUNKED + b"zz\r\nhello\r\n", False, errors.MALFORMED, "chunk size"),
        (CHUNKED + b"-5\r\nhello\r\n", False, errors.MALFORMED, "chunk size"),
        (CHUNKED + b"2\r\nhello\r\n", False, errors.MALFORMED, "CRLF"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", False, errors.MALFORMED, "Content-Length"),
        (b"SSH-2.0-OpenSSH_9\r\n\r\n", False, errors.MALFORMED, "not an HTTP/1.x response"),
    ],
    ids=["cut-chunked", "cut-length", "closed-before-head", "bad-size", "negative-size", "no-crlf",
         "bad-length", "not-http"],
)  # fmt: skip
def test_broken_responses_fail_the_request_and_close(response: bytes, lost: bool, kind: str,
                                                      detail: str) -> None:  # fmt: skip
    conn, sink, fut = feed(response, [len(response) // 2] if response else [], lost=lost)
    exc = fut.exception()
    assert isinstance(exc, Failure) and exc.kind == kind and detail in exc.detail, exc
    assert not conn.reusable and not sink.ended


def test_a_sink_failure_fails_the_request_and_closes() -> None:
    class Refuses(Sink):
        def head(self, status: int, content_type: bytes, t: float) -> None:
            raise Failure(errors.MALFORMED, "no thanks")

    loop = asyncio.new_event_loop()
    conn = Conn(lambda c: None)
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    fut = loop.run_until_complete(_request(conn, Refuses()))
    conn.data_received(HEAD_OK + b"Content-Length: 3\r\n\r\nabc")
    loop.close()
    assert isinstance(fut.exception(), Failure) and transport.closed and not conn.reusable


async def _request(conn: Conn, sink: Sink) -> asyncio.Future[None]:
    return conn.request(b"", b"", sink)


def test_unsolicited_bytes_or_eof_retire_an_idle_connection() -> None:
    conn = Conn(lambda c: None)
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(b"HTTP/1.1 408 Request Timeout\r\n\r\n")
    assert transport.closed and not conn.reusable
    # The server half-closed an idle connection: nothing more is sent on it, even before the close lands.
    conn = Conn(lambda c: None)
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    assert conn.reusable
    conn.eof_received()
    assert not conn.reusable


# ---- over sockets: what is sent, keep-alive and the pool ---------------------------------------------------


class Server:
    """A raw HTTP/1.1 server that records each request's head and body and the connections it saw;
    `respond(index, head)` gives the response bytes and whether to close after it."""

    def __init__(self, respond: Any) -> None:
        self.respond = respond
        self.requests: list[tuple[int, bytes, bytes]] = []  # (connection number, head, body)
        self.connections = 0
        self.active = 0
        self.max_active = 0
        self.hold = asyncio.Event()
        self.hold.set()
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn_no = self.connections
        self.writers.append(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
                body = await reader.readexactly(length)
                index = len(self.requests)
                self.requests.append((conn_no, head, body))
                self.active += 1
                self.max_active = max(self.max_active, self.active)
                await self.hold.wait()
                self.active -= 1
                data, close = self.respond(index, head)
                writer.write(data)
                await writer.drain()
                if close:
                    return
        finally:
            writer.close()


def sse_ok(n: int = 3) -> bytes:
    body = b"".join(b"%x\r\ndata: %d\n\n\r\n" % (len(b"data: %d\n\n" % i), i) for i in range(n))
    return HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n"


async def serve(respond: Any) -> tuple[Server, asyncio.Server, int]:
    srv = Server(respond)
    server = await asyncio.start_server(srv.handle, "127.0.0.1", 0)
    return srv, server, server.sockets[0].getsockname()[1]


async def one(pool: Pool, head: bytes, body: bytes) -> tuple[Sink, bool]:
    conn = await pool.acquire()
    sink = Sink()
    ok = False
    try:
        await conn.request(head, body, sink)
        ok = True
    except Failure:
        pass
    finally:
        pool.release(conn, ok)
    return sink, ok


async def test_keep_alive_reuse_and_no_reuse_after_a_broken_response() -> None:
    def respond(index: int, head: bytes) -> tuple[bytes, bool]:
        if index == 2:
            return HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhel", True  # cut mid-body
        if index == 4:
            return HEAD_OK + b"Content-Length: 0\r\nConnection: close\r\n\r\n", False
        return sse_ok(), False

    srv, server, port = await serve(respond)
    pool = Pool("127.0.0.1", port, 0, 5.0)
    try:
        results = [await one(pool, b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\n\r\n", b"{}")
                   for _ in range(7)]  # fmt: skip
    finally:
        pool.close()
        server.close()
    assert [ok for _, ok in results] == [True, True, False, True, True, True, True]
    assert results[0][0].pieces == [b"data: %d\n\n" % i for i in range(3)]
    # Reused until the cut response (request 2) and after the server's "Connection: close" (request 4).
    assert [c for c, _, _ in srv.requests] == [1, 1, 1, 2, 2, 3, 3]


async def test_pool_size_bounds_connections_in_use() -> None:
    srv, server, port = await serve(lambda i, h: (sse_ok(), False))
    srv.hold.clear()
    pool = Pool("127.0.0.1", port, 2, 5.0)
    try:
        tasks = [asyncio.create_task(one(pool, b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b""))
                 for _ in range(6)]  # fmt: skip
        await asyncio.sleep(0.2)
        assert srv.active == 2  # the other four wait for a connection
        srv.hold.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    finally:
        pool.close()
        server.close()
    assert all(ok for _, ok in results) and srv.max_active == 2 and srv.connections == 2


async def test_connect_refused_and_server_gone() -> None:
    srv, server, port = await serve(lambda i, h: (sse_ok(), False))
    pool = Pool("127.0.0.1", port, 0, 5.0)
    try:
        assert (await one(pool, b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b""))[1]
        server.close()
        for w in srv.writers:
            w.close()
        await asyncio.sleep(0.1)  # the idle connection sees its close and leaves the pool
        with pytest.raises(Failure) as e:
            await pool.acquire()
        assert e.value.kind == errors.CONNECT_REFUSED and f"127.0.0.1:{port}" in e.value.detail
    finally:
        pool.close()


async def test_what_the_target_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The POST on the wire: request line, Host, JSON Content-Type and a Content-Length equal to the
    body's, the key from the environment as a bearer token (and nowhere in describe())."""
    monkeypatch.setenv("REPLAY_TEST_KEY", "sk-wire-123")
    models = orjson.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]})
    events = [b'{"choices":[{"index":0,"text":" a","finish_reason":null}]}',
              b'{"choices":[{"index":0,"text":" b","finish_reason":"length"}]}', b"[DONE]"]  # fmt: skip

    def respond(index: int, head: bytes) -> tuple[bytes, bool]:
        if head.startswith(b"GET /v1/models "):
            return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
                len(models), models), False  # fmt: skip
        if head.startswith(b"GET "):
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", False
        chunks = b"".join(b"%x\r\ndata: %s\n\n\r\n" % (len(e) + 8, e) for e in events)
        return HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n", False

    srv, server, port = await serve(respond)
    cfg = HTTPTargetConfig(base_url=f"http://127.0.0.1:{port}/v1", api_key_env="REPLAY_TEST_KEY")
    target = OpenAIHTTPTarget(cfg)
    try:
        await target.start()
        recs = []
        for i in range(2):
            req = Request(id=i, intended_s=0.0, input_tokens=3, output_tokens=2, prompt_token_ids=[7, 8, 9])
            recs.append(record_for(req))
            await target.send(req, recs[-1])
        assert "sk-wire-123" not in repr(target.describe())
    finally:
        await target.close()
        server.close()
    assert [(r.status, r.streamed_tokens()) for r in recs] == [(OK, 2), (OK, 2)]
    posts = [(c, h, b) for c, h, b in srv.requests if h.startswith(b"POST")]
    assert len(posts) == 2 and posts[0][0] == posts[1][0]  # one keep-alive connection
    for _, head, body in posts:
        lines = head.split(b"\r\n")
        pairs = (line.partition(b":") for line in lines[1:] if line)
        fields = {k.strip().lower(): v.strip() for k, _, v in pairs}
        assert lines[0] == b"POST /v1/completions HTTP/1.1"
        assert fields[b"host"] == b"127.0.0.1:%d" % port
        assert fields[b"content-type"] == b"application/json"
        assert fields[b"authorization"] == b"Bearer sk-wire-123"
        assert int(fields[b"content-length"]) == len(body)
        doc = orjson.loads(body)
        assert doc["model"] == "m" and doc["prompt"] == [7, 8, 9] and doc["max_tokens"] == 2 and doc["stream"]


BIG = b"".join(b'data: {"n":%d,"text":" tok"}\n\n' % i for i in range(600)) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("kind", ["plain", "ext-trailers", "crlf-in-data"])
def test_large_reads_take_the_same_chunks_as_small_ones(kind: str) -> None:
    """Reads of many KiB go through `_whole_chunks` first (C-level passes); whatever its framing and
    wherever the reads are cut, the body is exactly the one the chunks carry."""
    rng = random.Random(kind)
    body = BIG.replace(b"\n\n", b"\r\n\r\n") if kind == "crlf-in-data" else BIG
    for _ in range(40):
        extra = kind == "ext-trailers"
        resp = HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body, rng, extra, extra)
        cuts = rng.sample(range(1, len(resp)), k=rng.randint(0, 6))  # few cuts: reads of several KiB
        conn, sink, fut = feed(resp, cuts)
        assert fut.done() and fut.exception() is None
        assert b"".join(sink.pieces) == body and sink.ended and conn.reusable


def test_a_burst_in_one_read_is_one_piece_per_chunk() -> None:
    events = [b'data: {"n":%d}\n\n' % i for i in range(500)]
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events)
    resp = HEAD_OK + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    cut = len(resp) - 700  # the second read: the last chunks, one cut mid-chunk, and the end
    conn, sink, fut = feed(resp, [len(HEAD_OK) + 40, cut])
    assert b"".join(sink.pieces) == b"".join(events) and fut.result() is None
    assert sink.reads == 3 and len(sink.pieces) in (len(events), len(events) + 1, len(events) + 2)
