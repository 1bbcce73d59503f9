"""What the stub server actually served (its "truth"), and the faults it can inject.

The truth is taken from the stub's own write times, not its schedule, so a stub that falls
behind under load reports it (`late_ms`) instead of silently flattering the client under test.
Conventions match `RequestRecord` so client and server figures compare one to one:
TTFT runs from when the request was fully received (queueing included) to the write of the
first token; a chunk of k tokens written g seconds after the previous one yields k ITL samples
of g/k, and the first chunk's extra k-1 tokens yield ITL samples of 0.
"""

from __future__ import annotations

import re
from array import array
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

import numpy as np
from hdrh.histogram import HdrHistogram

from replay.core.errors import ReplayError
from replay.stats import histogram as H

FAULT_KINDS = ("http", "reset", "truncate", "malformed", "stall")
_FAULT_RE = re.compile(r"^(?:http_(\d{3})|(reset|truncate|malformed|stall)(?:@(\d+))?(?::([0-9.]+))?)$")


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected failure. `at_chunk` is the 0-based content chunk at which it strikes.

    http: answer `status` with a JSON error at once (no stream); reset: abort the connection
    instead of writing chunk `at_chunk`; truncate: end the HTTP body cleanly before chunk
    `at_chunk`, with no finish_reason and no [DONE]; malformed: write a broken JSON event in place
    of chunk `at_chunk` and end the stream; stall: write nothing for `stall_s` before chunk `at_chunk`.
    """

    kind: str
    at_chunk: int = 0
    status: int = 500
    stall_s: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> Fault:
        """`http_500`, `reset@3`, `truncate@5`, `malformed@0`, `stall@4:2.5` (seconds)."""
        m = _FAULT_RE.match(spec.strip())
        if m is None:
            raise ReplayError(
                f"fault: bad spec {spec!r} (http_NNN, reset@N, truncate@N, malformed@N or stall@N:SECONDS)"
            )
        status, kind, at, stall = m.groups()
        if status is not None:
            return cls("http", status=int(status))
        if kind == "stall" and not stall:
            raise ReplayError(f"fault: {spec!r}: stall needs a duration, e.g. stall@4:2.5")
        return cls(kind, at_chunk=int(at or 0), stall_s=float(stall or 0.0))

    def label(self) -> str:
        return f"http_{self.status}" if self.kind == "http" else self.kind


def parse_fault_rule(text: str) -> tuple[Fault, float]:
    """`SPEC:PROB` from the command line, e.g. `reset@3:0.01` or `stall@2:1.5:0.1`."""
    spec, sep, prob = text.rpartition(":")
    try:
        p = float(prob)
    except ValueError:
        p = -1.0
    if not sep or not 0.0 <= p <= 1.0:
        raise ReplayError(f"--fault: {text!r}: expected SPEC:PROBABILITY with a probability in [0, 1]")
    return Fault.parse(spec), p


class _Batched:
    """Per-chunk samples (integer microseconds) buffered, then recorded per distinct value.

    hdrh's record_value is pure Python (about 1 us a call), which at 50k writes/s would be a large
    share of the stub's core; ITL and lateness samples bunch on few distinct values, so recording
    `(value, count)` pairs every few thousand samples costs a small fraction of that."""

    __slots__ = ("hist", "buf")
    LIMIT = 16384

    def __init__(self) -> None:
        self.hist = H.new()
        self.buf = array("q")

    def flush(self) -> HdrHistogram:
        if self.buf:
            vals = np.clip(np.frombuffer(self.buf, dtype=np.int64), 0, H.HIGHEST)
            self.buf = array("q")
            for v, c in zip(*(x.tolist() for x in np.unique(vals, return_counts=True)), strict=True):
                self.hist.record_value(v, c)
        return self.hist


class Truth:
    """Served-truth accumulator: HDR histograms in integer microseconds plus counts."""

    DETAIL_KEEP = 200_000

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.ttft = H.new()  # received -> first token written
        self._itl = _Batched()
        self.queue = H.new()  # received -> admitted (max_concurrency queueing)
        self._late = _Batched()  # actual write - scheduled write, per chunk
        self.e2e = H.new()  # received -> last byte written
        self.received = 0
        self.served = 0  # streams written to the end (faulted ones excluded)
        self.disconnected = 0  # client went away mid-request
        self.tokens = 0
        self.chunks = 0
        self.writes_while_paused = 0  # writes into a full socket buffer: the client was not reading
        self.faults: Counter[str] = Counter()
        self.by_model: Counter[str] = Counter()  # requests received per model name asked for
        self.out_of_vocab = 0  # refused: a prompt token id >= --vocab-size (HTTP 400, as vLLM)
        # Per request: (t_received, t_admitted, t_first_token, t_end, tokens, client request id or
        # None), perf_counter seconds (CLOCK_MONOTONIC: the clock of every process on the host); the
        # latest DETAIL_KEEP only, so a soak run's memory stays bounded.
        self.requests: deque[tuple[float, float | None, float | None, float | None, int, str | None]] = deque(
            maxlen=self.DETAIL_KEEP
        )
        # When each request's first bytes arrived, in the order of `requests` (a 600 kB body takes
        # a while to arrive whole: this is when the client began sending it).
        self.first_byte: deque[float] = deque(maxlen=self.DETAIL_KEEP)
        # Each request's prompt length as the stub counted it, in the order of `requests`.
        self.prompt_tokens: deque[int] = deque(maxlen=self.DETAIL_KEEP)
        # Requests whose client went away before the end: (t_received, t_lost, tokens written, id).
        self.lost: deque[tuple[float, float, int, str | None]] = deque(maxlen=self.DETAIL_KEEP)

    def chunk(self, t: float, due: float, prev_t: float | None, t_recv: float, k: int) -> None:
        """A content chunk of `k` tokens was written at `t` (scheduled for `due`)."""
        self.chunks += 1
        self.tokens += k
        late = self._late.buf
        late.append(int((t - due) * 1e6))
        if prev_t is None:
            self.ttft.record_value(min(int((t - t_recv) * 1e6), H.HIGHEST))
            if k > 1:
                self._itl.hist.record_value(0, k - 1)
        elif k == 1:
            self._itl.buf.append(int((t - prev_t) * 1e6))
        else:
            self._itl.buf.extend([int((t - prev_t) / k * 1e6)] * k)
        if len(late) >= _Batched.LIMIT:
            self._late.flush()
            self._itl.flush()

    def burst(self, t: float, due: float, prev_t: float | None, t_recv: float, chunks: int, k: int,
              n: int) -> None:  # fmt: skip
        """`chunks` content chunks of up to `k` tokens, `n` tokens in all, written together at `t`: the
        same records as that many `chunk` calls at one instant (every gap after the first is 0)."""
        self.chunk(t, due, prev_t, t_recv, min(k, n))
        rest = chunks - 1
        if rest > 0:
            self.chunks += rest
            self.tokens += n - min(k, n)
            self._late.buf.extend([int((t - due) * 1e6)] * rest)
            self._itl.hist.record_value(0, n - min(k, n))

    def late_us(self, us: int) -> None:
        self._late.buf.append(us)

    @property
    def itl(self) -> HdrHistogram:
        return self._itl.flush()

    @property
    def late(self) -> HdrHistogram:
        return self._late.flush()

    def summary(self, detail: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "count": self.ttft.get_total_count(),
            "received": self.received,
            "served": self.served,
            "disconnected": self.disconnected,
            "tokens": self.tokens,
            "chunks": self.chunks,
            "writes_while_paused": self.writes_while_paused,
            "faults": dict(self.faults),
            "out_of_vocab": self.out_of_vocab,
            "by_model": dict(self.by_model),
            "ttft_ms": H.summary_ms(self.ttft),
            "itl_ms": H.summary_ms(self.itl),
            "queue_ms": H.summary_ms(self.queue),
            "late_ms": H.summary_ms(self.late),
            "e2e_ms": H.summary_ms(self.e2e),
            "hdr": {
                "ttft": H.encode(self.ttft),
                "itl": H.encode(self.itl),
                "queue": H.encode(self.queue),
                "late": H.encode(self.late),
            },
        }
        if detail:
            out["requests"] = list(self.requests)
            out["first_byte"] = list(self.first_byte)
            out["prompt_tokens"] = list(self.prompt_tokens)
            out["lost"] = list(self.lost)
        return out
