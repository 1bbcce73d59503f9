"""`--workers N`: one uvloop process per worker on this host, one shared start time.

On Linux `time.perf_counter()` is CLOCK_MONOTONIC, one clock for every process of a host, so the
parent fixes t0 once (after every worker has started its target and built its schedule) and every
worker dispatches its share (`replay.scaleout.shard`) against that same t0. The parent merges what the
workers report (`replay.scaleout.merge`) into the files and summary one process would have written.

One pipe per worker carries pickled tuples:
  worker -> parent: ("ready", info) | ("error", text) | ("interval", IntervalReport) | ("done", WorkerResult)
  parent -> worker: ("start", t0) | ("stop",) | ("cancel",)
Workers ignore SIGINT: a terminal's Ctrl-C reaches the whole process group, and the parent alone
turns the first into "stop" (drain, partial summary) and the second into "cancel". A worker whose
parent vanished (pipe EOF) stops the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import signal
import socket
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from replay.core.errors import ReplayError
from replay.run import live
from replay.run.config import RunConfig
from replay.run.files import IntervalLog, JsonlWriter
from replay.run.runner import START_LEAD_S, RunResult
from replay.run.sidecar import Sidecar
from replay.scaleout.merge import IntervalMerger, finish_run, merge_request_files
from replay.scaleout.shard import ScheduleFactory, ShardRunner, ShardSpec, TargetFactory, WorkerResult

# `--workers auto` sizes by client CPU. Measured with one worker (aiohttp + SSE decoding, uvloop)
# against the stub on the 2-core development VM: 100 req/s x 16 tokens cost 9.1% of a core,
# 100 x 128 tokens 24.1%, 200 x 128 tokens 38.4%, i.e. about 13 us per streamed token and about
# 0.55 ms per request. A worker is planned at 40% of a core: a busier event loop starts to queue
# token reads, which shows as TTFT/ITL the server did not cause (a headroom choice, pending a
# quiet-machine run of bench/scaleout.py).
CPU_PER_TOKEN_S = 13e-6
CPU_PER_REQUEST_S = 0.55e-3
WORKER_BUSY = 0.40
READY_TIMEOUT_S = 300.0  # workers' target start (model lookup, connection warm-up)
START_MARGIN_S = 0.2  # for "start" to reach every worker before t0
JOIN_TIMEOUT_S = 10.0


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def is_process_local(target: Any) -> bool:
    """A target whose serving capacity lives in this process (an in-process model): N copies would
    be N servers, so it runs with one worker. Targets say so with `process_local = True`; the
    transformers target is one whatever its configured name."""
    default = type(target).__module__ == "replay.targets.transformers_local"
    return bool(getattr(target, "process_local", default))


def auto_workers(offered_rate: float | None, output_tokens: int, cores: int | None = None) -> int:
    """Enough workers for the offered load at `WORKER_BUSY` of a core each, at most one per core."""
    cores = cores or available_cores()
    rate = offered_rate or 0.0
    cpu = rate * (output_tokens * CPU_PER_TOKEN_S + CPU_PER_REQUEST_S)  # cores' worth of client work
    return max(1, min(cores, math.ceil(cpu / WORKER_BUSY)))


def resolve_workers(
    requested: int | None, target: Any, offered_rate: float | None, output_tokens: int
) -> int:
    """`--workers` as given (None or 0 = auto). An in-process target gets 1; asking for more is an error."""
    if is_process_local(target):
        if requested and requested > 1:
            raise ReplayError(
                f"--workers: target {getattr(target, 'name', '?')} runs in this process; use --workers 1"
            )
        return 1
    if requested is not None and requested < 0:
        raise ReplayError(f"--workers: must be >= 1 (or 0 for auto), got {requested}")
    return requested or auto_workers(offered_rate, output_tokens)


def install_signals(handler: Any) -> Any:
    """SIGINT/SIGTERM -> `handler` on the running loop; returns the undo. Off the main thread
    (where signals cannot be caught) it installs nothing: the caller stops the run its own way."""
    loop = asyncio.get_running_loop()
    done = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, handler)
        except (ValueError, RuntimeError, NotImplementedError):
            break
        done.append(sig)

    def undo() -> None:
        for sig in done:
            loop.remove_signal_handler(sig)

    return undo


def sidecar_row(sidecar: Sidecar) -> Any:
    """The sidecar's latest server sample as timeseries columns, as one process writes them."""
    return lambda: {f"server.{k}": v for k, v in sidecar.last.items()}


# ---- worker process ---------------------------------------------------------------------------


def _entry(spec: ShardSpec, conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from replay.run.runner import run_in_uvloop

    try:
        run_in_uvloop(_serve(spec, conn))
    except BaseException as exc:  # reported to the parent as one line, never a traceback
        with contextlib.suppress(OSError):
            conn.send(("error", f"worker {spec.index}: {type(exc).__name__}: {exc}"[:300]))
    finally:
        conn.close()


async def _serve(spec: ShardSpec, conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    runner = ShardRunner(spec, lambda rep: conn.send(("interval", rep)))
    start: asyncio.Future[float | None] = loop.create_future()

    def on_message() -> None:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent is gone: stop as on a signal
            loop.remove_reader(conn.fileno())
            msg = ("stop",)
        if msg[0] == "start" and not start.done():
            start.set_result(msg[1])
        elif msg[0] == "stop":
            if not start.done():
                start.set_result(None)
            runner.stop()
        elif msg[0] == "cancel":
            runner.cancel()

    loop.add_reader(conn.fileno(), on_message)
    loop.add_signal_handler(signal.SIGTERM, runner.stop)
    try:
        await runner.prepare()
        conn.send(("ready", {"host": socket.gethostname(), "pid": os.getpid()}))
        t0 = await start
        if t0 is None:
            return
        result = await runner.run(t0)
        conn.send(("done", result))
    finally:
        with contextlib.suppress(Exception):
            loop.remove_reader(conn.fileno())
        await runner.close()


# ---- parent -----------------------------------------------------------------------------------


class _Hub:
    """The parent's view of its workers, fed by the event loop's pipe readers."""

    def __init__(self, conns: list[Connection]) -> None:
        self.conns = conns
        self.ready: set[int] = set()
        self.results: dict[int, WorkerResult] = {}
        self.errors: dict[int, str] = {}
        self.closed: set[int] = set()
        self.merger: IntervalMerger | None = None
        self.signals = 0
        self.changed = asyncio.Event()

    def watch(self) -> None:
        loop = asyncio.get_running_loop()
        for w, conn in enumerate(self.conns):
            loop.add_reader(conn.fileno(), self._on_readable, w)

    def unwatch(self) -> None:
        loop = asyncio.get_running_loop()
        for w, conn in enumerate(self.conns):
            if w not in self.closed:
                with contextlib.suppress(Exception):
                    loop.remove_reader(conn.fileno())

    def _on_readable(self, w: int) -> None:
        conn = self.conns[w]
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(conn.fileno())
            self.closed.add(w)
            if self.merger is not None:
                self.merger.worker_done(w)
            self.changed.set()
            return
        kind = msg[0]
        if kind == "ready":
            self.ready.add(w)
        elif kind == "error":
            self.errors[w] = msg[1]
        elif kind == "interval":
            if self.merger is not None:
                self.merger.add(msg[1])
        elif kind == "done":
            self.results[w] = msg[1]
            if self.merger is not None:
                self.merger.worker_done(w)
        self.changed.set()

    def send_all(self, msg: tuple[Any, ...]) -> None:
        for w, conn in enumerate(self.conns):
            if w not in self.closed:
                with contextlib.suppress(OSError):
                    conn.send(msg)

    def on_signal(self) -> None:
        self.signals += 1
        self.send_all(("stop",) if self.signals == 1 else ("cancel",))
        self.changed.set()

    async def wait(self, done: Any, timeout_s: float | None = None) -> bool:
        """Wait until `done()` holds; False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not done():
            self.changed.clear()
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)
        return True


async def execute_workers(
    cfg: RunConfig,
    target_factory: TargetFactory,
    schedule: ScheduleFactory,
    run_dir: Path,
    offered_rate: float | None,
    workers: int,
    target_info: dict[str, Any] | None = None,
    server_target: Any = None,
) -> RunResult:
    """One run split over `workers` processes into `run_dir`; the same files as `replay.run.runner.execute`.

    `target_factory` (picklable) builds each worker's own target; a server the run depends on is
    the caller's to start and stop, and `server_target` (the caller's started target, if any) is
    what the parent's sidecar scrapes. `schedule(w, n)` gives worker w's share (`replay.scaleout.shard`).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.concurrency:  # closed loop: every worker needs at least one stream
        workers = min(workers, cfg.concurrency)
    ctx = mp.get_context("spawn")
    parts = [run_dir / f"requests-w{w}.jsonl" for w in range(workers)]
    procs, conns = [], []
    for w in range(workers):
        spec = ShardSpec(w, workers, cfg, target_factory, schedule, str(parts[w]))
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(target=_entry, args=(spec, child_end), name=f"replay-worker-{w}", daemon=True)
        proc.start()
        child_end.close()
        procs.append(proc)
        conns.append(parent_end)
    hub = _Hub(conns)
    sidecar = Sidecar(server_target, run_dir)
    hub.watch()
    undo_signals = install_signals(hub.on_signal)
    lost: list[str] = []
    try:
        ok = await hub.wait(
            lambda: len(hub.ready) == workers or hub.errors or hub.closed or hub.signals, READY_TIMEOUT_S
        )
        if hub.errors or hub.closed or hub.signals or not ok:
            hub.send_all(("stop",))
            why = next(iter(hub.errors.values()), None) or (
                "interrupted before the start" if hub.signals else "a worker exited before it was ready"
            )
            raise ReplayError(
                why if ok else f"workers not ready after {READY_TIMEOUT_S:g} s",
                exit_code=130 if hub.signals else 2,
            )
        t0 = time.perf_counter() + START_LEAD_S + START_MARGIN_S
        hlog = IntervalLog(run_dir / "intervals.hlog", time.time() + (t0 - time.perf_counter()))
        timeseries = JsonlWriter(run_dir / "timeseries.jsonl")
        feed = live.attach_merged(cfg, t0, offered_rate, run_dir.name, f"{workers} workers")
        hub.merger = IntervalMerger(workers, hlog, timeseries, cfg.interval_s, sidecar_row(sidecar),
                                    feed.row if feed else None)  # fmt: skip
        hub.send_all(("start", t0))
        sidecar.start(t0)
        try:
            await hub.wait(lambda: all(w in hub.results or w in hub.closed for w in range(workers)))
        finally:
            await sidecar.stop()
            for w in range(workers):
                hub.merger.worker_done(w)
            live.detach(feed)
            hlog.close()
            timeseries.close()
        for w in range(workers):
            if w not in hub.results:
                lost.append(f"worker {w} lost: {hub.errors.get(w, 'exited without results')}")
    finally:
        undo_signals()
        hub.unwatch()
        await asyncio.to_thread(_join, procs)
        for conn in conns:
            conn.close()
    merge_request_files(parts, run_dir / "requests.jsonl")
    results = [hub.results[w] for w in sorted(hub.results)]
    return finish_run(
        cfg=cfg,
        run_dir=run_dir,
        results=results,
        lost=lost,
        offered_rate=offered_rate,
        interrupted=hub.signals > 0,
        target=target_info or (results[0].target if results else {}),
        executor={"mode": "processes", "count": workers},
        merger=hub.merger,
        server=sidecar.summary(),
        display=feed.cost() if feed else None,
    )


def _join(procs: list[Any]) -> None:
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(2.0)
