"""The one data model that flows trace -> schedule -> engine -> target -> recorder -> report.

`Request` is what to send and when; `RequestRecord` is what happened to it. Targets fill
a record's timing fields with `time.perf_counter()` values (one monotonic clock for every
thread and process on a host); the engine rebases them to seconds from run start before
anyone else sees the record, so every consumer reads run-relative seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from replay.core.prompt import TokenIds

OK = "ok"
ERROR = "error"
NOT_SENT = "not_sent"
UNFINISHED = "unfinished"  # still in flight when the drain deadline passed: neither ok nor an error
ABANDONED = "abandoned"  # the client left on purpose (a user closing the tab): not a server error
PROBE = "probe"  # Request.klass of the probe stream: fixed small requests beside the load (--probe-rate)
# Order of a request's own ITL summary in requests.jsonl ("itl_s"): per-request SLOs need it,
# and the chunk arrays themselves are not kept.
ITL_STATS = ("p50", "p90", "p95", "p99", "p99.9", "max", "mean")
_EMPTY = np.zeros(0)
_FEW_CHUNKS = 16  # up to this many chunks, ITL work is done in plain Python (RequestRecord.itl_runs)


@dataclass(slots=True)
class Request:
    """One scheduled request. `intended_s` is its offset from run start on the absolute timeline.

    `prepared` is the target's wire form of it (an HTTP body), made ahead of its send time by the
    engine's look-ahead through the target's optional `prepare()`; None: the target makes it at send.
    """

    id: int
    intended_s: float
    input_tokens: int
    output_tokens: int
    prompt_text: str | None = None
    prompt_token_ids: list[int] | TokenIds | None = None
    session_id: str | None = None
    prefix_hash_ids: tuple[int, ...] = ()
    prefix_block_size: int = 0
    prepared: bytes | None = None
    # The client leaves (cancels, closing the connection) this long after the intended send time,
    # if the request is still going then; None: it stays to the end.
    abandon_after_s: float | None = None
    klass: str | None = None  # measured apart: PROBE, or a --classes class; None: the main load
    turn: int | None = None  # a conversation's turn, 1-based (metrics per turn index); None: no session
    model: str | None = None  # the "model" to ask for (a class's adapter, --classes); None: the target's


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request. Times are seconds (run-relative once `rebase` ran).

    `None` means "not reached" (never 0.0): a request that failed before its first token
    has `first_token_s is None`.
    """

    id: int
    intended_s: float
    input_tokens: int = 0  # requested length; finish_tokens() replaces it with the server's count
    requested_output_tokens: int = 0
    requested_input_tokens: int = 0  # the prompt length asked for, kept when input_tokens is replaced
    dispatch_s: float | None = None  # when the engine woke for it (timer accuracy)
    sent_s: float | None = None  # when it went to the target (after any concurrency-cap wait)
    first_byte_s: float | None = None
    first_token_s: float | None = None
    end_s: float | None = None
    chunk_s: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    events: int = 0  # token-carrying events received (a bulk of same-read events is one chunk entry)
    output_tokens: int = 0
    usage_input_tokens: int | None = None
    usage_output_tokens: int | None = None
    status: str = NOT_SENT
    error: str | None = None
    error_detail: str | None = None
    http_status: int | None = None
    worker: int = 0
    abandon_after_s: float | None = None  # drawn patience (Request.abandon_after_s), if any
    klass: str | None = None  # Request.klass
    turn: int | None = None  # Request.turn

    def add_chunk(self, t: float, tokens: int) -> None:
        """Record a streamed chunk carrying `tokens` output tokens (0 for role/usage-only chunks)."""
        if tokens <= 0:
            return
        if self.first_token_s is None:
            self.first_token_s = t
        self.events += 1
        self.chunk_s.append(t)
        self.chunk_tokens.append(tokens)

    def streamed_tokens(self) -> int:
        return sum(self.chunk_tokens)

    def prompt_length_error(self) -> int | None:
        """Server-reported prompt tokens minus the requested prompt length; None when unreported."""
        if self.usage_input_tokens is None:
            return None
        return self.usage_input_tokens - self.requested_input_tokens

    def finish_tokens(self) -> None:
        """Output tokens: the server's usage count when it gave one, else what was streamed."""
        if self.usage_output_tokens is not None:
            self.output_tokens = self.usage_output_tokens
        else:
            self.output_tokens = self.streamed_tokens()
        if self.usage_input_tokens is not None:
            self.input_tokens = self.usage_input_tokens

    def rebase(self, t0: float) -> None:
        """Turn absolute perf_counter stamps into seconds from run start `t0`."""
        if self.dispatch_s is not None:
            self.dispatch_s -= t0
        if self.sent_s is not None:
            self.sent_s -= t0
        if self.first_byte_s is not None:
            self.first_byte_s -= t0
        if self.first_token_s is not None:
            self.first_token_s -= t0
        if self.end_s is not None:
            self.end_s -= t0
        if self.chunk_s:  # one vectorised subtraction, not a Python loop per token
            self.chunk_s = (np.asarray(self.chunk_s, dtype=np.float64) - t0).tolist()

    # Derived latencies, in seconds; None when the request never got that far.
    def ttft(self) -> float | None:
        if self.first_token_s is None or self.sent_s is None:
            return None
        return self.first_token_s - self.sent_s

    def ttft_intended(self) -> float | None:
        """TTFT from the intended send time: includes any queueing the client added (CO-corrected)."""
        if self.first_token_s is None:
            return None
        return self.first_token_s - self.intended_s

    def e2e(self) -> float | None:
        if self.end_s is None or self.sent_s is None:
            return None
        return self.end_s - self.sent_s

    def e2e_intended(self) -> float | None:
        if self.end_s is None:
            return None
        return self.end_s - self.intended_s

    def send_lag(self) -> float | None:
        """Actual send minus intended send: timer lateness plus any concurrency-cap wait."""
        if self.sent_s is None:
            return None
        return self.sent_s - self.intended_s

    def dispatch_lag(self) -> float | None:
        """Timer lateness alone: how far behind schedule the generator itself was."""
        if self.dispatch_s is None:
            return None
        return self.dispatch_s - self.intended_s

    def tpot(self) -> float | None:
        """Mean time per output token after the first: (end - first token) / (tokens - 1)."""
        if self.first_token_s is None or self.end_s is None or self.output_tokens < 2:
            return None
        return (self.end_s - self.first_token_s) / (self.output_tokens - 1)

    def itls(self) -> np.ndarray:
        """Inter-token latencies. A chunk carrying k tokens after a gap g yields k samples of g/k,
        so every streamed token after the first contributes exactly one ITL sample. Vectorised: a
        response can stream thousands of tokens and this runs on the event loop."""
        n = len(self.chunk_s)
        if n == 0:
            return _EMPTY
        k = np.asarray(self.chunk_tokens, dtype=np.int64)
        gaps = np.diff(np.asarray(self.chunk_s, dtype=np.float64)) / k[1:]
        out = np.repeat(gaps, k[1:])
        first_extra = int(k[0]) - 1  # extra tokens in the first chunk arrived with zero gap
        return np.concatenate((out, np.zeros(first_extra))) if first_extra > 0 else out

    def itl_runs(self) -> list[tuple[float, int]] | None:
        """The ITL samples as (gap, count) runs, the same values as `itls()`, computed in plain Python
        when the response came in few chunks (a burst read at once, or few large chunks), where numpy's
        per-call cost (~1 us a call, ten calls) is most of the work; None for many chunks."""
        n = len(self.chunk_s)
        if n > _FEW_CHUNKS:
            return None
        ts, ks = self.chunk_s, self.chunk_tokens
        runs = [((ts[i] - ts[i - 1]) / ks[i], ks[i]) for i in range(1, n)]
        if n and ks[0] > 1:
            runs.append((0.0, ks[0] - 1))  # extra tokens in the first chunk arrived with zero gap
        return runs

    def itl_stats(self) -> list[float] | None:
        """This request's own ITLs summarised in `ITL_STATS` order (nearest-rank percentiles);
        None when it has no ITL sample (fewer than two tokens)."""
        runs = self.itl_runs()
        if runs is not None:
            return _run_stats(runs)
        gaps = self.itls()
        n = len(gaps)
        if n == 0:
            return None
        gaps = np.sort(gaps)
        ranks = [max(0, math.ceil(q * n / 100) - 1) for q in (50, 90, 95, 99, 99.9)]
        out = [float(gaps[r]) for r in ranks] + [float(gaps[-1]), float(gaps.sum()) / n]
        return [round(x, 6) for x in out]

    def to_json(self) -> dict[str, Any]:
        """The requests.jsonl line: run-relative seconds, no chunk arrays (they stay in histograms)."""
        return {
            "id": self.id,
            "worker": self.worker,
            "intended_s": _r(self.intended_s),
            "dispatch_s": _r(self.dispatch_s),
            "sent_s": _r(self.sent_s),
            "first_byte_s": _r(self.first_byte_s),
            "first_token_s": _r(self.first_token_s),
            "end_s": _r(self.end_s),
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "requested_output_tokens": self.requested_output_tokens,
            "requested_input_tokens": self.requested_input_tokens,
            "chunks": self.events,
            "itl_s": self.itl_stats(),
            "status": self.status,
            "error": self.error,
            "error_detail": self.error_detail,
            "http_status": self.http_status,
            **({} if self.abandon_after_s is None else {"abandon_after_s": _r(self.abandon_after_s)}),
            **({} if self.klass is None else {"class": self.klass}),
            **({} if self.turn is None else {"turn": self.turn}),
        }


def _run_stats(runs: list[tuple[float, int]]) -> list[float] | None:
    """`itl_stats` over (gap, count) runs: the same nearest ranks, walked over cumulative counts."""
    runs = sorted(r for r in runs if r[1] > 0)
    n = sum(c for _, c in runs)
    if n == 0:
        return None
    out: list[float] = []
    ranks = iter([max(0, math.ceil(q * n / 100) - 1) for q in (50, 90, 95, 99, 99.9)])
    rank = next(ranks)
    seen = 0
    for gap, c in runs:
        seen += c
        while rank is not None and rank < seen:
            out.append(gap)
            rank = next(ranks, None)
    total = sum(g * c for g, c in runs)
    out += [runs[-1][0], total / n]
    return [round(x, 6) for x in out]


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def record_for(req: Request) -> RequestRecord:
    return RequestRecord(
        id=req.id,
        intended_s=req.intended_s,
        input_tokens=req.input_tokens,
        requested_output_tokens=req.output_tokens,
        requested_input_tokens=req.input_tokens,
        abandon_after_s=req.abandon_after_s,
        klass=req.klass,
        turn=req.turn,
    )
