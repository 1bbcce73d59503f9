"""The command line's way into scale-out: how many workers, what each worker sends to, and who
owns the server.

The parent starts the named target once (a vLLM server is launched once, an HTTP target checks the
server is there) and gives each worker a picklable factory for its own client of that server.
A target can provide that factory itself (`shard_factory()`, called after `start()`); OpenAI HTTP
targets and targets that wrap one (`.http`, as the vLLM target does) get one here. An in-process
target (`process_local`, e.g. transformers) runs with one worker.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

from replay.core.errors import ReplayError
from replay.run.config import RunConfig
from replay.run.runner import RunResult, run_in_uvloop
from replay.scaleout.shard import ScheduleFactory, TargetFactory
from replay.scaleout.workers import execute_workers, is_process_local, resolve_workers


def worker_factory(target: Any) -> TargetFactory:
    """A picklable factory of one worker's client for the (started) `target`."""
    own = getattr(target, "shard_factory", None)
    if callable(own):
        return own()
    http = target if hasattr(target, "cfg") and hasattr(target, "base_url") else getattr(target, "http", None)
    if http is not None and dataclasses.is_dataclass(getattr(http, "cfg", None)):
        # Pin what the parent's probe found, so every worker asks for the same model.
        fields = {f.name for f in dataclasses.fields(http.cfg)}
        pinned = {
            k: getattr(http, k)
            for k in ("model", "vllm_extensions")
            if k in fields and getattr(http, k, None)
        }
        return functools.partial(type(http), dataclasses.replace(http.cfg, **pinned))
    raise ReplayError(
        f"--workers/--ray: target {getattr(target, 'name', '?')} cannot be shared across worker processes; "
        "use --workers 1"
    )


def scaled_run(
    cfg: RunConfig,
    target: Any,
    recipe: ScheduleFactory,
    run_dir: Path,
    offered_rate: float | None,
    workers: int | None,
    ray: str | None,
) -> RunResult | None:
    """Run with several workers or on Ray; None when one in-process run is the plan (the caller's).

    `recipe(w, n)` is worker w's share of the schedule (`SyntheticSchedule`, `plan.TraceSchedule`).
    """
    if ray is None:
        n = resolve_workers(workers, target, offered_rate, cfg.output_tokens)
        if n <= 1:
            return None
    elif is_process_local(target):
        raise ReplayError(f"--ray: target {getattr(target, 'name', '?')} runs in this process; drop --ray")
    else:
        n = workers or 0  # 0: one actor per node
    return run_in_uvloop(_scaled(cfg, target, recipe, run_dir, offered_rate, n, ray))


async def _scaled(
    cfg: RunConfig,
    target: Any,
    sched: ScheduleFactory,
    run_dir: Path,
    offered_rate: float | None,
    n: int,
    ray: str | None,
) -> RunResult:
    await target.start()
    try:
        factory = worker_factory(target)
        info = target.describe()
        if ray is not None:
            from replay.scaleout.ray_executor import execute_ray

            return await execute_ray(cfg, factory, sched, run_dir, offered_rate, n or None, ray, info, target)
        return await execute_workers(cfg, factory, sched, run_dir, offered_rate, n, info, target)
    finally:
        await target.close()
