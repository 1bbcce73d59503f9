"""`replay trace stats`: what a trace offers, from one streaming pass.

Memory is bounded by the trace's span and its largest length, not its request count: arrivals
are counted into 1-second bins and lengths into per-value bins, so percentiles are exact
(nearest rank: the smallest value with at least q% of requests at or below it).
Rate windows are the whole windows of [0, D), D the trace duration as `schedule.from_trace` defines
it (arrival span plus one mean gap); empty windows count as zero, a trailing partial window is
left out (its rate over a full window's width would be too low), and a window size longer than
the trace is not reported. The mean rate line is N / D over the whole trace.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from replay.trace.formats import TraceFile
from replay.trace.model import TraceRecord

WINDOWS_S = (1, 10, 60)
PERCENTILES = (50.0, 90.0, 99.0)
TOP_PEAKS = 3


class _Counts:
    """Growable integer bins."""

    def __init__(self) -> None:
        self.a = np.zeros(1024, dtype=np.int64)

    def add(self, i: int) -> None:
        if i >= len(self.a):
            self.a = np.concatenate([self.a, np.zeros(max(i + 1, 2 * len(self.a)) - len(self.a), np.int64)])
        self.a[i] += 1


def _dist(c: _Counts, n: int) -> dict[str, float]:
    if n == 0:
        return {}
    a = c.a
    nz = np.nonzero(a)[0]
    cum = np.cumsum(a)
    out: dict[str, float] = {"min": int(nz[0]), "mean": float((np.arange(len(a)) * a).sum() / n)}
    for q in PERCENTILES:
        out[f"p{q:g}"] = int(np.searchsorted(cum, math.ceil(q / 100 * n)))
    out["max"] = int(nz[-1])
    return out


def trace_stats(records: Iterable[TraceRecord], *, timed: bool = True) -> dict[str, Any]:
    """Counts, duration, rate over time windows, peak windows, length distributions, block reuse."""
    per_s = _Counts()
    inp, out = _Counts(), _Counts()
    n = 0
    last = 0.0
    blocks = 0
    seen: set[int] = set()
    sessions: set[str] = set()
    block_size = 0
    for rec in records:
        n += 1
        last = rec.arrival_s
        per_s.add(int(rec.arrival_s))
        inp.add(rec.input_tokens)
        out.add(rec.output_tokens)
        if rec.hash_ids:
            blocks += len(rec.hash_ids)
            seen.update(rec.hash_ids)
            block_size = rec.block_size
        if rec.session_id is not None and len(sessions) < 10_000_000:
            sessions.add(rec.session_id)
    res: dict[str, Any] = {"requests": n, "timed": timed}
    res["input_tokens"] = _dist(inp, n)
    res["output_tokens"] = _dist(out, n)
    if sessions:
        res["sessions"] = len(sessions)
    if blocks:
        # The hit ratio of an unbounded prefix cache keyed on these blocks, counted per block.
        res["prefix_blocks"] = {
            "block_size": block_size,
            "blocks": blocks,
            "unique": len(seen),
            "reuse_ratio": round(1 - len(seen) / blocks, 6),
        }
    if not timed or n < 2 or last <= 0:
        res["span_s"] = last
        return res
    duration = last * n / (n - 1)
    res.update(span_s=last, duration_s=duration, mean_rate=n / duration)
    counts_1s = per_s.a
    rates: dict[str, Any] = {}
    for w in WINDOWS_S:
        nwin = int(duration // w)  # whole windows only: a partial one has no honest rate
        if nwin == 0:
            continue
        c = np.zeros(nwin * w, dtype=np.int64)
        k = min(len(counts_1s), len(c))
        c[:k] = counts_1s[:k]
        per = c.reshape(nwin, w).sum(axis=1) / w
        order = np.argsort(-per, kind="stable")[:TOP_PEAKS]
        rates[f"{w}s"] = {
            "windows": nwin,
            "mean": float(per.mean()),
            "p99": float(np.percentile(per, 99, method="inverted_cdf")),
            "max": float(per.max()),
            "peaks": [{"start_s": int(i) * w, "rate": float(per[i])} for i in order if per[i] > 0],
        }
    res["rate_windows"] = rates
    return res


def stats_for_file(tf: TraceFile) -> dict[str, Any]:
    res = trace_stats(tf, timed=tf.timed)
    res = {"file": str(tf.path), "format": tf.format, **res}
    if tf.lengths_estimated:
        res["lengths_estimated"] = True
    st = tf.stats
    res["load"] = {"rows": st.rows, "bad_rows": st.bad_rows, "dropped": dict(st.dropped)}
    return res


def format_stats(s: dict[str, Any]) -> str:
    """A readable table of `stats_for_file`'s result."""
    lines = [f"trace     {s.get('file', '-')}  ({s.get('format', '?')})"]
    load = s.get("load", {})
    extra = []
    if load.get("bad_rows"):
        extra.append(f"{load['bad_rows']} bad rows skipped")
    for why, k in load.get("dropped", {}).items():
        extra.append(f"{k} dropped: {why}")
    lines.append(f"requests  {s['requests']}" + (f"   ({'; '.join(extra)})" if extra else ""))
    if s.get("sessions"):
        lines.append(f"sessions  {s['sessions']}")
    if "mean_rate" in s:
        lines.append(
            f"span      {s['span_s']:.3f} s   duration {s['duration_s']:.3f} s   "
            f"mean rate {s['mean_rate']:.4g} req/s"
        )
        lines.append("")
        lines.append(f"{'rate (req/s)':<14}{'windows':>9}{'mean':>10}{'p99':>10}{'max':>10}   peak windows")
        for w, r in s["rate_windows"].items():
            peaks = ", ".join(f"{p['rate']:.4g} @ {p['start_s']}s" for p in r["peaks"])
            row = f"{'per ' + w:<14}{r['windows']:>9}{r['mean']:>10.4g}{r['p99']:>10.4g}{r['max']:>10.4g}"
            lines.append(f"{row}   {peaks}")
    elif not s.get("timed", True):
        lines.append("arrivals  none in this format (every request at 0): replay it with a synthetic rate")
    lines.append("")
    note = "  (estimated from text: ~4 chars/token)" if s.get("lengths_estimated") else ""
    lines.append(f"{'tokens':<14}{'min':>8}{'mean':>10}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}{note}")
    for key in ("input_tokens", "output_tokens"):
        d = s.get(key) or {}
        if d:
            lines.append(
                f"{key.split('_')[0]:<14}{d['min']:>8}{d['mean']:>10.1f}{d['p50']:>8}{d['p90']:>8}"
                f"{d['p99']:>8}{d['max']:>8}"
            )
    pb = s.get("prefix_blocks")
    if pb:
        lines.append("")
        lines.append(
            f"prefix    {pb['blocks']} blocks of {pb['block_size']} tokens, {pb['unique']} unique: "
            f"{pb['reuse_ratio']:.1%} reused (an unbounded prefix cache's block hit ratio)"
        )
    return "\n".join(lines)
