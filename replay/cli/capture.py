"""`replay record`: arguments -> ProxyConfig, run the proxy until Ctrl-C/SIGTERM, report. Mounted by
replay/cli/main.py with `add_record_subparser(subparsers)`."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from replay.capture.proxy import ProxyConfig, RecordProxy


def add_record_subparser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "record",
        help="proxy an OpenAI-compatible server and write the traffic it sees as a trace",
        description="A reverse proxy that streams responses through unchanged and appends one trace "
        "record (our JSONL) per completions/chat request. Ctrl-C stops it, leaving a valid trace.",
    )
    p.add_argument("--upstream", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--listen", default="127.0.0.1:8081", help="HOST:PORT to listen on (default loopback)")
    p.add_argument("--out", type=Path, required=True, help="trace file to write (our JSONL)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --listen address")
    p.add_argument("--keep-prompts", action="store_true", help="store prompts (token ids or text) too")
    p.add_argument("--block-size", type=int, default=16, help="tokens per prefix hash block (default 16)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or HF model dir: hash text prompts too")
    p.add_argument(
        "--no-inject-usage",
        dest="inject_usage",
        action="store_false",
        help="never alter a request: streams without usage get output tokens counted per event",
    )
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to let requests finish on stop")
    p.add_argument("--stats", type=Path, default=None, help="sidecar JSON (default OUT.proxy.json)")
    p.set_defaults(func=cmd_record)
    return p


def cmd_record(ns: argparse.Namespace) -> int:
    from replay.capture.proxy import ProxyConfig, parse_listen

    host, port = parse_listen(ns.listen)
    cfg = ProxyConfig(
        upstream=ns.upstream,
        out=ns.out,
        host=host,
        port=port,
        allow_remote=ns.allow_remote,
        keep_prompts=ns.keep_prompts,
        block_size=ns.block_size,
        tokenizer=ns.tokenizer,
        inject_usage=ns.inject_usage,
        drain_timeout_s=ns.drain_timeout,
    )
    encoder = None
    if ns.tokenizer:
        from replay.capture.to_trace import load_encoder

        encoder = load_encoder(ns.tokenizer)
    import uvloop

    proxy = uvloop.run(_main(cfg, encoder))
    stats = proxy.stats()
    stats_path = ns.stats or ns.out.with_name(ns.out.name + ".proxy.json")
    stats_path.write_bytes(orjson.dumps(stats, option=orjson.OPT_INDENT_2))
    lat = stats["added_latency_ms"]
    print(
        f"replay record: {stats['recorded']} requests recorded to {ns.out}"
        f" ({stats['incomplete_at_exit']} still in flight at exit, left out); added latency"
        f" first chunk p50 {_ms(lat['first_chunk']['p50'])} p99 {_ms(lat['first_chunk']['p99'])},"
        f" every chunk p99 {_ms(lat['chunk']['p99'])}; stats in {stats_path}",
        flush=True,
    )
    return 0


def _ms(v: Any) -> str:
    return "-" if v is None else f"{v:.3f} ms"


async def _main(cfg: ProxyConfig, encoder: Any) -> RecordProxy:
    from replay.capture.proxy import serve

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def ready(proxy: RecordProxy) -> None:
        print(
            f"replay record: listening on {proxy.url}, forwarding to {proxy.upstream}, "
            f"writing {cfg.out} (Ctrl-C to stop)",
            flush=True,
        )

    try:
        return await serve(cfg, stop, encoder, on_ready=ready)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
