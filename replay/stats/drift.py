"""Drift detection for soak runs: does the end of the run look like its beginning?

The early window is the first `window_s` after a warm-up; the late window the last `window_s`.
Latency is compared on merged HDR histograms of each window (a p99 of the window, not a mean
of per-interval p99s); error rate, server KV-cache use and the tool's own RSS on interval means.
Memory is bounded and small: the early window is one merged histogram set, the late window a
deque of compressed encodings (a few hundred bytes each, not 184 KiB of live buckets).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from hdrh.histogram import HdrHistogram

from replay.stats import histogram as H

LATENCY = ("ttft", "itl")


@dataclass(frozen=True, slots=True)
class DriftBounds:
    latency_ratio: float = 1.5  # late p99 / early p99 above this is drift
    latency_floor_ms: float = 5.0  # ...and only when the difference exceeds this
    error_rate_delta: float = 0.01  # late - early error rate (absolute share)
    kv_cache_delta: float = 0.2  # late - early mean KV-cache use (0..1)
    rss_growth: float = 0.10  # tool RSS late / early - 1


class DriftTracker:
    def __init__(self, interval_s: float, window_s: float = 60.0, warmup_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self.window_n = max(1, round(window_s / interval_s))
        self.warmup_n = round(warmup_s / interval_s)
        self._seen = 0
        self._early: dict[str, HdrHistogram] = {m: H.new() for m in LATENCY}
        self._early_rows: list[dict[str, Any]] = []
        self._late: deque[tuple[dict[str, str], dict[str, Any]]] = deque(maxlen=self.window_n)

    def add(self, hists: dict[str, HdrHistogram], row: dict[str, Any]) -> None:
        self._seen += 1
        if self._seen <= self.warmup_n:
            return
        if len(self._early_rows) < self.window_n:
            for m in LATENCY:
                self._early[m].add(hists[m])
            self._early_rows.append(row)
        self._late.append(({m: H.encode(hists[m]) for m in LATENCY}, row))

    def verdict(self, bounds: DriftBounds | None = None) -> dict[str, Any]:
        b = bounds or DriftBounds()
        if self._seen < self.warmup_n + 2 * self.window_n:
            return {"verdict": "too_short", "detail": "run shorter than warm-up plus two comparison windows"}
        late = {m: H.merge([H.decode(h[m]) for h, _ in self._late]) for m in LATENCY}
        late_rows = [r for _, r in self._late]
        figures: dict[str, Any] = {}
        drifted: list[str] = []
        for m in LATENCY:
            e = H.summary_ms(self._early[m])["p99"]
            la = H.summary_ms(late[m])["p99"]
            figures[f"{m}_p99_ms"] = {"early": e, "late": la}
            if e is not None and la is not None and la > e * b.latency_ratio and la - e > b.latency_floor_ms:
                drifted.append(f"{m} p99 {e:.1f} -> {la:.1f} ms")
        er_e, er_l = _error_rate(self._early_rows), _error_rate(late_rows)
        figures["error_rate"] = {"early": er_e, "late": er_l}
        if er_e is not None and er_l is not None and er_l - er_e > b.error_rate_delta:
            drifted.append(f"error rate {er_e:.2%} -> {er_l:.2%}")
        for key, label, limit, relative in (
            ("server.kv_cache_usage", "server KV-cache use", b.kv_cache_delta, False),
            ("client.rss_mb", "tool RSS", b.rss_growth, True),
        ):
            e, la = _mean(self._early_rows, key), _mean(late_rows, key)
            figures[key] = {"early": e, "late": la}
            if e is None or la is None:
                continue
            grew = (la / e - 1) if relative and e > 0 else (la - e)
            if grew > limit:
                drifted.append(f"{label} {e:.3g} -> {la:.3g}")
        return {
            "verdict": "drift" if drifted else "stable",
            "drifted": drifted,
            "figures": figures,
            "window_s": self.window_n * self.interval_s,
        }


def _error_rate(rows: list[dict[str, Any]]) -> float | None:
    done = sum(r.get("ok", 0) + r.get("errors", 0) for r in rows)
    return None if done == 0 else sum(r.get("errors", 0) for r in rows) / done


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return sum(vals) / len(vals) if vals else None
