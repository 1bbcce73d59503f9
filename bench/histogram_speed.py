"""Histogram costs on the event loop: a summary's percentiles and an interval's reset, ours vs hdrh's.

    PYTHONPATH=. python bench/histogram_speed.py [--out bench/results-histogram.md]

Every interval close summarises and empties histograms on the run's event loop, so their cost is
loop stall. A summary is five percentiles + mean of one histogram at replay's range (1 us .. 1 h,
3 significant digits) holding 100k log-normal latencies; hdrh computes each percentile and the mean
by walking the counts in Python, replay.stats.histogram with numpy over the same counts (the values are
checked equal here too). Reset: hdrh's `reset()` against `replay.stats.histogram.reset` (one memset).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from replay.stats import histogram as H  # noqa: E402


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """Best of `repeats` runs: the cost without interference from the rest of the machine."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results-histogram.md")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    h = H.new()
    for s in rng.lognormal(np.log(0.05), 1.0, a.samples):
        H.record_seconds(h, float(s))
    ps = tuple(p for _, p in H.PERCENTILES)
    ours = H.percentiles(h, ps)
    theirs = [h.get_value_at_percentile(p) for p in ps]
    if ours != theirs:
        print(f"percentiles differ: {ours} vs {theirs}", file=sys.stderr)
        return 1
    spare = H.new()
    rows = [
        (
            "summary: 5 percentiles + mean, hdrh",
            best_ms(lambda: ([h.get_value_at_percentile(p) for p in ps], h.get_mean_value()), a.repeats),
        ),
        (
            "summary: 5 percentiles + mean, replay.stats.histogram",
            best_ms(lambda: (H.percentiles(h, ps), H.mean(h)), a.repeats),
        ),
        ("reset one histogram, hdrh reset()", best_ms(spare.reset, a.repeats)),
        ("reset one histogram, replay.stats.histogram.reset", best_ms(lambda: H.reset(spare), a.repeats)),
        ("allocate one histogram (for scale)", best_ms(H.new, a.repeats)),
    ]
    lines = [
        "# Histogram costs on the event loop",
        "",
        f"Written by `bench/histogram_speed.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"load average {os.getloadavg()[0]:.2f}; best of {a.repeats}, one histogram of {a.samples:,} samples "
        f"({h.counts_len:,} buckets). Percentiles equal hdrh's: {ours}.",
        "",
        "| operation | ms |",
        "|---|---|",
        *(f"| {name} | {ms:.3f} |" for name, ms in rows),
    ]
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
