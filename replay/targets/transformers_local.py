"""The transformers target: a local Hugging Face model served by transformers' own continuous batching,
in a process of its own (replay.targets.model_process), no HTTP.

Why a separate process: a model in the generator's process shares its GIL and cores, and the
generator falls behind (it did: dispatch lag max 114 ms at 50 req/s). Here the target starts the
model process in `start()` and stops it in `close()` (also after a failure or Ctrl-C; the
process gets PR_SET_PDEATHSIG and exits when its socket closes, so it never outlives us). This
process never imports torch or transformers: prompts are checked against the model's config.json
and text is tokenized with `tokenizers`.

Requests go over one Unix socket pair (replay.targets.model_wire); token updates come back one
frame per generation step and are read by the event loop through a non-blocking protocol, never a
blocking read. Token times are the model process's own `time.perf_counter()` stamps, taken as each
token is sampled: CLOCK_MONOTONIC, one clock for every process on the host, checked at start
against a ping bracketed by ours. Output length is forced (EOS disabled), so traces replay exactly.

Cores: with more than one core available, the model process is pinned to all but the lowest one
(the generator's), and torch uses one thread per core it has (1 on 2 cores, 15 on 16); on one
core both share it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from replay.core import errors
from replay.core.errors import ReplayError
from replay.core.request import ERROR, OK, Request, RequestRecord
from replay.targets import model_wire as w
from replay.targets.model_link import ModelLink, model_cores

# CPU defaults: transformers sizes the KV cache from "free accelerator memory", which on a CPU
# means most of system RAM; a fixed budget (like vLLM-CPU's VLLM_CPU_KVCACHE_SPACE) is saner.
CPU_KV_CACHE_GIB = 1.0
CPU_MAX_BATCH_TOKENS = 512
# On CPU, transformers' sdpa/eager paths attend through one dense mask over the whole batch, so a
# step costs ~ batch x (sum of context lengths): bounded batches serve more (bench/embedded_profile.py).
CPU_MAX_REQUESTS_PER_BATCH = 32


@dataclass(frozen=True, slots=True)
class TransformersTargetConfig:
    model_dir: str
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: float32 on cpu, bfloat16 (or float16) on cuda
    max_batch_tokens: int | None = None  # None: 512 on cpu, transformers' default elsewhere
    num_blocks: int | None = None  # None: from kv_cache_gib
    kv_cache_gib: float | None = None  # None: 1 GiB on cpu, transformers' memory-based sizing elsewhere
    page_size: int = 64  # tokens per KV page; small pages waste less cache per short request
    max_requests_per_batch: int | None = None  # None: 32 on cpu, transformers' default elsewhere
    attn_implementation: str | None = None  # None: the model's default on cpu, "eager" elsewhere
    prefix_sharing: bool = True  # prefix caching, as vLLM enables by default
    torch_threads: int | None = None  # None: one per core the model process gets
    cores: tuple[int, ...] | None = None  # None: all but the lowest available core (all, on one core)
    warmup_requests: int = 4
    seed: int = 0
    startup_timeout_s: float = 600.0
    name: str = "transformers"


class _Pending:
    """One request in flight: the loop-thread view of its stream."""

    __slots__ = ("record", "future", "seen", "n_input")

    def __init__(self, record: RequestRecord, future: asyncio.Future[None], n_input: int) -> None:
        self.record = record
        self.future = future
        self.seen = 0
        self.n_input = n_input


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """The text model's config.json fields, without transformers (multimodal configs nest them)."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ReplayError(f"{model_dir / 'config.json'}: cannot read: {exc}") from None
    text = cfg.get("text_config")
    return {**cfg, **text} if isinstance(text, dict) else cfg


class TransformersLocalTarget:
    process_local = True  # its serving capacity is one model process: one client worker

    def __init__(self, config: TransformersTargetConfig, log_path: Path | str | None = None) -> None:
        self.config = config
        self.name = config.name
        self.generator_cores: list[int] | None = None  # set by start(): the cores the model leaves free
        self.model_dir = Path(config.model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise ReplayError(f"{self.model_dir}: not a model directory (no config.json)")
        mc = read_model_config(self.model_dir)
        if not isinstance(mc.get("vocab_size"), int):
            raise ReplayError(f"{self.model_dir / 'config.json'}: vocab_size: missing or not an integer")
        self.vocab_size: int = mc["vocab_size"]
        self.max_context: int = int(mc.get("max_position_embeddings") or 0)
        self.log_path = Path(log_path) if log_path else None
        self._link: ModelLink | None = None
        self._closed = False
        self._pending: dict[int, _Pending] = {}
        self._counter = 0
        self._dead: tuple[str, str] | None = None  # (error kind, detail) once the model cannot serve
        self._tokenizer: Any = None
        self.clock_check: dict[str, float] | None = None
        self.warmup_s: float | None = None
        self.load_s: float | None = None

    def pids(self) -> list[int]:
        link = self._link
        return [link.pid] if link is not None and link.pid is not None and link.alive() else []

    @property
    def _info(self) -> dict[str, Any]:
        return self._link.info if self._link is not None else {}

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._link is not None:
            raise ReplayError(f"{self.name}: already started")
        t0 = time.perf_counter()
        cores = model_cores(self.config.cores)
        # The cores left to the generator (the runner pins itself there: the kernel otherwise wakes it on
        # a core the model's threads keep busy, and it waits for a CPU); None on one core.
        self.generator_cores = sorted(set(os.sched_getaffinity(0)) - set(cores)) or None
        threads = self.config.torch_threads or len(cores)
        self._link = ModelLink(self.name, self._on_out, self._on_down, self.log_path)
        cfg = {
            **asdict(self.config),
            "model_dir": str(self.model_dir),
            "cores": cores,
            "torch_threads": threads,
            "cpu_kv_cache_gib": CPU_KV_CACHE_GIB,
            "cpu_max_batch_tokens": CPU_MAX_BATCH_TOKENS,
            "cpu_max_requests_per_batch": CPU_MAX_REQUESTS_PER_BATCH,
        }
        try:
            await self._link.start(cfg, threads, self.config.startup_timeout_s)
            self.log_path = self._link.log_path
            self.load_s = time.perf_counter() - t0
            self.clock_check = await self._link.check_clock()
            t1 = time.perf_counter()
            await self._warm_up()
            self.warmup_s = time.perf_counter() - t1
        except BaseException:
            await self.close()
            raise

    async def backend_stats(self) -> dict[str, Any]:
        """The model process's queues: requests in our backlog, admitted, active and waiting in
        transformers' scheduler, and generation steps so far."""
        if self._link is None:
            raise ReplayError(f"{self.name}: not started")
        return dict(await self._link.rpc(w.STATS))

    async def _warm_up(self) -> None:
        """A few real requests through the real path, so first-call costs stay out of measurements:
        one alone (prefill, then decode), then the rest together (batched prefill and decode)."""
        n = self.config.warmup_requests
        if n <= 0:
            return
        reqs = [
            Request(
                id=-1 - i,
                intended_s=0.0,
                input_tokens=32 + i,
                output_tokens=8,
                prompt_token_ids=[(7 + i + j) % self.vocab_size for j in range(32 + i)],
            )
            for i in range(n)
        ]
        recs = [RequestRecord(id=r.id, intended_s=0.0) for r in reqs]
        await self.send(reqs[0], recs[0])
        await asyncio.gather(*(self.send(r, rec) for r, rec in zip(reqs[1:], recs[1:], strict=True)))
        bad = [rec for rec in recs if rec.status == ERROR]
        if bad:
            raise ReplayError(f"{self.model_dir}: warm-up request failed: {bad[0].error_detail}")

    async def close(self) -> None:
        """Fail what is in flight, then stop the model process (replay.targets.model_link)."""
        if self._link is not None:
            self._closed = True  # from now on send() refuses: nothing could answer it
        self._fail_all(errors.TARGET_ERROR, "target closed while the request was in flight")
        if self._link is not None:
            await self._link.close()

    # ---- from the model process ------------------------------------------------------------

    def _on_out(self, entries: list[list[Any]]) -> None:
        """One generation step's updates (or several that piled up), on the loop thread."""
        pending = self._pending
        for rid, n, t, state, t_end, err in entries:
            p = pending.get(rid)
            if p is None:  # cancelled, or already failed
                continue
            rec = p.record
            if n > p.seen:
                rec.add_chunk(t, n - p.seen)  # the newest token's stamp, taken in the model process
                p.seen = n
            if state == w.STREAMING or p.future.done():
                continue
            if state == w.FINISHED:
                rec.end_s = max(t_end, rec.chunk_s[-1]) if rec.chunk_s else t_end
                rec.usage_input_tokens = p.n_input
                rec.usage_output_tokens = n
                rec.status = OK
            else:
                _fail(rec, errors.TARGET_ERROR, f"backend failed the request: {err}")
            p.future.set_result(None)

    def _on_down(self, how: str, detail: str) -> None:
        """The model process cannot serve any more: fail what is in flight and all later sends."""
        if how == "fatal":
            self._dead = (errors.TARGET_ERROR, f"backend failed: {detail}")
        else:
            self._dead = (errors.TARGET_DIED, detail)
        self._fail_all(*self._dead)

    def _fail_all(self, kind: str, detail: str) -> None:
        for p in list(self._pending.values()):
            if not p.future.done():
                _fail(p.record, kind, detail)
                p.future.set_result(None)

    # ---- requests --------------------------------------------------------------------------

    async def send(self, request: Request, record: RequestRecord) -> None:
        link = self._link
        if link is None or self._closed:
            raise ReplayError("transformers target used before start() or after close()")
        ids = self._prompt_ids(request, record)
        if ids is None:
            return
        if self._dead is not None:
            record.sent_s = record.sent_s or time.perf_counter()
            _fail(record, *self._dead)
            return
        self._counter += 1
        rid = self._counter
        pending = _Pending(record, asyncio.get_running_loop().create_future(), len(ids))
        self._pending[rid] = pending
        try:
            record.sent_s = time.perf_counter()
            link.write([w.ADD, rid, ids, request.output_tokens])
            await pending.future
        except asyncio.CancelledError:
            link.write([w.CANCEL, rid])
            raise
        finally:
            self._pending.pop(rid, None)

    def _prompt_ids(self, request: Request, record: RequestRecord) -> list[int] | None:
        """The exact prompt, or None after failing the record for input the backend must not see
        (a bad id or an over-long request would crash the whole generation loop, not one request)."""
        ids = request.prompt_token_ids
        if ids is None and request.prompt_text is not None:
            ids = self._encode(request.prompt_text, record)
            if ids is None:
                return None
        if not ids:
            _fail(
                record, errors.TARGET_ERROR, "empty prompt (no prompt_token_ids or prompt_text)", stamp=True
            )
            return None
        if request.output_tokens < 1:
            _fail(
                record,
                errors.TARGET_ERROR,
                f"output_tokens must be >= 1, got {request.output_tokens}",
                stamp=True,
            )
            return None
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            detail = f"prompt token id {bad} outside the vocabulary [0, {self.vocab_size})"
            _fail(record, errors.TARGET_ERROR, detail, stamp=True)
            return None
        total = len(ids) + request.output_tokens
        cache = self._info.get("cache_tokens")
        limit = min((x for x in (self.max_context, cache) if x), default=0)
        if limit and total > limit:
            detail = f"input+output {total} tokens exceed the context limit {limit}"
            _fail(record, errors.TARGET_ERROR, detail, stamp=True)
            return None
        return list(ids)

    def _encode(self, text: str, record: RequestRecord) -> list[int] | None:
        if self._tokenizer is None:
            try:
                from tokenizers import Tokenizer

                self._tokenizer = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
            except Exception as exc:  # no or unreadable tokenizer.json: this request fails, not the run
                _fail(
                    record,
                    errors.TARGET_ERROR,
                    f"{self.model_dir}: no tokenizer to encode prompt_text ({exc})",
                )
                return None
        return list(self._tokenizer.encode(text).ids)

    def describe(self) -> dict[str, Any]:
        info = self._info
        out: dict[str, Any] = {
            "kind": "transformers_local",
            "model_dir": str(self.model_dir),
            "process": "separate",
            "pid": info.get("pid"),
            "cores": info.get("cores"),
            "device": info.get("device", self.config.device),
            "dtype": info.get("dtype", self.config.dtype),
            "vocab_size": self.vocab_size,
            "transformers": info.get("transformers"),
            "torch": info.get("torch"),
            "torch_threads": info.get("torch_threads"),
            "config": asdict(self.config),
            "load_s": _r(self.load_s),
            "warmup_s": _r(self.warmup_s),
            "clock_check": self.clock_check,
            "log": str(self.log_path) if self.log_path else None,
        }
        if "batching" in info:
            out["batching"] = info["batching"]
            out["attn_implementation"] = info.get("attn_implementation")
        return out


def _fail(record: RequestRecord, kind: str, detail: str, stamp: bool = True) -> None:
    record.status = ERROR
    record.error = kind
    record.error_detail = detail
    if stamp and record.end_s is None:
        record.end_s = time.perf_counter()


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)
