"""Did the server keep up? Offered vs completed, the backlog's growth, the best rate it sustained.

Why: an overloaded run is a result about the server, not a failure of the tool, and should read
as one in the first lines of the summary. Everything here comes from the interval rows the run
already writes (completions by finish time, requests in flight at each interval's close), so it
costs nothing on the event loop and means the same for one process or merged workers.

- completed under load: ok completions in the intervals that end within the schedule's duration,
  per second of that span;
- backlog growth: the change in requests outstanding (in flight, or waiting for a client-side
  concurrency cap) from the first to the last interval closed within the schedule, per second
  (positive and sustained: arrivals outpace completions);
- best interval: the highest ok completion rate over any full interval of the run, drain
  included (with a backlog the server works flat out then): the rate it was seen to sustain.
"""

from __future__ import annotations

from typing import Any

# Backlog growth beyond this share of the offered rate means the server did not keep up.
GROWTH_SHARE = 0.05


class SaturationTracker:
    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._rows: list[tuple[float, float, int, int]] = []  # (end_s, length_s, ok, outstanding)

    def add(self, row: dict[str, Any]) -> None:
        """One interval row (replay.run.files.interval_row): t_s, interval_s, ok, and the requests
        outstanding at its close (in flight, plus any waiting for the client's concurrency cap)."""
        outstanding = int(row["in_flight"]) + int(row.get("waiting_for_cap") or 0)
        r = (float(row["t_s"]), float(row["interval_s"]), int(row["ok"]), outstanding)
        self._rows.append(r)

    def verdict(
        self, offered_rate: float | None, duration_s: float | None, unfinished: int = 0, scheduled: int = 0
    ) -> dict[str, Any]:
        """`scheduled` requests over `duration_s` is the rate that arrived: a seeded Poisson draw
        differs from the nominal offered rate (558 instead of 600 in 60 s at 10 req/s, seed 0)."""
        rows = self._rows
        out: dict[str, Any] = {"offered_req_s": offered_rate, "unfinished": unfinished}
        if scheduled and duration_s:
            out["arrived_req_s"] = round(scheduled / duration_s, 3)
        full = [r for r in rows if r[1] >= self.interval_s * 0.999]
        best = max(full or rows, key=lambda r: r[2] / r[1], default=None)
        out["best_interval_req_s"] = round(best[2] / best[1], 3) if best else None
        out["best_interval_s"] = round(best[1], 3) if best else None
        if not rows or not duration_s:
            out["verdict"] = "unknown"
            return out
        load = [r for r in rows if r[0] <= duration_s + 1e-6] or rows[:1]
        span = load[-1][0]
        out["completed_under_load_req_s"] = round(sum(r[2] for r in load) / span, 3) if span > 0 else None
        first, last = load[0], load[-1]
        if len(load) >= 2:
            growth = (last[3] - first[3]) / (last[0] - first[0])
        else:
            growth = last[3] / last[0] if last[0] > 0 else 0.0
        out["backlog_growth_req_s"] = round(growth, 3)
        out["in_flight_at_end_of_schedule"] = last[3]
        out["in_flight_peak"] = max(r[3] for r in rows)
        if offered_rate is None:  # closed loop: the server sets the pace, nothing to keep up with
            out["verdict"] = "closed_loop"
        elif growth > GROWTH_SHARE * offered_rate or unfinished:
            out["verdict"] = "saturated"
        else:
            out["verdict"] = "kept_up"
        return out


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v:,.1f}"


def headline(s: dict[str, Any] | None, drain_timeout_s: float | None = None) -> list[str]:
    """The summary's first lines: what the server did with the offered load."""
    if not s or s.get("verdict") in (None, "unknown", "closed_loop"):
        return []
    offered, under = s.get("offered_req_s"), s.get("completed_under_load_req_s")
    best = f"best {s['best_interval_s']:g} s: {_rate(s['best_interval_req_s'])} req/s"
    arrived = s.get("arrived_req_s")
    if arrived is not None and offered and abs(arrived - offered) > 0.02 * offered:
        offered_text = f"{_rate(offered)} req/s ({_rate(arrived)} arrived in this draw)"
    else:
        offered_text = f"{_rate(offered)} req/s"
    if s["verdict"] == "kept_up":
        return [
            f"server kept up: offered {offered_text}, completed {_rate(under)} req/s ({best}); "
            f"in flight at most {s['in_flight_peak']:,}"
        ]
    lines = [
        f"SERVER SATURATED: offered {offered_text}, completed {_rate(under)} req/s under load ({best})",
        f"  backlog grew {_rate(s['backlog_growth_req_s'])} req/s, to {s['in_flight_at_end_of_schedule']:,} "
        "in flight when the schedule ended",
    ]
    if s.get("unfinished"):
        when = f" ({drain_timeout_s:g} s after the schedule ended)" if drain_timeout_s else ""
        lines.append(
            f"  {s['unfinished']:,} still in flight at the drain deadline{when}: "
            "counted unfinished, not as errors"
        )
    return lines
