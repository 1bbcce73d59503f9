"""Aggregates finished records into HDR histograms and counts. `add()` / `roll()` / `close()`; never prints.

Latencies go into the current interval's histograms; `roll()` closes an interval and adds it to
the run total, so the whole-run histograms are exactly the sum of the intervals (and of workers,
since every histogram shares one configuration).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from hdrh.histogram import HdrHistogram

from replay.core.request import ABANDONED, ERROR, NOT_SENT, OK, PROBE, UNFINISHED, RequestRecord
from replay.stats import histogram as H
from replay.stats.turns import turn_key, turn_metric

# Latency metrics (seconds in, microseconds in the histogram).
LATENCY_METRICS = (
    "ttft",
    "itl",
    "tpot",
    "e2e",
    "ttft_intended",
    "e2e_intended",
    "send_lag",
    "dispatch_lag",
)
# The probe stream's own latencies (--probe-rate): what a quiet user sees beside the load. Probe
# requests go into these only, never into the main load's histograms (they are counted in Counts).
PROBE_METRICS = ("probe_ttft", "probe_ttft_intended", "probe_itl", "probe_e2e")
LATENCY_METRICS = LATENCY_METRICS + PROBE_METRICS
# Rate metrics are stored in milli-units so the same integer histogram serves them.
RATE_METRICS = ("output_tps",)
METRICS = LATENCY_METRICS + RATE_METRICS
# A --classes mix: each class's main-load latencies also go into `class.<name>.<metric>` histograms
# (replay.stats.classes), made when the class is first seen.
CLASS_METRICS = ("ttft", "ttft_intended", "itl", "tpot", "e2e", "e2e_intended")


def class_metric(name: str, metric: str) -> str:
    return f"class.{name}.{metric}"


def _new_set() -> dict[str, HdrHistogram]:
    return {m: H.new() for m in METRICS}


@dataclass
class Counts:
    scheduled: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    not_sent: Counter[str] = field(default_factory=Counter)
    unfinished: int = 0  # still in flight at the drain deadline (not server errors, not dropped)
    abandoned: int = 0  # the client left on purpose (--abandon), before or after the first token
    abandoned_mid_stream: int = 0  # of those, after the first token
    probe_scheduled: int = 0  # of `scheduled`, the probe stream's requests
    probe_ok: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    last_end_s: float = 0.0
    last_intended_s: float = 0.0
    # Prompt length the server reported minus the one requested, over ok requests that report it.
    prompt_len_compared: int = 0
    prompt_len_diffs: Counter[int] = field(default_factory=Counter)  # nonzero differences only
    # Conversations: requests per turn index (replay.stats.turns.turn_key), every status, and ok ones.
    turn_scheduled: Counter[int] = field(default_factory=Counter)
    turn_ok: Counter[int] = field(default_factory=Counter)
    # A --classes mix: requests per class (every status), ok ones, and errors + not sent (error_rate).
    class_scheduled: Counter[str] = field(default_factory=Counter)
    class_ok: Counter[str] = field(default_factory=Counter)
    class_failed: Counter[str] = field(default_factory=Counter)

    def merge(self, other: Counts) -> None:
        self.scheduled += other.scheduled
        self.ok += other.ok
        self.errors.update(other.errors)
        self.not_sent.update(other.not_sent)
        self.unfinished += other.unfinished
        self.abandoned += other.abandoned
        self.abandoned_mid_stream += other.abandoned_mid_stream
        self.probe_scheduled += other.probe_scheduled
        self.probe_ok += other.probe_ok
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.last_end_s = max(self.last_end_s, other.last_end_s)
        self.last_intended_s = max(self.last_intended_s, other.last_intended_s)
        self.prompt_len_compared += other.prompt_len_compared
        self.prompt_len_diffs.update(other.prompt_len_diffs)
        self.turn_scheduled.update(other.turn_scheduled)
        self.turn_ok.update(other.turn_ok)
        self.class_scheduled.update(other.class_scheduled)
        self.class_ok.update(other.class_ok)
        self.class_failed.update(other.class_failed)

    def accounted(self) -> bool:
        """The invariant: scheduled = ok + errors (by kind) + unfinished + abandoned + not sent (by why)."""
        done = self.ok + sum(self.errors.values()) + self.unfinished + self.abandoned
        return self.scheduled == done + sum(self.not_sent.values())


class Recorder:
    def __init__(self) -> None:
        H.warm()  # percentile tables built now, not at the first interval close mid-run
        self.total = _new_set()
        self.interval = _new_set()
        self._spare = _new_set()  # the set roll() returned last; the next interval reuses it
        self.counts = Counts()
        self.interval_counts = Counts()
        self.error_examples: dict[str, list[str]] = {}

    def add(self, rec: RequestRecord) -> None:
        for c in (self.counts, self.interval_counts):
            c.scheduled += 1
            c.last_intended_s = max(c.last_intended_s, rec.intended_s)
            if rec.end_s is not None:
                c.last_end_s = max(c.last_end_s, rec.end_s)
            if rec.status == OK:
                c.ok += 1
                c.input_tokens += rec.input_tokens
                c.output_tokens += rec.output_tokens
                diff = rec.prompt_length_error()
                if diff is not None:
                    c.prompt_len_compared += 1
                    if diff:
                        c.prompt_len_diffs[diff] += 1
            elif rec.status == ERROR:
                c.errors[rec.error or "unknown"] += 1
            elif rec.status == NOT_SENT:
                c.not_sent[rec.error or "unknown"] += 1
            elif rec.status == UNFINISHED:
                c.unfinished += 1
            elif rec.status == ABANDONED:
                c.abandoned += 1
                c.abandoned_mid_stream += rec.first_token_s is not None
        if rec.status == ERROR:
            self._example(rec)
        lag = rec.dispatch_lag()
        h = self.interval
        if rec.turn is not None:
            self._turn(rec, h)
        if lag is not None:
            H.record_seconds(h["dispatch_lag"], lag)
        if rec.klass == PROBE:
            self._probe(rec, h)
            return
        if rec.klass is not None:
            self._klass(rec, h)
        if rec.status != OK:
            return
        for name, value in (
            ("ttft", rec.ttft()),
            ("tpot", rec.tpot()),
            ("e2e", rec.e2e()),
            ("ttft_intended", rec.ttft_intended()),
            ("e2e_intended", rec.e2e_intended()),
            ("send_lag", rec.send_lag()),
        ):
            if value is not None:
                H.record_seconds(h[name], value)
        _record_itls(h["itl"], rec)
        e2e = rec.e2e()
        if e2e and rec.first_token_s is not None and rec.output_tokens > 1:
            # Decode rate after the first token: what a reader of the stream experiences.
            decode_s = (rec.end_s or 0.0) - rec.first_token_s
            if decode_s > 0:
                h["output_tps"].record_value(int((rec.output_tokens - 1) / decode_s * 1000))

    def _probe(self, rec: RequestRecord, h: dict[str, HdrHistogram]) -> None:
        for c in (self.counts, self.interval_counts):
            c.probe_scheduled += 1
            c.probe_ok += rec.status == OK
        if rec.status != OK:
            return
        for name, value in (("probe_ttft", rec.ttft()), ("probe_ttft_intended", rec.ttft_intended()),
                            ("probe_e2e", rec.e2e())):  # fmt: skip
            if value is not None:
                H.record_seconds(h[name], value)
        _record_itls(h["probe_itl"], rec)

    def _klass(self, rec: RequestRecord, h: dict[str, HdrHistogram]) -> None:
        """A request of a --classes class: counted per class; if ok, its latencies (also in the main
        histograms) into the class's own."""
        name = rec.klass or ""
        for c in (self.counts, self.interval_counts):
            c.class_scheduled[name] += 1
            c.class_ok[name] += rec.status == OK
            c.class_failed[name] += rec.status in (ERROR, NOT_SENT)
        if rec.status != OK:
            return
        for metric, value in (("ttft", rec.ttft()), ("ttft_intended", rec.ttft_intended()),
                              ("tpot", rec.tpot()), ("e2e", rec.e2e()),
                              ("e2e_intended", rec.e2e_intended())):  # fmt: skip
            if value is not None:
                H.record_seconds(_into(h, class_metric(name, metric)), value)
        _record_itls(_into(h, class_metric(name, "itl")), rec)

    def _turn(self, rec: RequestRecord, h: dict[str, HdrHistogram]) -> None:
        """A conversation turn: counted per turn index, its TTFT (ok) in that turn's histogram, made
        the first time the index is seen (a run without sessions holds none)."""
        k = turn_key(rec.turn or 1)
        for c in (self.counts, self.interval_counts):
            c.turn_scheduled[k] += 1
            c.turn_ok[k] += rec.status == OK
        ttft = rec.ttft() if rec.status == OK else None
        if ttft is not None:
            name = turn_metric(k)
            hist = h.get(name)
            if hist is None:
                hist = h[name] = H.new()
            H.record_seconds(hist, ttft)

    def _example(self, rec: RequestRecord) -> None:
        ex = self.error_examples.setdefault(rec.error or "unknown", [])
        if len(ex) < 5 and rec.error_detail and rec.error_detail not in ex:
            ex.append(rec.error_detail)

    def roll(self) -> tuple[dict[str, HdrHistogram], Counts]:
        """Close the current interval: returns its histograms and counts, and adds them to the total.

        The returned histograms are valid until the next `roll()`, which empties and reuses them:
        two sets alternate for the whole run, so memory does not depend on its length."""
        spare = self._spare
        for h in spare.values():
            H.reset(h)
        done, counts = self.swap()
        for m, hist in done.items():  # METRICS and any turn histograms
            _into(self.total, m).add(hist)
        return done, counts

    def swap(self) -> tuple[dict[str, HdrHistogram], Counts]:
        """Close the current interval in O(1), for the event loop: the next interval records into the
        spare set at once. The returned set must go through `absorb()` (on any one thread) before the
        next `swap()`; until then nothing else touches it, so the heavy part can run off the loop."""
        done, counts = self.interval, self.interval_counts
        self.interval, self._spare, self.interval_counts = self._spare, done, Counts()
        return done, counts

    def absorb(self, done: dict[str, HdrHistogram]) -> None:
        """Add a swapped-out interval to the run total and empty it for reuse (off the loop)."""
        for m, hist in done.items():
            _into(self.total, m).add(hist)
            H.reset(hist)

    def close(self) -> dict[str, HdrHistogram]:
        self.roll()
        return self.total


def _into(hists: dict[str, HdrHistogram], name: str) -> HdrHistogram:
    h = hists.get(name)
    if h is None:
        h = hists[name] = H.new()
    return h


def _record_itls(h: HdrHistogram, rec: RequestRecord) -> None:
    """A response's ITL samples: as (gap, count) runs when it came in few chunks, else vectorised."""
    runs = rec.itl_runs()
    if runs is None:
        H.record_seconds_many(h, rec.itls())
        return
    for gap, count in runs:
        if count > 0:
            H.record_seconds(h, gap, count)
