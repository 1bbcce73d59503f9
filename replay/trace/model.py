"""The one internal trace record, and our own versioned JSONL trace format.

Every loader in `formats.py` turns its source into `TraceRecord`s; the scheduler turns those into
`Request`s. Our JSONL exists so a converted, synthesised or recorded trace round-trips without
loss: a header line `{"replay_trace": 1, ...}` then one record per line (see traces/README.md).
Reading and writing stream line by line: a trace can be larger than memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from replay.core.errors import ReplayError

FORMAT_VERSION = 1
HEADER_KEY = "replay_trace"

# Hash ids must stay below this so a looped trace can give each pass its own id range
# (pass p uses id + p * HASH_ID_LIMIT) without colliding with real ids.
HASH_ID_LIMIT = 1 << 40


@dataclass(slots=True)
class TraceRecord:
    """One request of a trace. `arrival_s` is seconds from the trace's first request.

    `hash_ids` name the request's prompt blocks of `block_size` tokens, first block first: two
    records sharing a leading run of hash ids share that many blocks of identical prompt prefix.
    Empty `hash_ids` means the trace says nothing about sharing, and the prompt is unique.
    """

    arrival_s: float
    input_tokens: int
    output_tokens: int
    prompt_text: str | None = None
    prompt_token_ids: list[int] | None = None
    hash_ids: tuple[int, ...] = ()
    block_size: int = 0
    session_id: str | None = None
    parent_id: str | None = None
    source_line: int = 0

    def to_json(self) -> dict[str, Any]:
        """Our JSONL line: fields left at their defaults are omitted to keep files small."""
        out: dict[str, Any] = {
            "arrival_s": round(self.arrival_s, 6),
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
        }
        if self.hash_ids:
            out["hash_ids"] = list(self.hash_ids)
            out["block_size"] = self.block_size
        if self.session_id is not None:
            out["session_id"] = self.session_id
        if self.parent_id is not None:
            out["parent_id"] = self.parent_id
        if self.prompt_text is not None:
            out["prompt_text"] = self.prompt_text
        if self.prompt_token_ids is not None:
            out["prompt_token_ids"] = self.prompt_token_ids
        return out


class RowError(Exception):
    """A bad field in one row; the loader adds file and line and decides to raise or count."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"field '{field}': {problem}")
        self.field = field
        self.problem = problem


# --- field helpers shared by every loader -------------------------------------------------


def req_int(row: dict[str, Any], key: str, field: str | None = None) -> int:
    """A required non-negative integer; integral floats ("472.0", 472.0) are accepted."""
    name = field or key
    if key not in row or row[key] is None or row[key] == "":
        raise RowError(name, "missing")
    return as_int(row[key], name)


def as_int(v: Any, field: str) -> int:
    if isinstance(v, bool):
        raise RowError(field, f"not an integer: {v!r}")
    if isinstance(v, int):
        n = v
    else:
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise RowError(field, f"not an integer: {v!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise RowError(field, f"not an integer: {v!r}")
        n = int(f)
    if n < 0:
        raise RowError(field, f"negative: {n}")
    return n


def as_float(v: Any, field: str) -> float:
    if v is None or v == "":
        raise RowError(field, "missing")
    if isinstance(v, bool):
        raise RowError(field, f"not a number: {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise RowError(field, f"not a number: {v!r}") from None
    if not math.isfinite(f):
        raise RowError(field, f"not a finite number: {v!r}")
    return f


def as_hash_ids(v: Any, field: str = "hash_ids") -> tuple[int, ...]:
    if not isinstance(v, list):
        raise RowError(field, f"not a list: {type(v).__name__}")
    out = []
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int) or x < 0 or x >= HASH_ID_LIMIT:
            raise RowError(field, f"not a hash id (integer in [0, 2**40)): {x!r}")
        out.append(x)
    return tuple(out)


def check_coverage(input_tokens: int, hash_ids: tuple[int, ...], block_size: int) -> None:
    """For formats whose hash ids hash the whole prompt: ceil(input / block) blocks, no fewer.

    More blocks than needed is tolerated (the prompt is truncated); fewer means the trace cannot
    say what the uncovered tokens share, so the row is malformed.
    """
    if not hash_ids:
        return
    need = -(-input_tokens // block_size)
    if len(hash_ids) < need:
        raise RowError(
            "hash_ids",
            f"too few blocks: {len(hash_ids)} x {block_size} tokens cover "
            f"{len(hash_ids) * block_size}, input length {input_tokens} needs {need}",
        )


# --- our JSONL ------------------------------------------------------------------------------


def make_header(source: str, **extra: Any) -> dict[str, Any]:
    return {HEADER_KEY: FORMAT_VERSION, "source": source, **extra}


def write_trace(path: str | Path, records: Iterable[TraceRecord], header: dict[str, Any]) -> int:
    """Write header + records as our JSONL, streaming. Returns the number of records written."""
    with open(path, "wb") as fh:
        return write_trace_to(fh, records, header)


def write_trace_to(fh: IO[bytes], records: Iterable[TraceRecord], header: dict[str, Any]) -> int:
    if header.get(HEADER_KEY) != FORMAT_VERSION:
        raise ValueError(f"header must carry {HEADER_KEY}={FORMAT_VERSION}")
    fh.write(orjson.dumps(header) + b"\n")
    n = 0
    for rec in records:
        fh.write(orjson.dumps(rec.to_json()) + b"\n")
        n += 1
    return n


def parse_header(line: bytes | str, where: str) -> dict[str, Any]:
    try:
        head = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        raise ReplayError(f"{where}: field 'replay_trace': header is not JSON: {e}") from None
    if not isinstance(head, dict) or HEADER_KEY not in head:
        raise ReplayError(f"{where}: field 'replay_trace': missing header line")
    if head[HEADER_KEY] != FORMAT_VERSION:
        raise ReplayError(
            f"{where}: field 'replay_trace': version {head[HEADER_KEY]!r} not supported "
            f"(this replay reads version {FORMAT_VERSION})"
        )
    return head


_KNOWN = {
    "arrival_s",
    "input_tokens",
    "output_tokens",
    "hash_ids",
    "block_size",
    "session_id",
    "parent_id",
    "prompt_text",
    "prompt_token_ids",
    # What `replay record` saw: endpoint, model, HTTP status, and whether a length was estimated.
    "endpoint",
    "model",
    "status",
    "estimated",
}


def parse_record(obj: Any, line_no: int) -> tuple[float, TraceRecord, set[str]]:
    """One line of our JSONL (already decoded). Returns (raw arrival, record, unknown keys)."""
    if not isinstance(obj, dict):
        raise RowError("record", f"not a JSON object: {type(obj).__name__}")
    t = as_float(obj.get("arrival_s"), "arrival_s")
    inp = req_int(obj, "input_tokens")
    out = req_int(obj, "output_tokens")
    hash_ids: tuple[int, ...] = ()
    block_size = 0
    if obj.get("hash_ids"):
        hash_ids = as_hash_ids(obj["hash_ids"])
        block_size = req_int(obj, "block_size")
        if block_size == 0:
            raise RowError("block_size", "must be > 0 when hash_ids are given")
    text = obj.get("prompt_text")
    if text is not None and not isinstance(text, str):
        raise RowError("prompt_text", "not a string")
    ids = obj.get("prompt_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(isinstance(x, int) and x >= 0 for x in ids):
            raise RowError("prompt_token_ids", "not a list of token ids")
        if len(ids) != inp:
            raise RowError("prompt_token_ids", f"{len(ids)} ids but input_tokens is {inp}")
    rec = TraceRecord(
        arrival_s=t,
        input_tokens=inp,
        output_tokens=out,
        prompt_text=text,
        prompt_token_ids=ids,
        hash_ids=hash_ids,
        block_size=block_size,
        session_id=_opt_str(obj.get("session_id")),
        parent_id=_opt_str(obj.get("parent_id")),
        source_line=line_no,
    )
    return t, rec, set(obj) - _KNOWN


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)
