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
"""

from __future__ import annotations

_BOM = b"\xef\xbb\xbf"


class SSEDecoder:
    """`feed(bytes)` returns the payload of every event those bytes complete; `flush()` at end of stream."""

    __slots__ = ("_pend", "_data", "_cr_pending", "_started", "partial_tail")

    def __init__(self) -> None:
        # Pieces of an unfinished line, joined once its end arrives (linear however it is split).
        self._pend: list[bytes] = []
        self._data: list[str] = []  # data lines of the event being built
        self._cr_pending = False  # the last byte seen was CR: a following LF belongs to it
        self._started = False
        # Set by flush(): the stream ended inside a line, whose bytes were dropped (a sign of truncation).
        self.partial_tail = False

    def feed(self, chunk: bytes) -> list[str]:
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
        if b"\r" in chunk:
            # A CR at the very end may be the first half of a CRLF: hold it back for the next feed.
            if chunk.endswith(b"\r"):
                chunk = chunk[:-1]
                self._cr_pending = True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if b"\n" not in chunk:
            if chunk:
                self._pend.append(chunk)
            return []
        if self._pend:
            self._pend.append(chunk)
            chunk = b"".join(self._pend)
        lines = chunk.split(b"\n")
        tail = lines.pop()
        self._pend = [tail] if tail else []
        return self._lines(lines)

    def flush(self) -> list[str]:
        """End of stream: a held-back CR ends its line; an event missing only its final blank line is
        still dispatched (lenient: servers that end with `data: [DONE]\\n` are common). A line with no
        terminator at all is dropped, as the spec says, and `partial_tail` is set."""
        pending = b"".join(self._pend)
        self._pend = []
        lines: list[bytes] = []
        if self._cr_pending:
            self._cr_pending = False
            lines.append(pending)
            pending = b""
        self.partial_tail = bool(pending)
        out = self._lines(lines) if lines else []
        if self._data:
            out.append("\n".join(self._data))
            self._data = []
        return out

    def _lines(self, lines: list[bytes]) -> list[str]:
        out: list[str] = []
        data = self._data
        for line in lines:
            if not line:
                if data:
                    out.append("\n".join(data))
                    data.clear()
                continue
            if line.startswith(b"data:"):
                value = line[5:]
                if value.startswith(b" "):
                    value = value[1:]
                data.append(value.decode("utf-8", "replace"))
            elif line == b"data":
                data.append("")
            # Comments (':...') and every other field are ignored.
        return out
