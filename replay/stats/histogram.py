"""One HDR histogram configuration for every metric, process and interval, so merges are exact.

Values are integer microseconds in [1 us, 1 h] at 3 significant digits (0.1% resolution: 16 us
at 20 ms). Rates (tokens/s per request) use the same histogram in milli-units so they share code.
"""

from __future__ import annotations

import ctypes
import sys

import numpy as np
from hdrh.histogram import HdrHistogram

LOWEST = 1
HIGHEST = 3_600_000_000  # one hour in microseconds
SIGFIGS = 3
PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 50.0),
    ("p90", 90.0),
    ("p95", 95.0),
    ("p99", 99.0),
    ("p99.9", 99.9),
)


def new() -> HdrHistogram:
    return HdrHistogram(LOWEST, HIGHEST, SIGFIGS)


def reset(h: HdrHistogram) -> None:
    """Empty `h` in place, as hdrh's `reset()` does but with one memset instead of a Python loop
    over 23,552 buckets (2 ms each). Reusing histograms keeps their 184 KiB arrays from churning
    through the C heap every interval, which fragmented it: RSS grew with run length."""
    ctypes.memset(h.counts, 0, ctypes.sizeof(h.counts))
    h.total_count = 0
    h.min_value = sys.maxsize
    h.max_value = 0
    h.start_time_stamp_msec = sys.maxsize
    h.end_time_stamp_msec = 0


def record_seconds(h: HdrHistogram, seconds: float, count: int = 1) -> None:
    """Record a duration (`count` times); negatives (clock noise) clamp to 0, beyond range to the max.

    By hand: hdrh's record_value is ~2.5 us of Python in five calls; a finished request records eight
    values, so this (the same bucket, `_counts_index` for one value) is most of its recording cost."""
    us = min(max(int(round(seconds * 1e6)), 0), HIGHEST)
    bucket = (us | h.sub_bucket_mask).bit_length() - h.unit_magnitude - h.sub_bucket_half_count_magnitude - 1
    h.counts[((bucket + 1) << h.sub_bucket_half_count_magnitude) + (us >> (bucket + h.unit_magnitude))
             - h.sub_bucket_half_count] += count  # fmt: skip
    h.total_count += count
    if us < h.min_value:
        h.min_value = us
    if us > h.max_value:
        h.max_value = us


def record_seconds_many(h: HdrHistogram, seconds: np.ndarray) -> None:
    """Record many durations in one vectorised pass: the same buckets as `record_seconds` per value.

    Why by hand: hdrh's record_value is ~2.5 us of Python per value, and a streamed token is one
    ITL sample, so a 256-token response cost ~0.6 ms of the event loop; this costs ~30 us."""
    if len(seconds) == 0:
        return
    us = np.clip(np.rint(np.asarray(seconds, dtype=np.float64) * 1e6), 0, HIGHEST).astype(np.int64)
    np.add.at(_counts(h), _counts_index(h, us), 1)
    h.total_count += len(us)
    lo, hi = int(us.min()), int(us.max())
    h.min_value = min(h.min_value, lo)
    h.max_value = max(h.max_value, hi)


def _counts_index(h: HdrHistogram, us: np.ndarray) -> np.ndarray:
    """hdrh's _counts_index_for, vectorised (bucket from the bit length, then the sub-bucket)."""
    bit_length = np.frexp((us | h.sub_bucket_mask).astype(np.float64))[1].astype(np.int64)  # exact < 2**53
    bucket = bit_length - h.unit_magnitude - (h.sub_bucket_half_count_magnitude + 1)
    sub = us >> (bucket + h.unit_magnitude)
    return ((bucket + 1) << h.sub_bucket_half_count_magnitude) + sub - h.sub_bucket_half_count


def warm() -> None:
    """Build the per-bucket tables now (~30 ms of Python, once per process), before any load runs."""
    _tables(new())


def encode(h: HdrHistogram) -> str:
    """Compressed, base64 HDR encoding (the standard V2 format HdrHistogram's tools read)."""
    raw = h.encode()
    return raw.decode("ascii") if isinstance(raw, bytes) else raw


def decode(text: str) -> HdrHistogram:
    h = new()
    if text:
        h.decode_and_add(text)
    return h


def merge(hists: list[HdrHistogram]) -> HdrHistogram:
    out = new()
    for h in hists:
        out.add(h)
    return out


_TABLES: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None


def _tables(h: HdrHistogram) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bucket index: highest equivalent value (what percentiles report) and median equivalent
    value (what the mean weighs), exactly as hdrh computes them. Built once: one configuration."""
    global _TABLES
    if _TABLES is None:
        low = [h.get_value_from_index(i) for i in range(h.counts_len)]
        high = np.array([h.get_highest_equivalent_value(v) for v in low], dtype=np.float64)
        med = np.array([h._hdr_median_equiv_value(v) for v in low], dtype=np.float64)
        _TABLES = (high, med, np.array(low, dtype=np.float64))
    return _TABLES


def percentiles(h: HdrHistogram, ps: tuple[float, ...]) -> list[int]:
    """hdrh's get_value_at_percentile for several percentiles in one vectorised pass.

    hdrh walks the counts array in Python per call (~6 ms each at this range); this is the same
    rule — the first bucket whose cumulative count reaches max(1, int(p/100 * total + 0.5)),
    reported as its highest equivalent value — over a numpy view of the same counts.
    """
    n = h.get_total_count()
    if n == 0:
        return [0 for _ in ps]
    high, _, low = _tables(h)
    cum = np.cumsum(_counts(h))
    targets = [max(int(min(p, 100.0) * n / 100 + 0.5), 1) for p in ps]
    idx = np.minimum(np.searchsorted(cum, targets, side="left"), len(high) - 1)
    return [int(high[i]) if p else int(low[i]) for p, i in zip(ps, idx, strict=True)]


def _counts(h: HdrHistogram) -> np.ndarray:
    return np.frombuffer(h.counts, dtype=np.uint64, count=h.counts_len)


def mean(h: HdrHistogram) -> float:
    n = h.get_total_count()
    if n == 0:
        return 0.0
    _, med, _ = _tables(h)
    # Not np.dot: BLAS may wake its thread pool and spin, ~25 ms on a busy 2-core machine.
    return float((_counts(h).astype(np.float64) * med).sum()) / n


def summary_ms(h: HdrHistogram, scale: float = 1e-3) -> dict[str, float | int | None]:
    """Percentiles, max, mean and count; values in ms for microsecond histograms.

    An empty histogram reports count 0 and None everywhere else (never 0.0 for "not measured").
    """
    n = h.get_total_count()
    if n == 0:
        out: dict[str, float | int | None] = {name: None for name, _ in PERCENTILES}
        out.update(max=None, mean=None, min=None, count=0)
        return out
    values = percentiles(h, tuple(p for _, p in PERCENTILES))
    out = {name: round(v * scale, 3) for (name, _), v in zip(PERCENTILES, values, strict=True)}
    out["max"] = round(h.get_max_value() * scale, 3)
    out["min"] = round(h.get_min_value() * scale, 3)
    out["mean"] = round(mean(h) * scale, 3)
    out["count"] = n
    return out
