"""I/O-free push decoder for Server-Sent Events (the `text/event-stream` framing of the WHATWG spec).

Bytes go in as they arrive off the socket, in pieces of any size; complete `data` payloads come
out. Nothing here reads a socket or a clock, so the framing rules are tested by feeding bytes.

Framing rules kept (and only these, since an OpenAI-style stream uses nothing else):
- lines end in CRLF, LF or a lone CR; a CRLF may be split across two `feed` calls;
- a line starting with ':' is a comment (keep-alive); `event`, `id`, `retry` and unknown fields
  are ignored;
- `data` lines accumulate, joined with '\\n', and a blank line dispatches the event; an event
  with no data line dispatches nothing;
- one space after the colon is dropped; a leading UTF-8 BOM on the stream is dropped.

Cost: the streaming client frames every token event here, so the common event, one
`data: ...` line and a blank line, takes a fast path: the complete lines of a read are split
on blank lines in C and each such event costs one check and one slice, payloads stay bytes
(orjson parses bytes), and only unusual events go line by line.
"""

from __future__ import annotations

_BOM = b"\xef\xbb\xbf"
_BULK_PIECES = 8  # from this many pieces in one read, first try them as one run of plain events


def _plain_events(j: bytes) -> list[bytes] | None:
    """The payloads of `j` when it is exactly `data: X\n\n` repeated (no X holding LF or CR), found
    with three C scans and one split instead of a Python step per event; else None. Proof of shape:
    the split makes `j` = `data: ` X1 (`\n\ndata: ` Xi)... `\n\n`, which holds 2 LF per event
    besides any inside the Xs, so 2 per event in all means none inside."""
    if j[:6] != b"data: " or j[-2:] != b"\n\n" or 13 in j:
        return None
    events = j[6:-2].split(b"\n\ndata: ")
    return events if j.count(10) == 2 * len(events) else None


class SSEDecoder:
    """`events(bytes)` returns the payload (bytes) of every event those bytes complete, `flush_events()`
    at end of stream; `feed` / `flush` are the same returning text."""

    __slots__ = ("_pend", "_data", "_cr_pending", "_started", "_clean", "partial_tail")

    def __init__(self) -> None:
        # Pieces of an unfinished line, joined once its end arrives (linear however it is split).
        self._pend: list[bytes] = []
        self._data: list[bytes] = []  # data lines of the event being built
        self._cr_pending = False  # the last byte seen was CR: a following LF belongs to it
        self._started = False
        self._clean = False  # started, and between events: no partial line, no data, no held CR
        # Set by flush(): the stream ended inside a line, whose bytes were dropped (a sign of truncation).
        self.partial_tail = False

    def feed(self, chunk: bytes) -> list[str]:
        return [p.decode("utf-8", "replace") for p in self.events(chunk)]

    def flush(self) -> list[str]:
        return [p.decode("utf-8", "replace") for p in self.flush_events()]

    def events_of(self, pieces: list[bytes]) -> list[bytes]:
        """`events` over several pieces in order. A piece that is exactly one `data: ...` line and a blank
        line, arriving between events (how servers write token events, one per HTTP chunk), costs a
        few C-level checks and one slice."""
        clean = self._clean
        if len(pieces) >= _BULK_PIECES and not self._data and not self._cr_pending:
            # At a line start with no event open (a partial line may be pending): the run of plain
            # events up to the last blank line in one go, whatever follows it the usual way.
            j = b"".join([*self._pend, *pieces])
            if not self._started and j[:3] == _BOM:  # the stream's first bytes: drop a BOM
                j = j[3:]
            end = j.rfind(b"\n\n") + 2
            bulk = _plain_events(j[:end]) if end >= 2 and (self._started or len(j) >= 3) else None
            if bulk is not None:
                self._started, self._pend, self._clean = True, [], True
                return bulk + self.events(j[end:]) if end < len(j) else bulk
        out: list[bytes] = []
        append = out.append
        for piece in pieces:
            # Slices, indexing and `int in bytes` (a memchr): on CPython 3.11 startswith/find parse an
            # argument tuple per call, and `b"\n" in x` first fails (an exception) as an int lookup.
            if clean and piece[:6] == b"data: " and piece[-1] == 10 and piece[-2] == 10:
                payload = piece[6:-2]
                if 10 not in payload and 13 not in payload:  # no LF, no CR: exactly one line
                    append(payload)
                    continue
            out += self.events(piece)
            clean = self._clean
        return out

    def events(self, chunk: bytes) -> list[bytes]:
        if not chunk:
            return []
        if not self._started:
            # Hold the first bytes until we know whether they are a BOM.
            head = b"".join([*self._pend, chunk])
            self._pend = []
            if len(head) < 3 and _BOM.startswith(head):
                self._pend = [head]
                return []
            self._started = True
            chunk = head[3:] if head.startswith(_BOM) else head
        if self._cr_pending:
            chunk = b"\r" + chunk
            self._cr_pending = False
        if 13 in chunk:  # a CR
            # A CR at the very end may be the first half of a CRLF: hold it back for the next feed.
            if chunk.endswith(b"\r"):
                chunk = chunk[:-1]
                self._cr_pending = True
                self._clean = False
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        end = chunk.rfind(b"\n") + 1
        if end == 0:
            if chunk:
                self._pend.append(chunk)
                self._clean = False
            return []
        if self._pend:
            self._pend.append(chunk)
            chunk = b"".join(self._pend)
            end = chunk.rfind(b"\n") + 1
        self._pend = [chunk[end:]] if end < len(chunk) else []
        # Complete lines only, starting at a line start. Each b"\n\n" ends an event (a line end, then a
        # blank line); what follows the last one is the next event's lines so far.
        parts = chunk[:end].split(b"\n\n")
        tail = parts.pop()
        out: list[bytes] = []
        data = self._data
        for ev in parts:
            if not data and ev[:6] == b"data: " and 10 not in ev:
                out.append(ev[6:])  # the common event: one data line
            else:
                self._lines(ev.split(b"\n"), out)
                if data:
                    out.append(b"\n".join(data))
                    data.clear()
        if tail:
            self._lines(tail[:-1].split(b"\n"), out)  # it ends in b"\n" (the last line end)
        self._clean = not (self._pend or data or self._cr_pending)
        return out

    def flush_events(self) -> list[bytes]:
        """End of stream: a held-back CR ends its line; an event missing only its final blank line is
        still dispatched (lenient: servers that end with `data: [DONE]\\n` are common). A line with no
        terminator at all is dropped, as the spec says, and `partial_tail` is set."""
        pending = b"".join(self._pend)
        self._pend = []
        out: list[bytes] = []
        if self._cr_pending:
            self._cr_pending = False
            self._lines([pending], out)
            pending = b""
        self.partial_tail = bool(pending)
        if self._data:
            out.append(b"\n".join(self._data))
            self._data.clear()
        return out

    def _lines(self, lines: list[bytes], out: list[bytes]) -> None:
        data = self._data
        for line in lines:
            if not line:
                if data:
                    out.append(b"\n".join(data))
                    data.clear()
            elif line[:5] == b"data:":
                data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line == b"data":
                data.append(b"")
            # Comments (':...') and every other field are ignored.
