"""Live progress on stderr for every kind of run: one process, --workers, --ray, capacity searches.

One display per command (`session()`, opened by the command line; `current()` finds it). A run
attaches a feed while it runs and detaches it after: `EngineFeed` for a one-process run (the
engine's counters), `MergedFeed` for workers and Ray (the merged interval rows). A capacity
search's runs attach one after another and its step lines go through `Display.line()`.

Why a thread of its own: the event loop carries the measurement and a 5 ms stall fails the
self-check, so no part of the display runs on the loop. The thread wakes `REFRESH_HZ` times a
second, reads the engine's counters (plain ints: safe to read from any thread under the GIL) and
the last interval row (its percentiles were computed off the loop when the interval closed; the
display never computes one), builds the frame as one string from prebuilt escape codes and writes
it with one os.write (`region.Region`: 0.2-0.3 ms of CPU per redraw mid-run, 0.02 ms with warm caches,
where rich's Live took 0.7-1.5 ms with the GIL held; bench/results-live-render.md), under the short GIL switch
interval of `offloop` (while it holds the GIL the loop waits at most 0.5 ms). Its own cost goes into the run's
self-check figures (`Feed.cost()`). On the loop remain a feed's attach/detach and, for workers, one
assignment per merged row.

A terminal gets a region redrawn in place, coloured. Anything else, NO_COLOR or TERM=dumb
gets plain lines without escape codes: one per interval, one when the drain begins, one at the end.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import IO, Any

from replay.run.colour import plain_wanted, verdict_line
from replay.run.live_view import STYLES, Snapshot, counts_text, plain_row, render
from replay.run.offloop import short_switch_interval
from replay.run.region import Region

REFRESH_HZ = 2.0
_CURRENT: ContextVar[Display | None] = ContextVar("replay_live_display", default=None)


def current() -> Display | None:
    """The command's display, or None (--quiet, or a run started from code)."""
    return _CURRENT.get()


@contextlib.contextmanager
def session(quiet: bool = False, stream: IO[str] | None = None) -> Iterator[Display | None]:
    """The display for everything run inside the block (None with `quiet`)."""
    if quiet:
        yield None
        return
    display = Display(stream or sys.stderr)
    token = _CURRENT.set(display)
    try:
        yield display
    finally:
        _CURRENT.reset(token)
        display.close()


@dataclass
class Feed:
    """What one run shows. `snapshot()` runs on the display thread; `row()` on whichever thread
    closed the interval (the one-process run's off-loop worker, the workers' parent loop)."""

    title: str
    t0: float  # the run's start, perf_counter
    planned_s: float | None
    planned_requests: float | None  # exact with --requests, else rate x duration (shown with ~)
    exact_requests: bool
    drain_timeout_s: float
    display: Display | None = None
    last_row: dict[str, Any] | None = None
    new_rows: deque[dict[str, Any]] = field(default_factory=deque)
    final: Snapshot | None = None  # frozen at detach
    refreshes: int = 0
    render_s_max: float = 0.0
    render_s_total: float = 0.0
    cpu_s_total: float = 0.0  # the display thread's CPU time for this run's redraws
    drain_announced: bool = False
    ended: bool = False  # its end was shown

    def row(self, row: dict[str, Any]) -> None:
        self.last_row = row
        if self.display is not None and self.display.plain:
            self.new_rows.append(row)
            self.display.wake()

    def snapshot(self, now: float) -> Snapshot:
        raise NotImplementedError

    def cost(self) -> dict[str, Any]:
        """The display's own cost while this run was on it, for the self-check figures."""
        d = self.display
        n = self.refreshes
        return {
            "mode": "off" if d is None else ("plain" if d.plain else "live"),
            "refresh_hz": None if d is None else round(1 / d.period, 3),
            "refreshes": n,
            "render_ms_max": round(self.render_s_max * 1e3, 3),
            "render_ms_mean": round(self.render_s_total / n * 1e3, 3) if n else None,
            "cpu_ms_total": round(self.cpu_s_total * 1e3, 3),
        }

    def _drain_left(self, elapsed: float, since: float, now: float) -> float | None:
        if since:
            return max(0.0, self.drain_timeout_s - (now - since))
        if self.planned_s is not None and elapsed > self.planned_s:  # closed loop, workers: estimated
            return max(0.0, self.planned_s + self.drain_timeout_s - elapsed)
        return None


@dataclass
class EngineFeed(Feed):
    """A one-process run: the engine's live counters, the recorder's error kinds."""

    engine: Any = None
    recorder: Any = None

    def snapshot(self, now: float) -> Snapshot:
        st = self.engine.state
        elapsed = now - self.t0
        drain = self._drain_left(elapsed, st.draining_since, now) if st.in_flight else None
        return Snapshot(
            elapsed_s=elapsed,
            sent=st.dispatched,
            in_flight=st.in_flight,
            ok=st.ok,
            errors=dict(self.recorder.counts.errors),  # a C-level copy: atomic under the GIL
            not_sent=st.not_sent,
            drain_left_s=drain,
            row=self.last_row,
        )


@dataclass
class MergedFeed(Feed):
    """Workers or Ray actors: everything from the merged interval rows (the parent has no engine)."""

    ok: int = 0
    unfinished: int = 0
    not_sent_total: int = 0
    errors_by_kind: dict[str, int] | None = None

    def row(self, row: dict[str, Any]) -> None:
        kinds = dict(self.errors_by_kind or {})
        for k, v in (row.get("error_kinds") or {}).items():
            kinds[k] = kinds.get(k, 0) + v
        self.errors_by_kind = kinds  # one reference swap: the display thread reads whole dicts
        self.ok += row.get("ok") or 0
        self.unfinished += row.get("unfinished") or 0
        self.not_sent_total += row.get("not_sent") or 0
        super().row(row)

    def snapshot(self, now: float) -> Snapshot:
        row = self.last_row
        errors = dict(self.errors_by_kind or {})
        in_flight = row.get("in_flight") if row else None
        elapsed = now - self.t0
        sent = None if row is None else self.ok + sum(errors.values()) + self.unfinished + (in_flight or 0)
        return Snapshot(
            elapsed_s=elapsed,
            sent=sent,
            in_flight=in_flight,
            ok=self.ok,
            errors=errors,
            not_sent=self.not_sent_total,
            drain_left_s=self._drain_left(elapsed, 0.0, now),
            row=row,
        )


def _planned(cfg: Any, offered_rate: float | None) -> tuple[float | None, bool]:
    """Requests the run is expected to schedule, and whether that is exact (--requests binds)."""
    by_time = offered_rate * cfg.duration_s if offered_rate and cfg.duration_s else None
    if cfg.requests is not None and (by_time is None or cfg.requests <= by_time):
        return float(cfg.requests), True
    return by_time, False


def _title(cfg: Any, offered_rate: float | None, name: str, extra: str = "") -> str:
    how = f"closed loop, {cfg.concurrency} streams" if cfg.concurrency else (
        f"open loop, {offered_rate:.4g} req/s" if offered_rate else "open loop")  # fmt: skip
    return f"{name}: {how}{extra}"


def attach_engine(
    engine: Any, recorder: Any, cfg: Any, t0: float, offered_rate: float | None, name: str
) -> EngineFeed | None:
    """Show a one-process run on the command's display; None without one."""
    display = current()
    if display is None:
        return None
    planned, exact = _planned(cfg, offered_rate)
    feed = EngineFeed(_title(cfg, offered_rate, name), t0, cfg.duration_s, planned, exact,
                      cfg.drain_timeout_s, engine=engine, recorder=recorder)  # fmt: skip
    return display.attach(feed)


def attach_merged(
    cfg: Any, t0: float, offered_rate: float | None, name: str, workers: str
) -> MergedFeed | None:
    """Show a run of several workers on the command's display (fed by `feed.row`); None without one."""
    display = current()
    if display is None:
        return None
    planned, exact = _planned(cfg, offered_rate)
    title = _title(cfg, offered_rate, name, f", {workers}")
    return display.attach(MergedFeed(title, t0, cfg.duration_s, planned, exact, cfg.drain_timeout_s))


def detach(feed: Feed | None) -> None:
    if feed is not None and feed.display is not None:
        feed.display.detach(feed)


# ---- the display ---------------------------------------------------------------------------------


class Display:
    def __init__(self, stream: IO[str], refresh_hz: float = REFRESH_HZ) -> None:
        self.stream = stream
        self.plain = plain_wanted(stream)
        self.period = 1.0 / refresh_hz
        self._feeds: list[Feed] = []  # replaced, never mutated: the thread reads whole lists
        self._lines: deque[str] = deque()
        self._wake = threading.Event()
        self._closing = False
        # Built now, before any run: its escape codes (rich) take ~0.5 ms a first redraw would pay mid-run
        self._region = None if self.plain else Region(stream, STYLES)
        self._broken = False
        self._thread = threading.Thread(target=self._main, name="replay-live", daemon=True)
        self._thread.start()

    # -- from any thread --------------------------------------------------------------------------

    def line(self, text: str) -> None:
        """A line printed above the live region (or as is, in plain mode): e.g. a step's verdict."""
        self._lines.append(text)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def attach(self, feed: Feed) -> Feed:
        feed.display = self
        self._feeds = [f for f in self._feeds if f.final is None] + [feed]  # a finished run leaves
        self._wake.set()
        return feed

    def detach(self, feed: Feed) -> None:
        feed.final = feed.snapshot(time.perf_counter())
        self._wake.set()

    def close(self) -> None:
        self._closing = True
        self._wake.set()
        self._thread.join(timeout=5.0)

    # -- the display thread -----------------------------------------------------------------------

    def _main(self) -> None:
        while True:
            running = any(f.final is None for f in self._feeds)
            self._wake.wait(self.period if running else None)
            self._wake.clear()
            closing = self._closing
            if not self._broken:
                try:
                    self._tick()
                except Exception as exc:  # the display must never end a run: it goes quiet
                    self._broken = True
                    with contextlib.suppress(Exception):
                        self._stop_live()
                        print(f"replay: live display off: {type(exc).__name__}: {exc}", file=self.stream)
            if closing:
                break
        with contextlib.suppress(Exception):
            self._stop_live()

    def _tick(self) -> None:
        feeds = self._feeds
        with short_switch_interval():
            t, cpu = time.perf_counter(), time.thread_time()
            if self.plain:
                self._plain_tick(feeds, t)
            else:
                self._live_tick(feeds, t)
            spent, cpu = time.perf_counter() - t, time.thread_time() - cpu
        for f in feeds:
            if f.final is None:  # what a run paid while it ran (wall time includes waits for a CPU)
                f.refreshes += 1
                f.render_s_total += spent
                f.render_s_max = max(f.render_s_max, spent)
                f.cpu_s_total += cpu

    def _live_tick(self, feeds: list[Feed], now: float) -> None:
        region = self._region
        assert region is not None
        if not region.shown and not feeds and not self._lines:
            return
        above = []
        while self._lines:
            above.append(verdict_line(self._lines.popleft()))
        lines = [ln for f in feeds for ln in render(f, f.final or f.snapshot(now), done=f.final is not None)]
        region.draw(above, lines)

    def _plain_tick(self, feeds: list[Feed], now: float) -> None:
        out = []
        while self._lines:
            out.append(self._lines.popleft())
        for f in feeds:
            final = f.final  # read first: a run detaches after its last row, so that row is queued
            while f.new_rows:
                out.append(plain_row(f, f.snapshot(now), f.new_rows.popleft()))
            snap = final or f.snapshot(now)
            if final is None and snap.drain_left_s is not None and snap.in_flight and not f.drain_announced:
                f.drain_announced = True
                out.append(f"{f.title} | draining {snap.in_flight} in flight, {snap.drain_left_s:.0f} s left")
            if final is not None and not f.ended:
                f.ended = True
                out.append(f"{f.title} | done in {snap.elapsed_s:.1f} s: {counts_text(f, snap)}")
        if out:
            self.stream.write("\n".join(out) + "\n")
            self.stream.flush()

    def _stop_live(self) -> None:
        if self._region is not None:
            self._region.close()  # shows the cursor again; drawing again would hide it again
