"""Per-turn-index figures of a conversation workload (sessions): turn 1's TTFT beside turn 5's is
the server's prefix cache at work (a later turn re-sends the whole conversation so far) against the
growing context's cost. Turns index from 1; turns from TURN_HISTS on share the last row ("16+"),
so a long session costs a bounded number of histograms (184 KiB each).

The recorder counts each turn's requests (every status) and records ok turns' TTFT into histograms
named by `turn_metric`; they merge across workers like any other (decode-add by name).
"""

from __future__ import annotations

from typing import Any

from hdrh.histogram import HdrHistogram

from replay.stats import histogram as H

TURN_HISTS = 16
PREFIX = "ttft_turn"


def turn_key(turn: int) -> int:
    return min(turn, TURN_HISTS)


def turn_metric(turn: int) -> str:
    return f"{PREFIX}{turn_key(turn)}"


def turns_section(
    hists: dict[str, HdrHistogram], scheduled: dict[int, int], ok: dict[int, int]
) -> list[dict[str, Any]]:
    """summary.json's "turns": one row per turn index seen, in order: requests scheduled for that
    turn (sent or counted not sent), ok, and the ok turns' TTFT (ms)."""
    rows = []
    for k in sorted(scheduled):
        h = hists.get(f"{PREFIX}{k}")
        rows.append(
            {
                "turn": k,
                "and_later": k == TURN_HISTS,
                "scheduled": scheduled[k],
                "ok": ok.get(k, 0),
                "not_ok": scheduled[k] - ok.get(k, 0),
                "ttft_ms": H.summary_ms(h) if h is not None else H.summary_ms(H.new()),
            }
        )
    return rows


def turn_label(row: dict[str, Any]) -> str:
    return f"{row['turn']}+" if row.get("and_later") else str(row["turn"])


def turns_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The console table's per-turn block."""
    if not rows:
        return []
    out = [f"{'turn':<6}{'scheduled':>10}{'ok':>8}{'not ok':>8}{'TTFT p50':>10}{'TTFT p99':>10}  (ms)"]
    for r in rows:
        t = r["ttft_ms"]
        p50 = "-" if t["p50"] is None else f"{t['p50']:.2f}"
        p99 = "-" if t["p99"] is None else f"{t['p99']:.2f}"
        out.append(f"{turn_label(r):<6}{r['scheduled']:>10}{r['ok']:>8}{r['not_ok']:>8}{p50:>10}{p99:>10}")
    return out
