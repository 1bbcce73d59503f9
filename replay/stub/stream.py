"""The stub server's configuration and one request in flight (see core.py for the scheduler)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from replay.stub.protocol import Conn
from replay.stub.truth import Fault

FaultHook = Callable[[int, dict[str, Any]], Fault | None]
TOKEN = b" tok"
# SSE events in vLLM's shape, filled from per-request pieces (`head` ends in `"choices":[`).
CMPL = b'data: %s{"index":0,"text":"%s","logprobs":null,"finish_reason":%s,"stop_reason":null}]%s}\n\n'
CHAT = b'data: %s{"index":0,"delta":{"content":"%s"},"logprobs":null,"finish_reason":%s}]%s}\n\n'
ROLE = (b'data: %s{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
        b'"finish_reason":null}]%s}\n\n')  # fmt: skip
USAGE = b',"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}'
FINAL = b'data: %s],"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d}}\n\n'
# Token-id prompts longer than this (in JSON bytes, ~13k ids) are counted, not parsed.
_FAST_PROMPT_BYTES = 1 << 16


@dataclass(frozen=True)
class StubConfig:
    ttft_s: float = 0.020
    itl_s: float = 0.005
    # Service time noisy by construction: each request's first token (and so every later one) comes
    # this much later on average, exponentially distributed, drawn from a generator seeded by `seed`.
    ttft_jitter_s: float = 0.0
    tokens_per_chunk: int = 1
    max_concurrency: int = 0  # 0: unlimited
    usage: bool = True  # honour stream_options.include_usage
    continuous_usage: bool = False  # honour stream_options.continuous_usage_stats (vLLM extension)
    vllm: bool = False  # look like vLLM: GET /version, models owned_by "vllm"
    model: str = "stub-model"
    # More models served beside `model`, each with its own TTFT in seconds (a LoRA adapter that costs
    # more, a tenant on a slower route): tests of per-class figures key the truth on the model name.
    model_ttft: tuple[tuple[str, float], ...] = ()
    # Wake this long before a write is due and poll the loop until it is: loop timers have ~1 ms
    # resolution, polling keeps writes within microseconds of the schedule while I/O still runs.
    spin_s: float = 0.001
    faults: tuple[tuple[Fault, float], ...] = ()  # (fault, probability), drawn per request
    fault_hook: FaultHook | None = None  # (request index, JSON body) -> fault; for tests
    seed: int = 0
    api_key: str | None = None  # like vLLM --api-key: /v1/* then needs "Authorization: Bearer <key>"
    # > 0: a prompt token id >= this gets HTTP 400 with vLLM's text ("Token id N is out of vocabulary")
    vocab_size: int = 0


class Stream:
    """One generation request in flight (streamed or not)."""

    __slots__ = (
        "conn", "n", "sent", "base", "t_recv", "t_admit", "t_first", "t_prev", "head", "chat", "stream",
        "usage", "continuous", "prompt_tokens", "fault", "dead", "admitted", "keep_alive",
        "t_head", "request_id", "ttft_s",
    )  # fmt: skip

    def __init__(self, conn: Conn, t_recv: float, keep_alive: bool) -> None:
        self.conn = conn
        self.t_recv = t_recv
        self.t_head = conn.t_head  # when its first bytes arrived (t_recv: all of it)
        self.keep_alive = keep_alive
        self.n = 0
        self.sent = 0
        self.base = 0.0
        self.t_admit: float | None = None
        self.t_first: float | None = None
        self.t_prev: float | None = None
        self.head = b""
        self.chat = False
        self.stream = True
        self.usage = False
        self.continuous = False
        self.prompt_tokens = 0
        self.fault: Fault | None = None
        self.dead = False
        self.admitted = False
        self.request_id: str | None = None  # the client's own id (vLLM's request_id / X-Request-Id)
        self.ttft_s = 0.0  # its model's TTFT (StubConfig.ttft_s, or model_ttft's)


def content_event(s: Stream, c: int) -> bytes:
    """The SSE bytes of `s`'s chunk from token `s.sent` up to `c` (the role event first, in chat), with
    vLLM's continuous usage when asked and finish_reason "length" on the last."""
    usage = USAGE % (s.prompt_tokens, s.prompt_tokens + c, c) if s.continuous else b""
    finish = b'"length"' if c >= s.n else b"null"
    text = TOKEN * (c - s.sent)
    if not s.chat:
        return CMPL % (s.head, text, finish, usage)
    out = CHAT % (s.head, text, finish, usage)
    if s.sent == 0:
        role = USAGE % (s.prompt_tokens, s.prompt_tokens, 0) if s.continuous else b""
        out = ROLE % (s.head, role) + out
    return out


def http_chunk(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(body), body)


def out_of_vocab(req: dict[str, Any], vocab_size: int) -> str | None:
    """vLLM 0.32's refusal of a prompt id outside the vocabulary (renderers/base.py names the
    largest id), or None. Only token-id prompts are checked: text has no ids to refuse."""
    prompt = req.get("prompt")
    if vocab_size <= 0 or not isinstance(prompt, list) or not prompt:
        return None
    top = max(prompt)
    return f"Token id {top} is out of vocabulary" if top >= vocab_size else None


def parse_request(body: bytes, chat: bool, count_only: bool = True) -> tuple[dict[str, Any], int]:
    """The JSON body and its prompt length in tokens (ValueError/TypeError for a bad body).

    With `count_only`, a large token-id prompt in the compact form JSON encoders write (digits and
    commas only) is counted from its bytes and left out of the parse (`prompt` is then []): parsing
    and checking 120k ids costs the stub ~6 ms, and every other stream's writes and receive times
    (its truth) would queue behind that. Without it (a vocabulary to check) every id is parsed."""
    if count_only and not chat:
        i = body.find(b'"prompt":[')
        j = body.find(b"]", i)
        if i > 0 and j - i > _FAST_PROMPT_BYTES and body[i - 1] in b"{,":
            count = _count_ids(np.frombuffer(body, np.uint8, j - i - 10, i + 10))
            if count:
                req = orjson.loads(body[: i + 10] + body[j:])
                if isinstance(req, dict) and req.get("prompt") == []:
                    return req, count
    req = orjson.loads(body)
    if not isinstance(req, dict):
        raise ValueError("body is not a JSON object")
    return req, count_prompt(req, chat)


def _count_ids(a: np.ndarray) -> int:
    """How many ids the bytes `a` hold ("12,7,3001"), vectorised; 0 unless exactly that form."""
    comma = a == 44
    if not ((a - 48 <= 9) | comma).all() or comma[0] or comma[-1] or (comma[1:] & comma[:-1]).any():
        return 0
    return int(np.count_nonzero(comma)) + 1


def count_prompt(req: dict[str, Any], chat: bool) -> int:
    """Prompt tokens as the stub counts them: ids as given, text as whitespace-separated words."""
    if chat:
        msgs = req.get("messages")
        if not isinstance(msgs, list):
            raise ValueError("messages must be a list")
        return sum(len(str(m.get("content") or "").split()) for m in msgs if isinstance(m, dict))
    prompt = req.get("prompt")
    if isinstance(prompt, list) and all(isinstance(x, int) for x in prompt):
        return len(prompt)
    if isinstance(prompt, str):
        return len(prompt.split())
    raise ValueError("prompt must be a string or a list of token ids")
