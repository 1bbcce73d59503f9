"""The trace side of `replay record`: what a proxied request becomes in our JSONL.

Prompts are never stored as text unless asked (`keep_prompts`). What is stored instead is the
prompt's shape: its length (the server's usage count) and, when the token ids are known (a
token-id prompt, or a text prompt run through `--tokenizer`), prefix block hashes chained the way
vLLM's prefix cache chains them: block i's hash covers block i's ids and block i-1's hash, so two
prompts share hash i exactly when their first (i+1) * B tokens are identical. Only full blocks are
hashed (a partial last block is never shared in vLLM's cache either). Digests are renumbered to
small integers in first-seen order, to fit TraceRecord's hash id range; the map lives for the
proxy's lifetime (about 100 bytes per distinct block).

Records complete in any order but our JSONL must be sorted by arrival, so completed records wait
in `OrderedTraceWriter` until every earlier arrival has completed (or is given up at exit).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from replay.core import extras
from replay.core.errors import ReplayError
from replay.trace.model import TraceRecord, make_header

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
ENDPOINTS = {COMPLETIONS: "completions", CHAT: "chat"}


class PrefixHasher:
    """Chained hashes of full `block_size`-token blocks, numbered 0, 1, 2, ... in first-seen order."""

    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ReplayError(f"--block-size: must be > 0, got {block_size}")
        self.block_size = block_size
        self._ids: dict[bytes, int] = {}

    def hash_ids(self, token_ids: Sequence[int]) -> tuple[int, ...]:
        b = self.block_size
        parent = b""
        out: list[int] = []
        for start in range(0, len(token_ids) - b + 1, b):
            block = array("q", token_ids[start : start + b]).tobytes()
            digest = hashlib.blake2b(parent + block, digest_size=16).digest()
            out.append(self._ids.setdefault(digest, len(self._ids)))
            parent = digest
        return tuple(out)

    def __len__(self) -> int:
        return len(self._ids)


@dataclass(slots=True)
class Prompt:
    """What a request body says about its prompt. `batched`: several prompts in one request (only
    the usage totals are recorded for it)."""

    token_ids: list[int] | None = None
    text: str | None = None
    messages: list[dict[str, Any]] | None = None
    batched: bool = False


def _is_ids(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)


def parse_prompt(path: str, body: dict[str, Any]) -> Prompt:
    """The prompt of a /v1/completions or /v1/chat/completions body (shapes the OpenAI API allows)."""
    if path == CHAT:
        msgs = body.get("messages")
        if not isinstance(msgs, list):
            return Prompt()
        parts = []
        for m in msgs:
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, str):
                parts.append(c)
            elif isinstance(c, list):  # content parts: keep the text ones
                parts.extend(p["text"] for p in c if isinstance(p, dict) and isinstance(p.get("text"), str))
        return Prompt(text="\n".join(parts), messages=[m for m in msgs if isinstance(m, dict)])
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and (isinstance(p[0], str) or _is_ids(p[0])):
        p = p[0]  # a batch of one is one prompt
    if isinstance(p, str):
        return Prompt(text=p)
    if isinstance(p, list) and p and _is_ids(p):
        return Prompt(token_ids=p)
    return Prompt(batched=isinstance(p, list) and len(p) > 1)


Encoder = Callable[[Prompt], list[int] | None]


def load_encoder(spec: str) -> Encoder:
    """Text -> token ids with a tokenizer.json file or a local HF model directory; for chat with a
    directory, the model's chat template is applied (what the server tokenizes)."""
    path = Path(spec)
    extras.require("local", f"--tokenizer {spec}", *(("tokenizers",) if path.is_file() else extras.LOCAL[1:]))
    try:
        if path.is_file():
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(path))
            return lambda p: tok.encode(p.text).ids if p.text is not None else None
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # library errors become one line at this boundary
        raise ReplayError(f"--tokenizer {spec}: cannot load: {type(exc).__name__}: {exc}") from None

    def encode(p: Prompt) -> list[int] | None:
        if p.messages is not None and getattr(hf, "chat_template", None):
            out = hf.apply_chat_template(p.messages, tokenize=True, add_generation_prompt=True)
            ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
            return list(ids)
        return hf.encode(p.text) if p.text is not None else None

    return encode


def trace_line(
    rec: TraceRecord, *, endpoint: str, model: str | None, status: int, estimated: bool
) -> dict[str, Any]:
    """Our JSONL record plus what the proxy saw (readers know these keys; see traces/README.md)."""
    out = rec.to_json()
    out["endpoint"] = endpoint
    if model is not None:
        out["model"] = model
    out["status"] = status
    if estimated:
        out["estimated"] = True
    return out


class OrderedTraceWriter:
    """Appends records in arrival order, flushed as written. `slot()` at arrival; `fill()` when done."""

    def __init__(self, path: Path, header: dict[str, Any]) -> None:
        if path.exists() and path.stat().st_size > 0:
            raise ReplayError(f"--out {path}: exists; refusing to overwrite a recorded trace")
        try:
            self._fh: IO[bytes] = open(path, "wb")  # noqa: SIM115 - held open for the proxy's lifetime
        except OSError as exc:
            raise ReplayError(f"--out {path}: cannot write: {exc.strerror}") from None
        self._fh.write(orjson.dumps(make_header("record", **header)) + b"\n")
        self._fh.flush()
        self._next_slot = 0
        self._next_write = 0
        self._done: dict[int, bytes | None] = {}
        self.written = 0
        self.incomplete = 0
        self.closed = False

    def slot(self) -> int:
        n = self._next_slot
        self._next_slot += 1
        return n

    def fill(self, slot: int, line: dict[str, Any] | None) -> None:
        """Record `slot`'s line (None: nothing to write for it) and write every line now in order."""
        if self.closed:  # finished after the trace was closed: it was counted as incomplete
            return
        self._done[slot] = None if line is None else orjson.dumps(line) + b"\n"
        wrote = False
        while self._next_write in self._done:
            data = self._done.pop(self._next_write)
            self._next_write += 1
            if data is not None:
                self._fh.write(data)
                self.written += 1
                wrote = True
        if wrote:
            self._fh.flush()

    def give_up(self, slot: int) -> None:
        """`slot` will never complete (cut off at shutdown): counted, nothing written for it."""
        if not self.closed:
            self.incomplete += 1
            self.fill(slot, None)

    @property
    def waiting(self) -> int:
        """Completed records held back behind an earlier arrival still in flight."""
        return len(self._done)

    def close(self) -> None:
        """Write what completed, in order; requests still in flight are left out (and counted)."""
        for slot in range(self._next_write, self._next_slot):
            if slot not in self._done:
                self.incomplete += 1
                continue
            data = self._done.pop(slot)
            if data is not None:
                self._fh.write(data)
                self.written += 1
        self._next_write = self._next_slot
        self.closed = True
        self._fh.close()
