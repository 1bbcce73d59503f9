"""The model process of the transformers target: transformers' continuous batching behind a socket.

Why a process of its own: in the generator's process the model competed with the event loop for
the GIL and the cores, and the generator fell behind (dispatch lag p99 5 ms, max 114 ms at
50 req/s). Here it runs alone, pinned to the cores the target gives it, and talks to the target
over one Unix socket (replay.targets.model_wire): requests in, one frame of token updates out per
generation step. Token times are stamped by transformers in this process (`record_timestamps`,
`time.perf_counter()` = CLOCK_MONOTONIC, the host-wide clock the client reads too).

Admission: requests wait in a FIFO of ours and enter transformers' scheduler only while it holds
fewer than `2 x max_requests_per_batch` unfinished ones. Its scheduler walks every waiting request on
every step, so a backlog of thousands (an overloaded run) would slow each step by milliseconds and
make the server's capacity depend on the client's offered rate; vLLM's queue does not behave so.
Time spent in either queue is the same to the client: it all shows in TTFT.

Threads: the main thread reads requests; transformers' generation thread runs the model and
hands each step's outputs to a queue; a sender thread turns queued outputs into frames (merging
steps that piled up while the socket was busy). The process exits when told to stop or when the
socket closes (the client went away); the client also sets PR_SET_PDEATHSIG on it.

    python -m replay.targets.model_process --fd N     (started by TransformersLocalTarget only)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import os
import queue
import socket
import sys
import threading
import time
import traceback
from array import array
from typing import Any

from replay.targets import model_wire as w

WATCHDOG_PERIOD_S = 0.25
# The parts of transformers' continuous batching we rely on (its API moved fast through 5.x).
_MANAGER_API = ("add_request", "cancel_request", "output_router", "warmup", "is_running")


class LoadError(Exception):
    """The model cannot be served; the message goes to the client as one line."""


class ModelServer:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.send_lock = threading.Lock()
        self.outq: queue.SimpleQueue[list[Any] | None] = queue.SimpleQueue()
        self.manager: Any = None
        self.stopping = False
        # Admission (see the module docstring): our FIFO, and how many requests the manager holds.
        self.lock = threading.Lock()
        # Prompts wait as arrays: no Python int objects for the garbage collector to walk.
        self.backlog: collections.OrderedDict[int, tuple[array[int], int]] = collections.OrderedDict()
        self.admitted: set[int] = set()
        self.admit_limit = 64

    # ---- sending ---------------------------------------------------------------------------

    def send(self, msg: list[Any]) -> None:
        data = w.encode(msg)
        # OSError: the client is gone; the reader sees EOF and ends the process.
        with self.send_lock, contextlib.suppress(OSError):
            self.sock.sendall(data)

    def _on_outputs(self, outputs: list[Any]) -> None:
        """Runs on the generation thread, once per step: compact the outputs and queue them, then
        admit as many waiting requests as finished."""
        entries = []
        done = []
        for out in outputs:
            ts = out.timestamps
            t = ts[-1] if ts else time.perf_counter()
            failed = out.error is not None or out.status.name == "FAILED"
            state = w.FAILED if failed else w.FINISHED if out.is_finished() else w.STREAMING
            end = out.lifespan[1] if out.lifespan and out.lifespan[1] > 0 else t
            err = None if out.error is None else str(out.error)[:300]
            rid = int(out.request_id)
            entries.append([rid, len(out.generated_tokens), t, state, end, err])
            if state != w.STREAMING:
                done.append(rid)
        self.outq.put([w.OUT, entries])
        if done:
            with self.lock:
                self.admitted.difference_update(done)
                self._admit()

    def _admit(self) -> None:
        """Move requests from our FIFO into the manager while it holds fewer than admit_limit (lock held)."""
        m = self.manager
        while self.backlog and len(self.admitted) < self.admit_limit:
            rid, (ids, max_new) = self.backlog.popitem(last=False)
            accepted = m.add_request(
                ids.tolist(),
                request_id=str(rid),
                max_new_tokens=max_new,
                streaming=True,
                record_timestamps=True,
                eos_token_id=-1,
            )
            if accepted is None:
                now = time.perf_counter()
                detail = "generation loop is not accepting requests (stopped or crashed)"
                self.outq.put([w.OUT, [[rid, 0, now, w.FAILED, now, detail]]])
            else:
                self.admitted.add(rid)

    def _sender(self) -> None:
        """Frames from the queue; OUT messages that piled up go out as one frame."""
        while True:
            msg = self.outq.get()
            if msg is None:
                return
            while msg[0] == w.OUT:
                try:
                    nxt = self.outq.get_nowait()
                except queue.Empty:
                    break
                if nxt is None or nxt[0] != w.OUT:
                    self.send(msg)
                    msg = nxt
                    if msg is None:
                        return
                    break
                msg[1].extend(nxt[1])
            self.send(msg)

    # ---- loading ---------------------------------------------------------------------------

    def load(self, cfg: dict[str, Any]) -> dict[str, Any]:
        t0 = time.perf_counter()
        cores = cfg.get("cores")
        if cores:
            os.sched_setaffinity(0, set(cores))
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if cfg.get("torch_threads"):
            torch.set_num_threads(int(cfg["torch_threads"]))
        device = cfg["device"]
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = cfg["dtype"]
        if dtype == "auto":
            cuda = device.startswith("cuda")
            dtype = ("bfloat16" if torch.cuda.is_bf16_supported() else "float16") if cuda else "float32"
        kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
        attn = cfg.get("attn_implementation")
        if attn is None and device != "cpu":
            # CB turns "eager" into flash attention when installed, else "paged|eager". Measured on an
            # H100 with the tiny model, sdpa under CB stalled ~80 ms every few steps; paged|eager did not.
            attn = "eager"
        if attn:
            kwargs["attn_implementation"] = attn
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], **kwargs).to(device).eval()
        except (OSError, ValueError, RuntimeError) as exc:
            raise LoadError(f"{cfg['model_dir']}: cannot load model: {exc}") from exc
        cpu = device == "cpu"
        num_blocks = cfg.get("num_blocks")
        gib = cfg.get("kv_cache_gib")
        if gib is None and cpu:
            gib = cfg["cpu_kv_cache_gib"]
        if num_blocks is None and gib is not None:
            per_block = _bytes_per_block(model.config, cfg["page_size"], model.dtype.itemsize)
            num_blocks = max(1, int(gib * 2**30) // per_block)
        pick = lambda key: cfg.get(key) if cfg.get(key) is not None or not cpu else cfg[f"cpu_{key}"]  # noqa: E731
        cb = ContinuousBatchingConfig(
            page_size=cfg["page_size"],
            num_blocks=num_blocks,
            max_batch_tokens=pick("max_batch_tokens"),
            max_requests_per_batch=pick("max_requests_per_batch"),
            allow_block_sharing=cfg["prefix_sharing"],
            max_queue_size=0,  # unbounded: the reader must never block on a full queue
            seed=cfg["seed"],
        )
        # eos_token_id=-1 disables EOS: every request runs to exactly max_new_tokens.
        gen = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=16)
        manager = model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
        missing = [a for a in _MANAGER_API if not hasattr(manager, a)]
        if missing:
            import transformers

            raise LoadError(
                f"transformers {transformers.__version__}: continuous batching lacks {', '.join(missing)}; "
                "the transformers target needs transformers >= 5.19"
            )
        router = manager.output_router
        # Every output of a step arrives in one call, on the generation thread.
        router.deliver_batch = self._on_outputs
        router.deliver = lambda out: self._on_outputs([out])
        manager.warmup()  # builds the paged cache (and graphs on CUDA) before the clock matters
        self.manager = manager
        manager.start()
        scheduler = getattr(manager.batch_processor, "scheduler", None)
        per_batch = getattr(scheduler, "max_requests_per_batch", None)
        self.admit_limit = 2 * int(per_batch or 512)
        import transformers

        resolved = manager.continuous_batching_config
        batching = {
            k: getattr(resolved, k, None)
            for k in ("page_size", "num_blocks", "max_batch_tokens", "max_requests_per_batch",
                      "allow_block_sharing", "use_async_batching", "use_cuda_graph", "scheduler_type")
        }  # fmt: skip
        for k, v in batching.items():
            if isinstance(v, tuple):
                batching[k] = list(v)
        cache_tokens = int(resolved.num_blocks) * int(resolved.page_size) if resolved.num_blocks else None
        return {
            "pid": os.getpid(),
            "device": device,
            "dtype": dtype,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cores": sorted(os.sched_getaffinity(0)),
            "batching": batching,
            "attn_implementation": model.config._attn_implementation,
            "cache_tokens": cache_tokens,
            "load_s": round(time.perf_counter() - t0, 3),
        }

    # ---- requests --------------------------------------------------------------------------

    def handle(self, msg: list[Any]) -> bool:
        """One client message; False when told to stop."""
        kind = msg[0]
        m = self.manager
        if kind == w.ADD:
            with self.lock:
                self.backlog[msg[1]] = (array("l", msg[2]), msg[3])
                self._admit()
        elif kind == w.CANCEL:
            rid = msg[1]
            with self.lock:
                if rid in self.admitted:  # a cancelled request never sends a final output: forget it now
                    self.admitted.discard(rid)
                    m.cancel_request(str(rid))
                    self._admit()
                else:
                    self.backlog.pop(rid, None)
        elif kind == w.PING:
            self.send([w.PONG, msg[1], time.perf_counter()])
        elif kind == w.STATS:
            sched = getattr(getattr(m, "batch_processor", None), "scheduler", None)
            with self.lock:
                stats = {"steps": getattr(m, "current_batch", 0), "backlog": len(self.backlog),
                         "admitted": len(self.admitted)}  # fmt: skip
            if sched is not None:
                stats.update(active=len(sched.active_requests), waiting=len(sched.waiting_requests))
            stats.update(_cuda_memory())
            self.send([w.STATS, msg[1], stats])
        elif kind == w.FAULT and msg[1] == "step":

            def boom() -> None:
                raise RuntimeError("injected kernel failure")

            m._generation_step = boom
        elif kind == w.STOP:
            return False
        return True

    def _watch(self) -> None:
        """If the generation thread dies, say so once (its in-flight requests were failed and delivered)."""
        while not self.stopping:
            time.sleep(WATCHDOG_PERIOD_S)
            m = self.manager
            if m is not None and not self.stopping and not m.is_running():
                fatal = m.background_thread_status.fatal_error
                self.outq.put([w.FATAL, f"generation thread stopped ({fatal!r})"])
                return

    def serve(self) -> int:
        reader = w.FrameReader()
        pending: list[list[Any]] = []
        while not pending:  # the first message is the configuration
            data = self.sock.recv(1 << 16)
            if not data:
                return 0
            pending = reader.feed(data)
        first, rest = pending[0], pending[1:]
        try:
            if first[0] != w.CONFIG:
                raise LoadError(f"expected a {w.CONFIG} message first, got {first[0]!r}")
            info = self.load(first[1])
        except LoadError as exc:
            self.send([w.FATAL, str(exc)])
            return 1
        except Exception as exc:  # any load failure is one line for the client, the traceback in the log
            traceback.print_exc()
            where = first[1].get("model_dir") if isinstance(first[1], dict) else "model"
            self.send([w.FATAL, f"{where}: cannot start the model: {type(exc).__name__}: {exc}"])
            return 1
        # The model, torch's and transformers' objects live as long as the process: out of the
        # collector's way. Measured in 30 s at 200 req/s (thousands waiting): full collections
        # took 146-215 ms walking them (every stream stalled behind each), 0.1-0.8 ms frozen.
        gc.collect()
        gc.freeze()
        sender = threading.Thread(target=self._sender, name="replay-sender", daemon=True)
        sender.start()
        threading.Thread(target=self._watch, name="replay-watchdog", daemon=True).start()
        self.send([w.READY, info])
        try:
            running = all(self.handle(m) for m in rest)
            while running:
                data = self.sock.recv(1 << 16)
                if not data:
                    break
                for m in reader.feed(data):
                    if not self.handle(m):
                        running = False
                        break
        finally:
            self.stopping = True
            if self.manager is not None:
                self.manager.stop(block=True, timeout=10.0, hard_stop=True)
            self.outq.put(None)
            sender.join(timeout=5.0)
        return 0


def _cuda_memory() -> dict[str, Any]:
    """This process's accelerator memory (torch's own accounting), when it has one."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {
        "torch_peak_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
        "torch_reserved_mib": round(torch.cuda.memory_reserved() / 2**20, 1),
        "device_name": torch.cuda.get_device_name(),
    }


def _bytes_per_block(c: Any, page_size: int, itemsize: int) -> int:
    """KV bytes of one block: page_size tokens of keys and values for every layer."""
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return page_size * 2 * c.num_hidden_layers * heads * head_dim * itemsize


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m replay.targets.model_process")
    ap.add_argument("--fd", type=int, required=True, help="the inherited socket to serve on")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sock = socket.socket(fileno=args.fd)
    code = ModelServer(sock).serve()
    sys.stdout.flush()
    sys.stderr.flush()
    sock.close()
    # Skip interpreter teardown: torch's thread pools and the manager's threads can stall it.
    os._exit(code)


if __name__ == "__main__":
    main()
