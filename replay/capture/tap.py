"""Reading a proxied generation response for its token counts, without holding it up.

Pass-through (`observe`): bytes are forwarded first and looked at after, so parsing adds nothing
to the client's latency. Usage comes from the last event (or JSON body) carrying `usage`; output
tokens otherwise fall back to the number of events with text (one per event: an estimate).

Strip (`filter`), only for streams where the proxy itself added `stream_options.include_usage`:
complete SSE events are forwarded at once, except the usage-only event the server appends
(`"choices": []` with `usage`), which the client did not ask for. Bytes after the last complete
event wait for the rest of their event (servers write whole events, so normally nothing waits).
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from replay.targets.sse import SSEDecoder

MAX_BODY = 64 << 20  # a non-streamed body is parsed whole; beyond this it is not parsed
MAX_HELD = 1 << 20  # strip mode: an incomplete event this long is forwarded as is
_BOUNDARY = re.compile(rb"(\r\n\r\n|\n\n|\r\r)")


class ResponseTap:
    def __init__(self, streaming: bool, chat: bool, strip_usage: bool = False) -> None:
        self.streaming = streaming
        self.chat = chat
        self.strip = strip_usage and streaming
        self.usage: dict[str, Any] | None = None
        self.content_events = 0
        self.text_chars = 0
        self.error_status: int | None = None
        self.stripped = 0
        self.unparsed = False  # body too large or not JSON: counts unknown
        self._decoder = SSEDecoder()
        self._body: list[bytes] = []
        self._body_len = 0
        self._held = b""

    # ---- pass-through -------------------------------------------------------------------------------------

    def observe(self, chunk: bytes) -> None:
        if not self.streaming:
            self._body_len += len(chunk)
            if self._body_len <= MAX_BODY:
                self._body.append(chunk)
            return
        for payload in self._decoder.feed(chunk):
            self._event(payload)

    # ---- strip the usage-only event ---------------------------------------------------------------------

    def filter(self, chunk: bytes) -> bytes:
        """The bytes to forward for `chunk`: complete events, less an injected usage-only event."""
        data = self._held + chunk if self._held else chunk
        parts = _BOUNDARY.split(data)
        self._held = parts.pop()  # after the last boundary: an incomplete event (usually b"")
        if len(self._held) > MAX_HELD:
            parts.append(self._held)
            parts.append(b"")
            self._held = b""
        out: list[bytes] = []
        for i in range(0, len(parts) - 1, 2):
            event, sep = parts[i], parts[i + 1]
            payloads = SSEDecoder().feed(event + b"\n\n")
            if any(self._event(p) for p in payloads):
                self.stripped += 1
                continue
            out.append(event)
            out.append(sep)
        return b"".join(out)

    # ---- end of body --------------------------------------------------------------------------------------

    def finish(self) -> bytes:
        """End of the upstream body: what is left to forward (strip mode), after final parsing."""
        rest = b""
        if self.strip:
            rest, self._held = self._held, b""
            for p in SSEDecoder().feed(rest + b"\n\n"):
                self._event(p)
        elif self.streaming:
            for p in self._decoder.flush():
                self._event(p)
        elif self._body_len > MAX_BODY:
            self.unparsed = True
        elif self._body:
            self._json_body(b"".join(self._body))
        return rest

    def output_tokens(self) -> tuple[int, bool]:
        """(output tokens, estimated): the server's usage, else one per text event (or ~4 chars)."""
        if self.usage is not None and isinstance(self.usage.get("completion_tokens"), int):
            return self.usage["completion_tokens"], False
        if self.streaming:
            return self.content_events, True
        return -(-self.text_chars // 4), True

    def prompt_tokens(self) -> int | None:
        v = self.usage.get("prompt_tokens") if self.usage else None
        return v if isinstance(v, int) and not isinstance(v, bool) else None

    def _json_body(self, body: bytes) -> None:
        try:
            obj = orjson.loads(body)
        except orjson.JSONDecodeError:
            self.unparsed = True
            return
        if not isinstance(obj, dict):
            self.unparsed = True
            return
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]
        for c in obj.get("choices") or []:
            if isinstance(c, dict):
                msg = c.get("message") if self.chat else None
                text = msg.get("content") if isinstance(msg, dict) else c.get("text")
                if isinstance(text, str):
                    self.text_chars += len(text)

    def _event(self, payload: str) -> bool:
        """Take what one SSE event says; True when it is a usage-only event (choices == [])."""
        if payload == "[DONE]" or not payload.startswith("{"):
            return False
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return False
        if not isinstance(obj, dict):
            return False
        err = obj.get("error")
        if err is not None:
            code = err.get("code") if isinstance(err, dict) else None
            self.error_status = code if isinstance(code, int) and 400 <= code <= 599 else 500
            return False
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        choices = obj.get("choices")
        if choices == [] and isinstance(usage, dict):
            return True
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            c = choices[0]
            if self.chat:
                delta = c.get("delta")
                text = None
                if isinstance(delta, dict):
                    text = delta.get("content") or delta.get("reasoning_content")
            else:
                text = c.get("text")
            if text:
                self.content_events += 1
        return False
