"""One streamed OpenAI response into its RequestRecord: the sink `http_stream.Conn` feeds, per socket
read, with that read's time stamp.

Per event only what the numbers need: orjson on the payload bytes (never decoded to text), then
the error, the choice's text or delta (its finish_reason), and usage. Tokens per chunk: with vLLM's
continuous usage stats, the increase of usage.completion_tokens (a chunk carrying several tokens
counts as several); otherwise one per chunk with non-empty text. `end_s` is the read that brought
[DONE] (else the end of the body); nothing after [DONE] counts.
"""

from __future__ import annotations

from typing import Any

import orjson

from replay.core import errors
from replay.core.request import RequestRecord
from replay.targets.http_failures import Failure, Watchdog
from replay.targets.sse import SSEDecoder

_ERROR_BODY_MAX = 4096  # bytes of a non-200 body read for its message
# A read bringing more events than this has its middle ones checked in bulk (OpenAIStream._bulk); the
# first one and the last _TAIL (last content event, final usage, [DONE]) are always parsed.
_BULK_MIN, _TAIL = 8, 3


class OpenAIStream:
    """`head` / `body` / `end` of one response (the http_stream.Sink protocol); each raises a Failure
    when the response is not a complete, well-formed stream."""

    __slots__ = ("record", "wd", "chat", "continuous", "decoder", "done", "finished", "prev_completion",
                 "error_body", "prefix")  # fmt: skip

    def __init__(self, record: RequestRecord, wd: Watchdog, chat: bool, continuous: bool) -> None:
        self.record = record
        self.wd = wd
        self.chat = chat
        self.continuous = continuous
        self.decoder = SSEDecoder()
        self.done = False  # [DONE] seen
        self.finished = False  # a finish_reason seen
        self.prev_completion = 0
        self.error_body: bytearray | None = None  # set for a non-200 answer
        self.prefix: bytes | None = None  # a parsed content event's bytes up to its choices (see _bulk)

    def head(self, status: int, content_type: bytes, t: float) -> None:
        rec = self.record
        rec.first_byte_s = t
        rec.http_status = status
        if status != 200:
            self.error_body = bytearray()
        elif content_type != b"text/event-stream":
            got = content_type.decode("latin-1") or "no content type"
            raise Failure(errors.MALFORMED, f"expected text/event-stream, got {got}")

    def body(self, pieces: list[bytes], t: float) -> None:
        if self.error_body is not None:
            for piece in pieces:
                self.error_body += piece
            if len(self.error_body) >= _ERROR_BODY_MAX:
                raise self._status_failure()
            return
        if self.wd.kind is not None:
            return  # a deadline fired: the request is being failed, later bytes do not count
        self._events(self.decoder.events_of(pieces), t)

    def end(self, t: float) -> None:
        self.wd.cancel()  # complete: no deadline may fire between here and the sender resuming
        if self.wd.kind is not None:
            return  # one already fired: the sender records it
        if self.error_body is not None:
            raise self._status_failure()
        self._events(self.decoder.flush_events(), t)
        rec = self.record
        if rec.end_s is None:
            rec.end_s = t
        if not self.done and not self.finished:
            tail = " (mid-line)" if self.decoder.partial_tail else ""
            raise Failure(errors.TRUNCATED, f"stream ended without [DONE] or finish_reason{tail}")

    def _events(self, payloads: list[bytes], t: float) -> None:
        if self.done or not payloads:
            return  # nothing counts after [DONE]
        if len(payloads) > _BULK_MIN:
            self._parsed(payloads[:1], t)
            mids = payloads[1:-_TAIL]
            tokens = self._bulk(mids)
            if tokens is None:
                self._parsed(mids, t)  # not the plain shape: every event parsed
            else:
                rec = self.record
                if tokens:
                    if rec.first_token_s is None:
                        self.wd.first_token(t)
                    rec.add_chunk(t, tokens)  # came with the first: ITL samples of 0, as one by one
                    self.wd.last = t
                rec.events += len(mids) - (1 if tokens else 0)
            self._parsed(payloads[-_TAIL:], t)
            return
        if len(payloads) == 1 and self._plain(payloads[0]):
            # One token event in its own read (a token stream's usual shape under light load): counted
            # without parsing. orjson builds ~5 containers per event, and at 25k events/s those
            # allocations alone ran a young garbage collection on the loop ~180 times a second.
            rec = self.record
            if rec.first_token_s is None:
                self.wd.first_token(t)
            rec.add_chunk(t, 1)
            self.wd.last = t
            return
        self._parsed(payloads, t)

    def _plain(self, p: bytes) -> bool:
        """`p` is a mid-stream content event of the shape `_bulk` checks, with no usage: parsed, it
        counts one token (with usage, continuous usage counts its tokens: it is parsed)."""
        return b'"usage":' not in p and self._framed(p, 1) and self._one_token_each(p, 1)

    def _framed(self, joined: bytes, n: int) -> bool:
        """`n` events joined by LF each start with this stream's prefix (one choice) and carry
        finish_reason null and no error: counted by byte patterns, in C."""
        prefix = self.prefix
        return (
            prefix is not None
            and not self.done
            and joined[: len(prefix)] == prefix
            and (n == 1 or joined.count(b"\n" + prefix) == n - 1)
            and joined.count(b'"finish_reason":null') == n
            and b'"error":' not in joined
        )

    def _one_token_each(self, joined: bytes, n: int) -> bool:
        """Each of the `n` framed events has non-empty text (the parsed path's one token each)."""
        if self.chat:
            return joined.count(b'"delta":{"content":"') == n and b'"content":""' not in joined
        return joined.count(b'"text":"') == n and b'"text":""' not in joined

    def _bulk(self, mids: list[bytes]) -> int | None:
        """The tokens carried by events that arrived in one read between two parsed ones, when every one
        has the plain shape of this stream's parsed events (checked by counting byte patterns over them
        all, in C); else None, and they are parsed one by one. Parsing each costs ~1.5 us of the client's
        core (orjson ~0.75 us, then the Python per event); a burst of 256 tokens in one read would cost
        ~0.4 ms. Same time stamp, so the ITL samples are the same. With continuous usage the next parsed
        event's usage counts these events' tokens; otherwise each carries one (none may be empty)."""
        n = len(mids)
        joined = b"\n".join(mids)
        # Every separator followed by the prefix: each event starts with it (one more match anywhere,
        # or an event without it, and the count is off); none ends the stream.
        if not self._framed(joined, n):
            return None
        if self.continuous:
            with_usage = joined.count(b'"usage":{')
            if with_usage == n:
                return 0  # the next parsed event's usage counts them
            if with_usage or b'"usage":' in joined:
                return None
            # No usage on them (a server that ignores continuous_usage_stats): one token each, as parsed.
        return n if self._one_token_each(joined, n) else None

    def _parsed(self, payloads: list[bytes], t: float) -> None:
        if self.done or not payloads:
            return
        rec = self.record
        loads = orjson.loads
        chat = self.chat
        continuous = self.continuous
        prev = self.prev_completion
        usage = got = None
        p = b""
        try:
            for p in payloads:
                if p == b"[DONE]":
                    self.done = True
                    rec.end_s = t
                    break
                obj = loads(p)
                err = obj.get("error")
                if err is not None:
                    raise _stream_error(err)
                u = obj.get("usage")
                if u:
                    usage = u
                choices = obj.get("choices")
                if not choices:
                    continue
                c = choices[0]
                if self.prefix is None:
                    self.prefix = _prefix(p, choices)
                if c.get("finish_reason") is not None:
                    self.finished = True
                if continuous and u:
                    n = u["completion_tokens"]
                    tokens = n - prev
                    prev = n
                else:
                    if chat:
                        delta = c.get("delta") or {}
                        text = delta.get("content") or delta.get("reasoning_content")
                    else:
                        text = c.get("text")
                    if not text:
                        continue
                    tokens = 1
                if tokens > 0:
                    if got is None and rec.first_token_s is None:
                        self.wd.first_token(t)
                    got = True
                    rec.add_chunk(t, tokens)
        except (AttributeError, TypeError, KeyError, IndexError) as exc:
            # Valid JSON of the wrong shape (e.g. choices not a list of objects).
            shown = p[:80].decode("utf-8", "replace")
            raise Failure(errors.MALFORMED, f"unexpected event shape ({exc}): {shown!r}") from None
        finally:
            self.prev_completion = prev
            if got:
                self.wd.last = t  # the stall deadline runs from the latest token
            if isinstance(usage, dict):
                rec.usage_output_tokens = usage.get("completion_tokens")
                rec.usage_input_tokens = usage.get("prompt_tokens")

    def _status_failure(self) -> Failure:
        """A short message from an error body: OpenAI/vLLM `message`, FastAPI `detail`, else the text."""
        raw = bytes(self.error_body or b"")[:_ERROR_BODY_MAX]
        status = self.record.http_status or 0
        text = raw.decode("utf-8", "replace")
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, dict):
            inner = doc.get("error") if isinstance(doc.get("error"), dict) else doc
            msg = inner.get("message") or inner.get("detail")
            if msg:
                text = str(msg)
        return Failure(errors.http_status_kind(status), f"HTTP {status}: " + " ".join(text.split()), status)


def _prefix(payload: bytes, choices: Any) -> bytes | None:
    """A content event's bytes up to and including `"choices":[` (id, object, created, model: constant
    over a vLLM or OpenAI stream), when that is where its single choice starts."""
    i = payload.find(b'"choices":[{')
    if i < 0 or not isinstance(choices, list) or len(choices) != 1 or payload.count(b'"choices":') != 1:
        return None
    return payload[: i + 11]


def _stream_error(err: Any) -> Failure:
    """vLLM reports a failure mid-stream as an event `{"error": {...}}` with an HTTP-like code."""
    msg = err.get("message") if isinstance(err, dict) else err
    code = err.get("code") if isinstance(err, dict) else None
    kind = errors.http_status_kind(code) if isinstance(code, int) and 400 <= code <= 599 else errors.MALFORMED
    return Failure(kind, f"error event in stream: {str(msg)[:150]}", code if isinstance(code, int) else None)
