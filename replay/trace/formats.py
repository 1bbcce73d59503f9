"""Trace loaders: detect a file's format from its content, stream it as `TraceRecord`s.

`load_trace(path)` returns a `TraceFile`: iterable any number of times (each pass re-reads the
file, so a rate rescale can count first and a soak can loop without holding the trace in
memory), with the counts of the last complete pass in `.stats`.

Shared rules, whatever the format:
- Arrival times become offsets from the first data row's timestamp (rows dropped as failures
  count as the start too: they did arrive), so every trace starts at 0 or just after.
- Rows must be in non-decreasing arrival order. A streaming reader cannot sort, so a row earlier
  than its predecessor is a bad row (error, or counted and skipped with skip_bad_rows);
  `replay trace convert --sort` sorts in memory and writes a sorted copy.
- A bad row raises ReplayError("file:line: field 'X': problem"); with skip_bad_rows it is
  counted in `stats.bad_rows` (the first few messages kept) and skipped. A missing column or a
  missing/invalid header line always raises: the whole file is wrong, not one row.
- Unknown columns/keys are ignored with one notice line.
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from replay.core.errors import ReplayError
from replay.trace import load_csv, load_json
from replay.trace.model import HEADER_KEY, RowError, TraceRecord, parse_header

FORMATS: dict[str, type] = {f.name: f for f in (*load_csv.CSV_FORMATS, *load_json.JSON_FORMATS)}
MAX_EXAMPLES = 5


@dataclass
class LoadStats:
    rows: int = 0  # data rows read (not the header)
    records: int = 0  # records yielded
    bad_rows: int = 0
    unsorted_rows: int = 0  # of bad_rows: earlier than their predecessor
    dropped: dict[str, int] = field(default_factory=dict)  # by reason, e.g. BurstGPT failures
    bad_examples: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    first_raw_s: float | None = None
    last_arrival_s: float = 0.0
    header: dict[str, Any] | None = None  # our JSONL's header line
    seen_unknown: set[str] = field(default_factory=set)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "records": self.records,
            "bad_rows": self.bad_rows,
            "unsorted_rows": self.unsorted_rows,
            "dropped": dict(self.dropped),
            "bad_examples": list(self.bad_examples),
            "notices": list(self.notices),
        }


def _stderr_notice(msg: str) -> None:
    print(f"notice: {msg}", file=sys.stderr)


class TraceFile:
    """A trace on disk, streamed. Options (all off by default):

    skip_bad_rows: count and skip malformed rows instead of raising.
    keep_failures: BurstGPT: keep failed (zero response token) rows instead of dropping them.
    count_tokens: ShareGPT: str -> token count (a tokenizer); default estimate_tokens.
    default_output_tokens: ServeGen offline trace_a-c: output length they lack.
    allow_unsorted: skip the order check (for `convert --sort`, which sorts afterwards).
    """

    def __init__(
        self,
        path: str | Path,
        fmt: str | None = None,
        *,
        skip_bad_rows: bool = False,
        keep_failures: bool = False,
        count_tokens: Callable[[str], int] | None = None,
        default_output_tokens: int | None = None,
        allow_unsorted: bool = False,
        notice: Callable[[str], None] | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ReplayError(f"{self.path}: no such trace file")
        if fmt is not None and fmt not in FORMATS:
            raise ReplayError(f"unknown trace format {fmt!r} (known: {', '.join(FORMATS)})")
        self.format = fmt or detect_format(self.path)
        self.options: dict[str, Any] = {
            "keep_failures": keep_failures,
            "count_tokens": count_tokens,
            "default_output_tokens": default_output_tokens,
        }
        self.skip_bad_rows = skip_bad_rows
        self.allow_unsorted = allow_unsorted
        self.notice = notice or _stderr_notice
        self.stats = LoadStats()
        self._noticed: set[str] = set()
        self.timed = bool(FORMATS[self.format].timed)
        self.lengths_estimated = self.format == "sharegpt" and count_tokens is None
        if self.format == "replay":  # our header says whether arrivals and lengths are real
            with open(self.path, "rb") as fh:
                head = parse_header(fh.readline().lstrip(b"\xef\xbb\xbf"), f"{self.path}:1")
            self.timed = bool(head.get("timed", True))
            self.lengths_estimated = bool(head.get("lengths_estimated", False))
        if self.format == "vidur":  # length-only Vidur files have no arrival column
            with open(self.path, encoding="utf-8-sig", newline="") as fh:
                self.timed = "arrived_at" in [c.strip() for c in next(csv.reader(fh), [])]

    def __iter__(self) -> Iterator[TraceRecord]:
        return self._records()

    def _records(self) -> Iterator[TraceRecord]:
        stats = LoadStats()
        parser = FORMATS[self.format](self.options)
        where = str(self.path)
        prev_raw: float | None = None
        t0: float | None = None
        for line_no, raw in self._raw_rows(parser, stats):
            stats.rows += 1
            try:
                if isinstance(raw, RowError):
                    raise raw
                t, rec, drop = parser.parse(raw, line_no)
                if isinstance(raw, dict):
                    self._unknown_keys(parser.unknown(raw), line_no, stats)
                if prev_raw is not None and t < prev_raw and not self.allow_unsorted:
                    stats.unsorted_rows += 1
                    raise RowError(
                        parser.time_field,
                        f"arrives {prev_raw - t:.6g} s before the previous row: rows must be sorted "
                        "by arrival (sort a copy with `replay trace convert --sort`)",
                    )
            except RowError as e:
                self._bad(f"{where}:{line_no}: {e}", stats)
                continue
            prev_raw = t
            if t0 is None:
                t0 = t
                stats.first_raw_s = t
            if drop is not None:
                stats.dropped[drop] = stats.dropped.get(drop, 0) + 1
                continue
            assert rec is not None
            rec.arrival_s = t - t0
            stats.records += 1
            stats.last_arrival_s = max(stats.last_arrival_s, rec.arrival_s)
            yield rec
        for msg in getattr(parser, "notices", []):
            self._say(f"{where}: {msg}", stats)
        if self.format != "replay":
            self.timed = bool(parser.timed)
        self.stats = stats

    def _bad(self, msg: str, stats: LoadStats) -> None:
        if not self.skip_bad_rows:
            raise ReplayError(msg)
        stats.bad_rows += 1
        if len(stats.bad_examples) < MAX_EXAMPLES:
            stats.bad_examples.append(msg)

    def _say(self, msg: str, stats: LoadStats) -> None:
        stats.notices.append(msg)
        if msg not in self._noticed:  # once per TraceFile, not once per pass
            self._noticed.add(msg)
            self.notice(msg)

    def _unknown_keys(self, unknown: set[str], line_no: int, stats: LoadStats) -> None:
        new = sorted(unknown - stats.seen_unknown)
        if new:
            stats.seen_unknown.update(new)
            self._say(f"{self.path}:{line_no}: ignoring unknown field(s): {', '.join(new)}", stats)

    def _raw_rows(self, parser: Any, stats: LoadStats) -> Iterator[tuple[int, Any]]:
        where = str(self.path)
        if parser.kind == "csv":
            yield from self._csv_rows(parser, stats, where)
            return
        with open(self.path, "rb") as fh:
            if self.format == "sharegpt" and _first_byte(self.path) == b"[":
                try:
                    for line_no, raw in load_json.iter_json_array(fh):
                        yield line_no, _decode(raw)
                except RowError as e:
                    raise ReplayError(f"{where}: {e}") from None
                return
            line_no = 0
            for line in fh:
                line_no += 1
                if not line.strip():
                    continue
                if line_no == 1 and line.startswith(b"\xef\xbb\xbf"):
                    line = line[3:]
                if self.format == "replay" and stats.header is None:
                    stats.header = parse_header(line, f"{where}:{line_no}")
                    continue
                yield line_no, _decode(line)
        if self.format == "replay" and stats.header is None:
            raise ReplayError(f"{where}:1: field '{HEADER_KEY}': missing header line (empty file?)")

    def _csv_rows(self, parser: Any, stats: LoadStats, where: str) -> Iterator[tuple[int, Any]]:
        with open(self.path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            try:
                header = next(reader)
            except StopIteration:
                raise ReplayError(f"{where}:1: empty file (no header line)") from None
            except csv.Error as e:
                raise ReplayError(f"{where}:1: header: {e}") from None
            try:
                unknown = parser.header(header)
            except RowError as e:
                raise ReplayError(f"{where}:1: {e}") from None
            if unknown:
                self._say(f"{where}:1: ignoring unknown column(s): {', '.join(unknown)}", stats)
            while True:
                start = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    yield start, RowError("csv", str(e))
                    continue
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue
                yield start, row


def _decode(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        return RowError("record", f"invalid JSON (truncated line?): {e}")


def _first_byte(path: Path) -> bytes:
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1]


def detect_format(path: str | Path) -> str:
    """The format a file's first line says it is: our header, a JSON record's keys, a JSON array
    (ShareGPT), or a CSV header's column names."""
    path = Path(path)
    with open(path, "rb") as fh:
        first = b""
        for line in fh:
            if line.strip():
                first = line.lstrip(b"\xef\xbb\xbf").strip()
                break
    if not first:
        raise ReplayError(f"{path}: empty trace file")
    if first.startswith(b"["):
        return "sharegpt"
    if first.startswith(b"{"):
        try:
            obj = orjson.loads(first)
        except orjson.JSONDecodeError:
            raise ReplayError(
                f"{path}:1: first line is not a complete JSON record; give --format ({', '.join(FORMATS)})"
            ) from None
        fmt = load_json.json_format_for_record(obj)
        if fmt is None:
            keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
            raise ReplayError(f"{path}:1: unrecognised JSON trace (keys: {keys}); give --format")
        return fmt.name
    cols = next(csv.reader(io.StringIO(first.decode("utf-8", "replace"))))
    csv_fmt = load_csv.csv_format_for_header(cols)
    if csv_fmt is not None:
        return csv_fmt.name
    if _looks_like_servegen_rate_profile(cols):
        raise ReplayError(
            f"{path}:1: this is a ServeGen chunk-*-trace.csv (per-window rate, CV and inter-arrival "
            "distribution of one client), not a per-request trace; it cannot be replayed as one"
        )
    raise ReplayError(
        f"{path}:1: unrecognised trace header ({first[:120].decode(errors='replace')}); give --format"
    )


def _looks_like_servegen_rate_profile(cols: list[str]) -> bool:
    try:
        float(cols[0])
        float(cols[1])
    except (ValueError, IndexError):
        return False
    return len(cols) == 6


def load_trace(path: str | Path, fmt: str | None = None, **options: Any) -> TraceFile:
    """Open a trace (format detected unless given); see TraceFile for the options."""
    return TraceFile(path, fmt, **options)


def read_trace(path: str | Path) -> Iterator[TraceRecord]:
    """Stream our JSONL strictly (first bad line raises). For options, use load_trace."""
    return iter(load_trace(path, "replay"))
