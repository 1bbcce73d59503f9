"""One HDR histogram configuration for every metric, process and interval, so merges are exact.

Values are integer microseconds in [1 us, 1 h] at 3 significant digits (0.1% resolution: 16 us
at 20 ms). Rates (tokens/s per request) use the same histogram in milli-units so they share code.
"""

from __future__ import annotations

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


def record_seconds(h: HdrHistogram, seconds: float) -> None:
    """Record a duration; negatives (clock noise) clamp to 0, beyond range clamps to the max."""
    us = int(round(seconds * 1e6))
    h.record_value(min(max(us, 0), HIGHEST))


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


def summary_ms(h: HdrHistogram, scale: float = 1e-3) -> dict[str, float | int | None]:
    """Percentiles, max, mean and count; values in ms for microsecond histograms.

    An empty histogram reports count 0 and None everywhere else (never 0.0 for "not measured").
    """
    n = h.get_total_count()
    if n == 0:
        out: dict[str, float | int | None] = {name: None for name, _ in PERCENTILES}
        out.update(max=None, mean=None, min=None, count=0)
        return out
    out = {name: round(h.get_value_at_percentile(p) * scale, 3) for name, p in PERCENTILES}
    out["max"] = round(h.get_max_value() * scale, 3)
    out["min"] = round(h.get_min_value() * scale, 3)
    out["mean"] = round(h.get_mean_value() * scale, 3)
    out["count"] = n
    return out
