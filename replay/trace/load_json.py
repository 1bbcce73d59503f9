"""JSON trace formats: Mooncake, Qwen-Bailian, ServeGen offline, ShareGPT, and our own JSONL.

Each line (or, for ShareGPT's single JSON array, each top-level element) is decoded on its own,
so files are streamed. Unknown keys are reported once by the driver and otherwise ignored.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from typing import IO, Any

from replay.trace.model import (
    RowError,
    TraceRecord,
    as_float,
    as_hash_ids,
    as_int,
    check_coverage,
    parse_record,
    req_int,
)

Parsed = tuple[float, TraceRecord | None, str | None]

# Rule of thumb for English with BPE tokenizers (OpenAI's "~4 characters per token"). Only used
# when no tokenizer is given; the stats and the convert header say the lengths are estimated.
CHARS_PER_TOKEN = 4.0


def estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


class JsonFormat:
    name = ""
    kind = "jsonl"
    timed = True
    time_field = "timestamp"
    known: frozenset[str] = frozenset()

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.notices: list[str] = []

    def parse(self, obj: Any, line_no: int) -> Parsed:
        raise NotImplementedError

    def unknown(self, obj: dict[str, Any]) -> set[str]:
        return set(obj) - self.known


def _obj(obj: Any) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise RowError("record", f"not a JSON object: {type(obj).__name__}")
    return obj


class Mooncake(JsonFormat):
    """Mooncake FAST'25 traces: `timestamp` in ms from the first request, 512-token blocks that
    hash the whole prompt (ceil(input_length / 512) ids)."""

    name = "mooncake"
    block_size = 512
    known = frozenset({"timestamp", "input_length", "output_length", "hash_ids"})

    def parse(self, obj: Any, line_no: int) -> Parsed:
        o = _obj(obj)
        t = as_float(o.get("timestamp"), "timestamp") / 1000.0
        inp = req_int(o, "input_length")
        out = req_int(o, "output_length")
        hashes = as_hash_ids(o.get("hash_ids", []))
        check_coverage(inp, hashes, self.block_size)
        rec = TraceRecord(t, inp, out, hash_ids=hashes, block_size=self.block_size, source_line=line_no)
        return t, rec, None


class Bailian(JsonFormat):
    """Qwen-Bailian usage traces (alibaba-edu/qwen-bailian-usagetraces-anon): `timestamp` float
    seconds, 16-token blocks over the whole prompt, `chat_id` per request and `parent_chat_id`
    (-1 for a root). The session id is the root chat of the chain, found through a map of
    chat id -> root that grows by one int pair per request."""

    name = "bailian"
    block_size = 16
    known = frozenset(
        {
            "chat_id",
            "parent_chat_id",
            "timestamp",
            "input_length",
            "output_length",
            "type",
            "turn",
            "hash_ids",
        }
    )

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        self.root: dict[int, int] = {}

    def parse(self, obj: Any, line_no: int) -> Parsed:
        o = _obj(obj)
        t = as_float(o.get("timestamp"), "timestamp")
        inp = req_int(o, "input_length")
        out = req_int(o, "output_length")
        chat = o.get("chat_id")
        parent = o.get("parent_chat_id", -1)
        if not isinstance(chat, int) or isinstance(chat, bool):
            raise RowError("chat_id", f"not an integer: {chat!r}")
        if not isinstance(parent, int) or isinstance(parent, bool):
            raise RowError("parent_chat_id", f"not an integer: {parent!r}")
        hashes = as_hash_ids(o.get("hash_ids", []))
        check_coverage(inp, hashes, self.block_size)
        root = chat if parent < 0 else self.root.get(parent, parent)
        self.root[chat] = root
        rec = TraceRecord(
            t,
            inp,
            out,
            hash_ids=hashes,
            block_size=self.block_size,
            session_id=str(root),
            parent_id=None if parent < 0 else str(parent),
            source_line=line_no,
        )
        return t, rec, None


class ServeGenOffline(JsonFormat):
    """ServeGen offline (batch) traces. A batch job is submitted whole, so there are no arrival
    times: every request arrives at 0 and request_id keeps the file order. trace_a-c carry
    16-token prefix hash ids but no output length (pass `default_output_tokens`); trace_d-f
    carry output lengths and durations but no hashes."""

    name = "servegen-offline"
    timed = False
    time_field = "request_id"
    block_size = 16
    known = frozenset(
        {"request_id", "type", "input_length", "output_length", "hash_ids", "img_ids", "duration"}
    )

    def parse(self, obj: Any, line_no: int) -> Parsed:
        o = _obj(obj)
        inp = req_int(o, "input_length")
        if "output_length" in o:
            out = req_int(o, "output_length")
        elif self.options.get("default_output_tokens") is not None:
            out = int(self.options["default_output_tokens"])
        else:
            raise RowError("output_length", "missing (this trace has none: give --default-output-tokens N)")
        hashes = as_hash_ids(o.get("hash_ids", []))
        check_coverage(inp, hashes, self.block_size)
        if o.get("type") == "multimodal" and not self.notices:
            self.notices.append("multimodal requests are replayed as text prompts of the same token length")
        rec = TraceRecord(
            0.0, inp, out, hash_ids=hashes, block_size=self.block_size if hashes else 0, source_line=line_no
        )
        return 0.0, rec, None


_TURN_KEYS = ("conversations", "conversation", "messages")
_HUMAN = {"human", "user"}
_BOT = {"gpt", "assistant", "chatgpt", "bard", "bing", "model"}


class ShareGPT(JsonFormat):
    """ShareGPT-style conversations (a JSON array, or one conversation per line). One record per
    conversation: its first human turn followed by a model turn gives the prompt text and the
    output length. No arrival times (all 0). Lengths come from `count_tokens` when given, else
    `estimate_tokens` (ceil(characters / 4))."""

    name = "sharegpt"
    timed = False
    time_field = "id"
    known = frozenset({"id", *_TURN_KEYS})

    def parse(self, obj: Any, line_no: int) -> Parsed:
        o = _obj(obj)
        turns = next((o[k] for k in _TURN_KEYS if k in o), None)
        if not isinstance(turns, list):
            raise RowError("conversations", "missing or not a list")
        count: Callable[[str], int] = self.options.get("count_tokens") or estimate_tokens
        for a, b in zip(turns, turns[1:], strict=False):
            if _speaker(a) in _HUMAN and _speaker(b) in _BOT:
                prompt, reply = _text(a), _text(b)
                if not prompt or not reply:
                    continue
                sid = o.get("id")
                rec = TraceRecord(
                    0.0,
                    count(prompt),
                    count(reply),
                    prompt_text=prompt,
                    session_id=None if sid is None else str(sid),
                    source_line=line_no,
                )
                return 0.0, rec, None
        return 0.0, None, "no human turn followed by a model reply"


def _speaker(turn: Any) -> str:
    if not isinstance(turn, dict):
        return ""
    return str(turn.get("from", turn.get("role", ""))).lower()


def _text(turn: dict[str, Any]) -> str:
    v = turn.get("value", turn.get("content", ""))
    return v if isinstance(v, str) else ""


class Replay(JsonFormat):
    """Our JSONL (traces/README.md); the driver has already checked the header line."""

    name = "replay"
    time_field = "arrival_s"

    def parse(self, obj: Any, line_no: int) -> Parsed:
        t, rec, unknown = parse_record(obj, line_no)
        self._unknown = unknown
        # A request `replay record` saw fail upstream: dropped and counted, unless keep_failures.
        status = obj.get("status")
        failed = status is not None and not 200 <= as_int(status, "status") < 300
        if failed and not self.options.get("keep_failures"):
            return t, None, "upstream error status"
        return t, rec, None

    def unknown(self, obj: dict[str, Any]) -> set[str]:
        return getattr(self, "_unknown", set())


JSON_FORMATS: tuple[type[JsonFormat], ...] = (Mooncake, Bailian, ServeGenOffline, ShareGPT, Replay)


def json_format_for_record(obj: Any) -> type[JsonFormat] | None:
    if not isinstance(obj, dict):
        return None
    keys = set(obj)
    if "replay_trace" in keys:
        return Replay
    if keys & set(_TURN_KEYS):
        return ShareGPT
    if {"chat_id", "parent_chat_id"} <= keys:
        return Bailian
    if "timestamp" in keys and "input_length" in keys:
        return Mooncake
    if "request_id" in keys and "input_length" in keys and "timestamp" not in keys:
        return ServeGenOffline
    return None


# --- streaming a top-level JSON array ---------------------------------------------------------

_TOKEN = re.compile(rb'["\\{}\[\]]')
_CHUNK = 1 << 20
_QUOTE, _BACKSLASH, _OPEN = ord('"'), ord("\\"), (ord("{"), ord("["))


def iter_json_array(fh: IO[bytes], chunk_size: int = _CHUNK) -> Iterator[tuple[int, bytes]]:
    """Yield (line number, raw bytes) of each element of a top-level JSON array, reading 1 MiB at
    a time: ShareGPT dumps are single arrays of hundreds of MB. Elements must be objects or
    arrays (ShareGPT's are objects). Only structural characters are visited; inside strings a
    backslash makes the next character literal."""
    buf = b""
    base_line = 1  # line number of buf[0]
    depth = 0
    in_str = False
    skip = -1  # index of a character escaped by a backslash
    start = -1  # index where the open element began
    scan = 0
    started = done = False
    while not done:
        chunk = fh.read(chunk_size)
        if not chunk:
            break
        buf += chunk
        for m in _TOKEN.finditer(buf, scan):
            i = m.start()
            if i == skip:
                continue
            c = buf[i]
            if not started:
                if c != _OPEN[1]:
                    raise RowError("record", "expected a JSON array of conversations")
                started = True
                continue
            if in_str:
                if c == _BACKSLASH:
                    skip = i + 1
                elif c == _QUOTE:
                    in_str = False
                continue
            if c == _QUOTE:
                in_str = True
            elif c in _OPEN:
                depth += 1
                if depth == 1:
                    start = i
            elif depth == 0:
                done = True  # the top-level array closed
                break
            else:
                depth -= 1
                if depth == 0:
                    yield base_line + buf.count(b"\n", 0, start), buf[start : i + 1]
                    start = -1
        # Drop what is consumed; an open element is kept and rescanning resumes at the old end.
        keep = start if start >= 0 else len(buf)
        base_line += buf.count(b"\n", 0, keep)
        buf = buf[keep:]
        scan = len(buf)
        skip -= keep
        if start >= 0:
            start = 0
    if not done:
        raise RowError("record", "file ends inside the JSON array (truncated?)")
