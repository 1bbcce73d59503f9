"""A burst of large prompts leaves together (issue 10, item 3): prompts and request bodies are made
ahead of their send time, so at a burst's instant the client only writes, and each body's first bytes
go at once (the rest on the next loop turn), as many users' uploads would share the link.

Truth from another process: the stub server records when the first bytes of each request arrived
(GET /stub/truth?detail=1, `first_byte`, on the host's monotonic clock). The trace (Mooncake format)
puts every request of a burst on the same millisecond, so within a burst those arrivals may differ
only by what the client does between its sends. The statistic is the tightest span holding `SIZE`
consecutive arrivals (one burst: the bursts are 1.2 s apart), so the cleanest of the five bursts
decides: a burst the busy machine delayed does not, while a client that builds prompts between its
sends cannot go below the CPU time of those builds however quiet the machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import orjson
import pytest

from replay.stub.server import StubProcess
from replay.stub.stream import parse_request
from replay.targets.http_stream import FIRST_WRITE, UPLOAD_BUDGET, Conn, Uploads

ROOT = Path(__file__).resolve().parents[1]
BURSTS, SIZE, GAP_S, BLOCK = 5, 20, 1.2, 512
# Tightest burst, measured on the shared 2-core machine at load averages 5.5-7: 0.5-1.0 ms (6 runs);
# with prompts and bodies built on the loop at send time (the code before the look-ahead) 25-76 ms
# (7 runs); with the look-ahead but each body written whole in its send, 7-20 ms (3 runs).
SPREAD_MAX_MS = 10.0


def write_trace(path: Path) -> list[int]:
    rng = np.random.default_rng(3)
    lengths = []
    with path.open("w") as fh:
        for b in range(BURSTS):
            for j in range(SIZE):
                n = int(rng.integers(60_000, 120_001))
                blocks = -(-n // BLOCK)
                # A shared 4-block prefix, then the session's own chain (re-sent by its next turns).
                ids = ([0, 1, 2, 3] + list(range(1000 * (j + 1), 1000 * (j + 1) + blocks)))[:blocks]
                row = {
                    "timestamp": int(b * GAP_S * 1000),
                    "input_length": n,
                    "output_length": 4,
                    "hash_ids": ids,
                }
                fh.write(json.dumps(row) + "\n")
                lengths.append(n)
    return lengths


def test_burst_of_large_prompts_arrives_together(tmp_path):
    trace = tmp_path / "burst.jsonl"
    lengths = write_trace(trace)
    out = tmp_path / "run"
    with StubProcess(["--ttft-ms", "20", "--itl-ms", "5", "--vllm", "--continuous-usage"]) as stub:
        cmd = [sys.executable, "-m", "replay", "run", "--target", stub.base_url, "--trace", str(trace),
               "--format", "mooncake", "--workers", "1", "--interval", "1h", "--quiet",
               "--out", str(out)]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode in (0, 1), r.stderr[-2000:]  # 1: the self-check's verdict on a busy machine
        with urllib.request.urlopen(stub.base_url.removesuffix("/v1") + "/stub/truth?detail=1") as resp:
            truth = json.loads(resp.read())
    s = json.loads((out / "summary.json").read_text())
    assert s["counts"]["scheduled"] == s["counts"]["ok"] == BURSTS * SIZE == truth["served"]
    # Every prompt reached the server whole: the stub's count of its ids is the trace's length.
    lines = (out / "requests.jsonl").read_text().splitlines()
    assert [x["input_tokens"] for x in sorted(map(json.loads, lines), key=lambda x: x["id"])] == lengths

    first_bytes = np.sort(truth["first_byte"])
    tightest_ms = float(np.min(first_bytes[SIZE - 1 :] - first_bytes[: 1 - SIZE])) * 1e3
    assert tightest_ms < SPREAD_MAX_MS, tightest_ms


def test_the_stub_counts_a_large_id_prompt_without_parsing_it_and_parses_anything_else():
    ids = list(range(256, 120_256))
    req, n = parse_request(orjson.dumps({"model": "m", "max_tokens": 4, "prompt": ids}), chat=False)
    assert n == 120_000 and req == {"model": "m", "max_tokens": 4, "prompt": []}
    # Checking a vocabulary needs the ids: then they are parsed.
    req, n = parse_request(orjson.dumps({"prompt": ids}), chat=False, count_only=False)
    assert n == 120_000 and req["prompt"] == ids
    # Not the compact form, or not the top-level prompt: the full parse decides, as before.
    spaced = b'{"prompt": [' + b", ".join(b"%d" % i for i in ids) + b"]}"
    assert parse_request(spaced, chat=False)[1] == 120_000
    nested = orjson.dumps({"x": {"prompt": ids}, "prompt": [1, 2]})
    assert parse_request(nested, chat=False)[1] == 2
    for bad in (b'{"prompt":[' + b"1," * 20_000 + b"]}", b'{"prompt":[' + b"1,,2" * 20_000 + b"]}",
                b'{"prompt":[' + b"1.5," * 20_000 + b"1]}"):  # fmt: skip
        with pytest.raises(ValueError):
            parse_request(bad, chat=False)


class RecordingTransport:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def writelines(self, parts: list[bytes]) -> None:
        for p in parts:
            self.data += p

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str) -> None:
        return None

    def close(self) -> None:
        pass


async def test_large_bodies_start_at_once_then_go_out_in_bounded_turns():
    uploads = Uploads()
    conns = [Conn(lambda c: None, uploads) for _ in range(3)]
    wire = [RecordingTransport() for _ in conns]
    bodies = [bytes([65 + i]) * 300_000 for i in range(3)] + [b"{}"]
    for c, t in zip(conns, wire, strict=False):
        c.connection_made(t)  # type: ignore[arg-type]
    for c, b in zip(conns, bodies, strict=False):
        c.request(b"HEAD\r\n\r\n", b, None)  # type: ignore[arg-type]
    # At the send: every request's head and first bytes, nothing more.
    assert [bytes(t.data) for t in wire] == [b"HEAD\r\n\r\n" + b[:FIRST_WRITE] for b in bodies[:3]]
    assert all(c.uploading and not c.reusable for c in conns)
    turns = 0
    while any(c.uploading for c in conns):
        before = sum(len(t.data) for t in wire)
        await asyncio.sleep(0)  # one loop turn
        turns += 1
        assert sum(len(t.data) for t in wire) - before <= UPLOAD_BUDGET
    assert [bytes(t.data) for t in wire] == [b"HEAD\r\n\r\n" + b for b in bodies[:3]]  # whole, in order
    assert turns >= 3 * (300_000 - FIRST_WRITE) // UPLOAD_BUDGET
