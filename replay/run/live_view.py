"""What the live display shows of one run: its region on a terminal (`render`), its plain lines
(`plain_row`, `counts_text`). Pure formatting of a `Snapshot` (what a run's feed read at one
moment); nothing here reads a run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BAR_WIDTH = 40
Feed = Any  # replay.run.live.Feed: title, planned_s, planned_requests, exact_requests


@dataclass
class Snapshot:
    elapsed_s: float
    sent: int | None
    in_flight: int | None
    ok: int
    errors: dict[str, int]
    not_sent: int
    drain_left_s: float | None  # None: not draining
    row: dict[str, Any] | None  # the last interval row


def _n(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _ms(v: float | None) -> str:
    return "-" if v is None else (f"{v:.1f}" if v < 100 else f"{v:,.0f}")


def _sec(v: float) -> str:
    return f"{v:.0f}" if abs(v - round(v)) < 0.05 else f"{v:.1f}"


def counts_text(f: Feed, s: Snapshot) -> str:
    planned = "" if f.planned_requests is None else (
        f" / {'' if f.exact_requests else '~'}{_n(f.planned_requests)}")  # fmt: skip
    errs = sum(s.errors.values())
    kinds = f" ({', '.join(f'{k} {v}' for k, v in sorted(s.errors.items()))})" if errs else ""
    text = f"sent {_n(s.sent)}{planned}, in flight {_n(s.in_flight)}, ok {_n(s.ok)}, errors {errs}{kinds}"
    return text + (f", not sent {s.not_sent}" if s.not_sent else "")


def _latency_text(row: dict[str, Any] | None) -> str:
    if row is None:
        return "last interval: -"
    t1 = row["t_s"]
    t0 = t1 - row["interval_s"]
    return (f"last interval {_sec(t0)}-{_sec(t1)} s: TTFT p50/p99 {_ms(row.get('ttft_p50_ms'))}/"
            f"{_ms(row.get('ttft_p99_ms'))} ms, ITL p50/p99 {_ms(row.get('itl_p50_ms'))}/"
            f"{_ms(row.get('itl_p99_ms'))} ms")  # fmt: skip


def plain_row(f: Feed, snap: Snapshot, row: dict[str, Any]) -> str:
    """One plain line per interval row: its end time, the run's counts so far, its latencies."""
    planned = "" if f.planned_s is None else f" / {f.planned_s:.0f} s"
    return f"{f.title} | {row['t_s']:.0f}{planned} | {counts_text(f, snap)} | {_latency_text(row)}"


Piece = tuple[str, str]  # (text, style name; "" for none): styles become escape codes in run/region.py
STYLES = ("bold", "green", "magenta", "grey37", "bold green", "bold yellow", "bold red", "yellow", "cyan")


def render(f: Feed, s: Snapshot, done: bool = False) -> list[list[Piece]]:
    """The live region of one run, as lines of styled pieces: title, elapsed / planned with a bar,
    counts, last interval. Plain tuples, not rich Text: a redraw holds the GIL, so it is built with
    a few f-strings (0.01 ms warm) and written as one string (run/region.py)."""
    planned = f" / {f.planned_s:.0f} s" if f.planned_s else ""
    line2: list[Piece] = [(f"  {max(0.0, s.elapsed_s):6.1f} s{planned}  ", "")]
    frac = None
    if f.planned_s:
        frac = min(1.0, max(0.0, s.elapsed_s) / f.planned_s)
    elif f.planned_requests and s.sent is not None:
        frac = min(1.0, s.sent / f.planned_requests)
    if frac is not None:
        filled = round(frac * BAR_WIDTH)
        line2 += [("━" * filled, "green" if done else "magenta"), ("━" * (BAR_WIDTH - filled), "grey37"),
                  (f" {frac:4.0%}", "")]  # fmt: skip
    if done:
        line2.append(("  done", "bold green"))
    elif s.drain_left_s is not None:
        line2.append((f"  draining {s.in_flight} in flight: {s.drain_left_s:.0f} s left", "bold yellow"))
    planned_n = "" if f.planned_requests is None else (
        f" / {'' if f.exact_requests else '~'}{_n(f.planned_requests)}")  # fmt: skip
    errs = sum(s.errors.values())
    kinds = f" ({', '.join(f'{k} {v}' for k, v in sorted(s.errors.items()))})" if errs else ""
    line3: list[Piece] = [
        (f"  sent {_n(s.sent)}{planned_n}   in flight {_n(s.in_flight)}   ", ""),
        (f"ok {_n(s.ok)}", "green"),
        (f"   errors {errs}{kinds}", "bold red" if errs else ""),
    ]
    if s.not_sent:
        line3.append((f"   not sent {s.not_sent}", "yellow"))
    return [[(f.title, "bold")], line2, line3, [("  ", ""), (_latency_text(s.row), "cyan")]]
