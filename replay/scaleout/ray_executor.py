"""`--ray auto|ADDRESS`: the same shard workers as Ray actors, spread across a cluster's nodes.

Hosts do not share a monotonic clock, so the start is agreed in wall-clock time:
  1. Offset per actor, NTP-style: the driver reads time.time() (t1), asks the actor for its
     time.time() (ta), reads again (t2); offset = ta - (t1 + t2) / 2, known to +-RTT/2 with
     RTT = t2 - t1. The round trip with the smallest RTT of `CLOCK_ROUNDS` wins.
  2. The driver picks start_wall = now + lead and sends each actor start_wall + its offset;
     the actor turns that into its own perf_counter t0 (t0 = perf_counter() + start - time.time()),
     so from then on it dispatches on its host's monotonic clock, as a local worker does.
Offsets and RTTs are reported per worker in summary.json (`workers.each[].clock_*`); run-relative
times of two workers compare to within their offset errors.

Each actor writes its requests to a temporary file on its own node; the driver copies them back
in bounded chunks and merges them as for local workers. Interval reports are polled.
Nodes need `replay` and its dependencies installed (the same environment as the driver).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from replay.core.errors import ReplayError
from replay.run import live
from replay.run.config import RunConfig
from replay.run.files import IntervalLog, JsonlWriter
from replay.run.runner import START_LEAD_S, RunResult
from replay.run.sidecar import Sidecar
from replay.scaleout.merge import IntervalMerger, finish_run, merge_request_files
from replay.scaleout.shard import (
    IntervalReport,
    ScheduleFactory,
    ShardRunner,
    ShardSpec,
    TargetFactory,
    WorkerResult,
)
from replay.scaleout.workers import install_signals, sidecar_row

CLOCK_ROUNDS = 15
READY_TIMEOUT_S = 300.0
POLL_S = 0.25
CHUNK_BYTES = 4 << 20


class ShardActor:
    """A Ray actor hosting one `ShardRunner` on its own uvloop thread (Ray's threads stay free to
    answer clock probes, polls and stop requests while the shard runs)."""

    def __init__(self, spec: ShardSpec) -> None:
        import uvloop

        self._dir = tempfile.mkdtemp(prefix=f"replay-w{spec.index}-")
        self._spec = ShardSpec(
            spec.index,
            spec.count,
            spec.cfg,
            spec.target_factory,
            spec.schedule,
            os.path.join(self._dir, "requests.jsonl"),
        )
        self._reports: list[IntervalReport] = []
        self._lock = threading.Lock()
        self._loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="replay-shard", daemon=True)
        self._thread.start()
        self._runner = ShardRunner(self._spec, self._on_interval)

    def _on_interval(self, rep: IntervalReport) -> None:
        with self._lock:
            self._reports.append(rep)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def prepare(self) -> dict[str, Any]:
        import ray

        self._call(self._runner.prepare())
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    def clock(self) -> float:
        return time.time()

    def run(self, start_wall: float) -> WorkerResult:
        """`start_wall` is the agreed start on this host's wall clock."""
        t0 = time.perf_counter() + (start_wall - time.time())
        return self._call(self._runner.run(t0))

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._runner.stop)

    def cancel(self) -> None:
        self._loop.call_soon_threadsafe(self._runner.cancel)

    def drain(self) -> list[IntervalReport]:
        with self._lock:
            out, self._reports = self._reports, []
        return out

    def read_requests(self, offset: int, size: int) -> bytes:
        try:
            with open(self._spec.requests_path, "rb") as f:
                f.seek(offset)
                return f.read(size)
        except FileNotFoundError:
            return b""

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._runner.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        shutil.rmtree(self._dir, ignore_errors=True)


def measure_clock(actor: Any, rounds: int = CLOCK_ROUNDS) -> tuple[float, float]:
    """(offset_s, rtt_s) of the actor's wall clock against the driver's, from the best round trip."""
    import ray

    best = (0.0, float("inf"))
    for _ in range(rounds):
        t1 = time.time()
        ta = ray.get(actor.clock.remote())
        t2 = time.time()
        if t2 - t1 < best[1]:
            best = (ta - (t1 + t2) / 2, t2 - t1)
    return best


def _connect(address: str) -> Any:
    try:
        import ray
    except ImportError:
        raise ReplayError("--ray: Ray is not installed (pip install 'replay[ray]')") from None
    if not ray.is_initialized():
        try:
            ray.init(
                address=address,
                logging_level="WARNING",
                log_to_driver=False,
                configure_logging=True,
            )
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise ReplayError(f"--ray: cannot connect to Ray at {address!r}: {exc}") from None
    return ray


def cluster_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


async def execute_ray(
    cfg: RunConfig,
    target_factory: TargetFactory,
    schedule: ScheduleFactory,
    run_dir: Path,
    offered_rate: float | None,
    workers: int | None,
    address: str = "auto",
    target_info: dict[str, Any] | None = None,
    server_target: Any = None,
) -> RunResult:
    """One run split over Ray actors (placed with SPREAD, one CPU each) into `run_dir`.

    `workers=None` means one actor per alive node. SIGINT/SIGTERM act as in a local run: the
    first stops every actor (drain, partial summary), the second cancels in-flight requests.
    """
    ray = _connect(address)
    n = workers or cluster_nodes()
    if cfg.concurrency:  # closed loop: every worker needs at least one stream
        n = min(n, cfg.concurrency)
    run_dir.mkdir(parents=True, exist_ok=True)
    remote_cls = ray.remote(num_cpus=1, max_concurrency=4)(ShardActor)
    actors = [
        remote_cls.options(scheduling_strategy="SPREAD").remote(
            ShardSpec(w, n, cfg, target_factory, schedule, "")
        )
        for w in range(n)
    ]
    signals = [0]

    def on_signal() -> None:
        signals[0] += 1
        for a in actors:
            (a.stop if signals[0] == 1 else a.cancel).remote()

    undo_signals = install_signals(on_signal)
    try:
        try:
            infos = await asyncio.wait_for(
                asyncio.gather(*(_aw(a.prepare.remote()) for a in actors)), READY_TIMEOUT_S
            )
        except Exception as exc:
            raise ReplayError(f"--ray: workers failed to start: {_one_line(exc)}") from None
        if signals[0]:
            raise ReplayError("--ray: interrupted before the start", exit_code=130)
        # Blocking round trips in a thread: the driver's event loop must not add to the RTT.
        clocks = [await asyncio.to_thread(measure_clock, a) for a in actors]
        lead = START_LEAD_S + 0.2 + 3 * max(rtt for _, rtt in clocks)
        start_wall = time.time() + lead
        hlog = IntervalLog(run_dir / "intervals.hlog", start_wall)
        timeseries = JsonlWriter(run_dir / "timeseries.jsonl")
        sidecar = Sidecar(server_target, run_dir)
        t0 = time.perf_counter() + (start_wall - time.time())  # the driver's own t0
        feed = live.attach_merged(cfg, t0, offered_rate, run_dir.name, f"Ray, {n} actors")
        merger = IntervalMerger(n, hlog, timeseries, cfg.interval_s, sidecar_row(sidecar),
                                feed.row if feed else None)  # fmt: skip
        pending = {
            asyncio.ensure_future(_aw(a.run.remote(start_wall + off))): w
            for w, (a, (off, _)) in enumerate(zip(actors, clocks, strict=True))
        }
        sidecar.start(t0)
        results: dict[int, WorkerResult] = {}
        lost: list[str] = []
        try:
            while pending:
                done, _ = await asyncio.wait(list(pending), timeout=POLL_S)
                for reps in await asyncio.gather(*(_aw(a.drain.remote()) for a in actors)):
                    for rep in reps:
                        merger.add(rep)
                for fut in done:
                    w = pending.pop(fut)
                    try:
                        results[w] = fut.result()
                    except Exception as exc:
                        lost.append(f"worker {w} lost: {_one_line(exc)}")
                    merger.worker_done(w)
        finally:
            await sidecar.stop()
            for w in range(n):
                merger.worker_done(w)
            live.detach(feed)
            hlog.close()
            timeseries.close()
        parts = [run_dir / f"requests-w{w}.jsonl" for w in range(n)]
        for w, a in enumerate(actors):
            await _copy_requests(a, parts[w])
        for w, r in results.items():
            off, rtt = clocks[w]
            r.extra.update(
                node_id=infos[w]["node_id"],
                clock_offset_ms=round(off * 1e3, 3),
                clock_rtt_ms=round(rtt * 1e3, 3),
            )
    finally:
        undo_signals()
        for a in actors:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(_aw(a.close.remote()), 30)
            with contextlib.suppress(Exception):
                ray.kill(a)
    merge_request_files(parts, run_dir / "requests.jsonl")
    ordered = [results[w] for w in sorted(results)]
    return finish_run(
        cfg=cfg,
        run_dir=run_dir,
        results=ordered,
        lost=lost,
        offered_rate=offered_rate,
        interrupted=signals[0] > 0,
        target=target_info or (ordered[0].target if ordered else {}),
        merger=merger,
        server=sidecar.summary(),
        display=feed.cost() if feed else None,
        executor={
            "mode": "ray",
            "count": n,
            "address": address,
            "nodes": len({i["node_id"] for i in infos}),
            "clock_max_abs_offset_ms": round(max(abs(o) for o, _ in clocks) * 1e3, 3),
            "clock_max_rtt_ms": round(max(r for _, r in clocks) * 1e3, 3),
        },
    )


def _aw(ref: Any) -> asyncio.Future[Any]:
    """A Ray ObjectRef as an asyncio future of this loop."""
    return asyncio.wrap_future(ref.future())


async def _copy_requests(actor: Any, dest: Path) -> None:
    """Copy the actor's requests file back in bounded chunks (no whole file in one message)."""
    offset = 0
    with open(dest, "wb") as f:
        while True:
            chunk = await _aw(actor.read_requests.remote(offset, CHUNK_BYTES))
            if not chunk:
                return
            f.write(chunk)
            offset += len(chunk)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:300]
