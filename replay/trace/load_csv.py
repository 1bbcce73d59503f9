"""CSV trace formats: Azure LLM 2023/2024, BurstGPT, Vidur and SplitwiseSim.

Columns are found by name, never by position. Each format parses one row into
(raw arrival seconds, record or None, drop reason or None); the driver in `formats.py` turns raw
times into offsets from the first row, checks order, and decides whether a bad row raises.
"""

from __future__ import annotations

import re
from datetime import date
from typing import Any

from replay.trace.model import RowError, TraceRecord, as_float, as_int

Parsed = tuple[float, TraceRecord | None, str | None]


class CsvFormat:
    """Base: map header names to indices; required/known/optional columns per format."""

    name = ""
    kind = "csv"
    timed = True
    time_field = ""
    required: tuple[str, ...] = ()
    known: tuple[str, ...] = ()  # parsed or deliberately ignored, no notice

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.idx: dict[str, int] = {}

    def header(self, cols: list[str]) -> list[str]:
        """Record column positions; return the unknown column names (the caller notices them).

        Raises RowError for a missing required column.
        """
        names = [c.strip() for c in cols]
        self.idx = {c: i for i, c in enumerate(names)}
        for c in self.required:
            if c not in self.idx:
                raise RowError(c, f"missing column (header has: {', '.join(names)})")
        wanted = set(self.required) | set(self.known)
        return [c for c in names if c not in wanted]

    def get(self, row: list[str], col: str) -> str:
        i = self.idx.get(col)
        if i is None:
            return ""
        if i >= len(row):
            raise RowError(col, f"missing (row has {len(row)} of {len(self.idx)} columns)")
        return row[i].strip()

    def int_col(self, row: list[str], col: str) -> int:
        v = self.get(row, col)
        if v == "":
            raise RowError(col, "missing")
        return as_int(v, col)

    def parse(self, row: list[str], line_no: int) -> Parsed:
        raise NotImplementedError


# --- Azure LLM inference traces 2023 / 2024 ---------------------------------------------------

# 2023: "2023-11-16 18:17:03.9799600" (7 fractional digits, no zone).
# 2024: "2024-05-12 00:00:00.001163+00:00", and "2024-05-12 00:00:00+00:00" when the
# microseconds are zero (pandas drops the fraction), so precision varies row to row.
_TS = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?\s*(Z|[+-]\d{2}:?\d{2})?"
)


def parse_timestamp_ns(s: str, field: str) -> tuple[int, bool]:
    """Integer nanoseconds since the epoch (UTC) and whether the string carried a zone.

    Integer arithmetic keeps sub-microsecond gaps exact: a float of epoch seconds only resolves
    ~0.2 us. A string without a zone is read as UTC.
    """
    m = _TS.fullmatch(s.strip())
    if m is None:
        raise RowError(field, f"not a timestamp (YYYY-MM-DD HH:MM:SS[.fff][+HH:MM]): {s!r}")
    y, mo, d, h, mi, sec, frac, tz = m.groups()
    try:
        days = date(int(y), int(mo), int(d)).toordinal()
    except ValueError as e:
        raise RowError(field, f"bad date {s!r}: {e}") from None
    if int(h) > 23 or int(mi) > 59 or int(sec) > 60:
        raise RowError(field, f"bad time of day: {s!r}")
    secs = days * 86400 + int(h) * 3600 + int(mi) * 60 + int(sec)
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        digits = tz[1:].replace(":", "")
        secs -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
    ns = secs * 1_000_000_000 + (int(frac.ljust(9, "0")) if frac else 0)
    return ns, tz is not None


class Azure(CsvFormat):
    name = "azure"
    time_field = "TIMESTAMP"
    required = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        self.t0_ns: int | None = None
        self.zoned: bool | None = None

    def parse(self, row: list[str], line_no: int) -> Parsed:
        ns, zoned = parse_timestamp_ns(self.get(row, "TIMESTAMP"), "TIMESTAMP")
        if self.zoned is None:
            self.zoned = zoned
        elif zoned != self.zoned:
            raise RowError("TIMESTAMP", "mixes times with and without a time zone")
        inp = self.int_col(row, "ContextTokens")
        out = self.int_col(row, "GeneratedTokens")
        if self.t0_ns is None:
            self.t0_ns = ns
        t = (ns - self.t0_ns) / 1e9
        return t, TraceRecord(t, inp, out, source_line=line_no), None


# --- BurstGPT ---------------------------------------------------------------------------------

_SESSION_COLS = ("SessionID", "Session ID", "Session_ID", "session_id", "Session id")


class BurstGPT(CsvFormat):
    """`Timestamp` is seconds from midnight of the first day. Rows with `Response tokens` == 0
    are failed requests (BurstGPT's own definition); they are dropped and counted unless
    `keep_failures` is set. Newer releases announce `SessionID` and `Elapsed time` columns."""

    name = "burstgpt"
    time_field = "Timestamp"
    required = ("Timestamp", "Request tokens", "Response tokens")
    known = ("Model", "Total tokens", "Log Type", "Elapsed time", *_SESSION_COLS)

    def header(self, cols: list[str]) -> list[str]:
        unknown = super().header(cols)
        self.session_col = next((c for c in _SESSION_COLS if c in self.idx), None)
        return unknown

    def parse(self, row: list[str], line_no: int) -> Parsed:
        t = as_float(self.get(row, "Timestamp"), "Timestamp")
        inp = self.int_col(row, "Request tokens")
        out = self.int_col(row, "Response tokens")
        sid = self.get(row, self.session_col) if self.session_col else ""
        rec = TraceRecord(t, inp, out, session_id=sid or None, source_line=line_no)
        if out == 0 and not self.options.get("keep_failures"):
            return t, None, "failed request (Response tokens = 0)"
        return t, rec, None


# --- Vidur processed traces and SplitwiseSim --------------------------------------------------


class Vidur(CsvFormat):
    """Vidur's processed traces: `arrived_at` in seconds (absent in length-only files, which
    are then untimed: every arrival is 0), `num_prefill_tokens`, `num_decode_tokens`."""

    name = "vidur"
    time_field = "arrived_at"
    required = ("num_prefill_tokens", "num_decode_tokens")
    known = ("arrived_at", "num_total_tokens", "pd_ratio")

    def header(self, cols: list[str]) -> list[str]:
        unknown = super().header(cols)
        self.timed = "arrived_at" in self.idx
        return unknown

    def parse(self, row: list[str], line_no: int) -> Parsed:
        t = as_float(self.get(row, "arrived_at"), "arrived_at") if self.timed else 0.0
        rec = TraceRecord(
            t,
            self.int_col(row, "num_prefill_tokens"),
            self.int_col(row, "num_decode_tokens"),
            source_line=line_no,
        )
        return t, rec, None


class Splitwise(CsvFormat):
    """SplitwiseSim request traces: `arrival_timestamp` seconds, `prompt_size`, `token_size`."""

    name = "splitwise"
    time_field = "arrival_timestamp"
    required = ("arrival_timestamp", "prompt_size", "token_size")
    known = ("request_id", "request_type", "application_id", "batch_size")

    def parse(self, row: list[str], line_no: int) -> Parsed:
        t = as_float(self.get(row, "arrival_timestamp"), "arrival_timestamp")
        rec = TraceRecord(
            t, self.int_col(row, "prompt_size"), self.int_col(row, "token_size"), source_line=line_no
        )
        return t, rec, None


CSV_FORMATS: tuple[type[CsvFormat], ...] = (Azure, BurstGPT, Vidur, Splitwise)


def csv_format_for_header(cols: list[str]) -> type[CsvFormat] | None:
    """The CSV format whose required columns all appear in this header (Vidur needs only its
    two length columns, so it is tried last)."""
    names = {c.strip() for c in cols}
    for fmt in (Azure, BurstGPT, Splitwise, Vidur):
        if set(fmt.required) <= names:
            return fmt
    return None
