"""The wire between the transformers target (client) and its model process: length-prefixed orjson frames.

Why hand-written: the stream is one Unix socket pair between two processes of ours, read by the
event loop through a non-blocking protocol; a frame is a 4-byte big-endian length then an orjson
list `[kind, ...]`. multiprocessing.Connection would block the loop on a partial frame; pickle
would let the model process send arbitrary objects. Both sides import only this module, never
each other, so the client never imports torch or transformers.

Client -> model process:
    [CONFIG, {...}]                        once, first: what to load and how
    [ADD, rid, prompt_ids, max_new_tokens]
    [CANCEL, rid]
    [PING, token]                          answered with [PONG, token, perf_counter()]
    [STATS, token]                         answered with [STATS, token, {active, waiting, ...}]
    [FAULT, what]                          fault injection for tests ("step": the next step raises)
    [STOP]
Model process -> client:
    [READY, info]                          loaded, warmed up, accepting
    [FATAL, message]                       cannot load, or the generation loop died
    [OUT, [[rid, n_generated, t_newest, state, t_end, error], ...]]   one frame per generation step
    [PONG, token, t], [STATS, token, {...}]

`t_newest` and `t_end` are the model process's own `time.perf_counter()` stamps: on Linux that is
CLOCK_MONOTONIC, one clock for every process on the host (macOS: mach_absolute_time, also
host-wide), so they compare directly with the client's stamps; the target checks this at start.
"""

from __future__ import annotations

import struct
from typing import Any

import orjson

CONFIG, ADD, CANCEL, PING, STATS, FAULT, STOP = "config", "add", "cancel", "ping", "stats", "fault", "stop"
READY, FATAL, OUT, PONG = "ready", "fatal", "out", "pong"
# Per-request states in an OUT entry.
STREAMING, FINISHED, FAILED = 0, 1, 2

_LEN = struct.Struct(">I")
MAX_FRAME = 1 << 30


def encode(msg: list[Any]) -> bytes:
    body = orjson.dumps(msg)
    return _LEN.pack(len(body)) + body


class FrameReader:
    """Accumulates bytes; `feed()` returns the complete frames decoded, keeping any partial tail."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[list[Any]]:
        buf = self._buf
        buf += data
        out: list[list[Any]] = []
        pos = 0
        n = len(buf)
        while n - pos >= 4:
            (size,) = _LEN.unpack_from(buf, pos)
            if size > MAX_FRAME:
                raise ValueError(f"frame of {size} bytes exceeds {MAX_FRAME}")
            if n - pos - 4 < size:
                break
            out.append(orjson.loads(buf[pos + 4 : pos + 4 + size]))
            pos += 4 + size
        if pos:
            del buf[:pos]
        return out
