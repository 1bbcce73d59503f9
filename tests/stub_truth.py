"""Timing truth for client tests: the stub server in its own process, and what it says it served.

The stub (`replay.stub`) runs as a child process with its own event loop, so a client that stalls
cannot also delay the truth. `IdTarget` tells the stub each request's id (vLLM's `request_id` body
field), and GET /stub/truth?detail=1 gives, per request, when the stub received it, wrote its first
token and wrote its last byte, on CLOCK_MONOTONIC: the clock of `time.perf_counter()` in every
process of the host. A client record and the stub's record of the same request so compare one to one:

    client TTFT - served TTFT = send transit (sent -> received) + read transit (written -> read)

each >= 0 by causality, and on loopback at light load a fraction of a millisecond.

Tolerances come from measured noise (10-20 runs of each test on the shared 2-core machine at load
average 5-12; figures beside each test's bounds) and sit below 2 ms, so that a client which adds
2 ms anywhere on the path (a late send, a stamp taken early or late, a slow read) fails. Such a
regression adds its delay to every request, while CPU contention delays only some: shifts are
therefore judged at the `SHIFT_Q`th percentile of the per-request errors, which contention moves
least (at p50 the same runs read up to 3.3 ms on a loaded machine).
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any, NamedTuple

import numpy as np
import orjson

from replay.core.request import Request
from replay.targets.openai_http import OpenAIHTTPTarget

SHIFT_Q = 10


class IdTarget(OpenAIHTTPTarget):
    """The real HTTP client, plus each request's id in vLLM's `request_id` body field: the stub
    keeps it in its per-request truth, so its records pair with the client's one to one."""

    def _body(self, request: Request) -> bytes:
        body = orjson.loads(super()._body(request))
        body["request_id"] = str(request.id)
        return orjson.dumps(body)


class Served(NamedTuple):
    """One request as the stub served it (perf_counter seconds on the host's monotonic clock)."""

    t_recv: float
    t_admit: float | None
    t_first: float | None
    t_end: float | None
    tokens: int


def truth(base_url: str) -> dict[str, Any]:
    """GET /stub/truth?detail=1 of the stub at `base_url` (its .../v1 address)."""
    url = base_url.removesuffix("/v1") + "/stub/truth?detail=1"
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def reset(base_url: str) -> None:
    """POST /stub/reset: forget what was served so far."""
    req = urllib.request.Request(base_url.removesuffix("/v1") + "/stub/reset", data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 200


def served_by_id(doc: dict[str, Any]) -> dict[int, Served]:
    """The truth's per-request records keyed by the client's request id (every one must carry one)."""
    out: dict[int, Served] = {}
    for t_recv, t_admit, t_first, t_end, tokens, rid in doc["requests"]:
        assert rid is not None, "a request reached the stub without its id"
        assert int(rid) not in out, f"request {rid} served twice"
        out[int(rid)] = Served(t_recv, t_admit, t_first, t_end, tokens)
    return out


def served_by_order(doc: dict[str, Any], rows: list[dict[str, Any]]) -> dict[int, Served]:
    """For a client that sends no request id (the `replay` command line): the stub's records in
    order of receipt given to the ok rows in order of sending (run-relative `sent_s`, one timeline
    for every worker). Two sends closer than the transit jitter may swap; at light load the stub
    serves both the same TTFT, so per-request errors stay right to within that jitter."""
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["sent_s"])
    recs = sorted(doc["requests"], key=lambda x: x[0])
    assert len(recs) == len(ok), f"the stub served {len(recs)} requests, the client counts {len(ok)} ok"
    return {r["id"]: Served(*x[:5]) for r, x in zip(ok, recs, strict=True)}


class Paired(NamedTuple):
    """Client rows (requests.jsonl form: run-relative seconds) beside the stub's records of the same
    requests (absolute perf_counter seconds), as arrays in request id order."""

    ids: np.ndarray
    worker: np.ndarray
    intended: np.ndarray  # client, run-relative
    sent: np.ndarray
    first: np.ndarray
    end: np.ndarray
    recv: np.ndarray  # stub, absolute
    written: np.ndarray  # stub wrote the first token
    done: np.ndarray  # stub wrote the last byte
    tokens: np.ndarray
    itl_mean: np.ndarray  # client: the request's mean ITL (requests.jsonl itl_s), seconds

    @property
    def ttft_err_ms(self) -> np.ndarray:
        """Client TTFT - served TTFT: send transit + read transit (no clock offset involved)."""
        return ((self.first - self.sent) - (self.written - self.recv)) * 1e3

    @property
    def e2e_err_ms(self) -> np.ndarray:
        return ((self.end - self.sent) - (self.done - self.recv)) * 1e3

    @property
    def itl_mean_err_ms(self) -> np.ndarray:
        """Each request's mean ITL minus the stub's for it: (last - first write) / (tokens - 1) by
        the stub's convention (a chunk of k tokens is k gaps). Robust to the odd late read, which
        moves one gap but not the span."""
        return (self.itl_mean - (self.done - self.written) / (self.tokens - 1)) * 1e3

    def send_ms(self, t0: float) -> np.ndarray:
        """Stub received - client sent: the request's transit (t0: run start on perf_counter)."""
        return (self.recv - (t0 + self.sent)) * 1e3

    def read_ms(self, t0: float) -> np.ndarray:
        """Client read the first token - stub wrote it: the response's transit."""
        return ((t0 + self.first) - self.written) * 1e3

    def late_ms(self, t0: float) -> np.ndarray:
        """Stub received - intended send time: how late each request reached the server."""
        return (self.recv - (t0 + self.intended)) * 1e3

    def assert_causal(self, t0: float) -> None:
        """Request by request, the client cannot send after the stub received, nor read the first
        token or the end before the stub wrote it (1 us: requests.jsonl rounds to microseconds)."""
        for what, xs in (("send", self.send_ms(t0)), ("read", self.read_ms(t0)),
                         ("end", ((t0 + self.end) - self.done) * 1e3)):  # fmt: skip
            assert xs.min() >= -1e-3, (what, int(self.ids[xs.argmin()]), float(xs.min()))


def pair(rows: list[dict[str, Any]], served: dict[int, Served]) -> Paired:
    """Pair the ok client rows (`RequestRecord.to_json()` / requests.jsonl lines) with the stub's
    records by request id: each must have been served, once, with the same token count."""
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["id"])
    missing = [r["id"] for r in ok if r["id"] not in served]
    assert not missing, f"client says ok, the stub never served {missing[:5]}"
    for r in ok:
        assert served[r["id"]].tokens == r["output_tokens"], (r["id"], served[r["id"]], r["output_tokens"])
    col = lambda k: np.array([r[k] for r in ok], dtype=np.float64)  # noqa: E731
    srv = [served[r["id"]] for r in ok]
    return Paired(
        np.array([r["id"] for r in ok]), np.array([r.get("worker", 0) for r in ok]),
        col("intended_s"), col("sent_s"), col("first_token_s"), col("end_s"),
        np.array([s.t_recv for s in srv]), np.array([s.t_first for s in srv], dtype=np.float64),
        np.array([s.t_end for s in srv], dtype=np.float64), col("output_tokens"),
        np.array([(r["itl_s"] or [np.nan])[-1] for r in ok], dtype=np.float64),
    )  # fmt: skip


def pct(xs: np.ndarray | list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=np.float64), q))
