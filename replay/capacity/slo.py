"""SLOs live in replay.stats.slo (a run's summary judges per-class SLOs, and the run layer sits below
capacity); this module keeps the capacity package's historical import path."""

from replay.stats.slo import (
    ERROR_RATE,
    STATS,
    Bound,
    Check,
    Goodput,
    Slo,
    Verdict,
    goodput,
    hist_stat,
    parse_slo,
    read_requests,
    request_value,
)

__all__ = ["ERROR_RATE", "STATS", "Bound", "Check", "Goodput", "Slo", "Verdict", "goodput", "hist_stat",
           "parse_slo", "read_requests", "request_value"]  # fmt: skip
