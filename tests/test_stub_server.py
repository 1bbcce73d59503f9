"""The stub server: vLLM-shaped streams, its schedule, FIFO queueing, truth, faults, HTTP plumbing."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

import aiohttp
import numpy as np
import orjson
import pytest

from replay.core.errors import ReplayError
from replay.stub.server import Fault, StubProcess, start_stub
from replay.stub.truth import parse_fault_rule
from replay.targets.sse import SSEDecoder


async def stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
                 headers: dict[str, str] | None = None) -> tuple[float, list[tuple[float, Any]]]:  # fmt: skip
    """POST and return (send time, [(read time, parsed event)]) with [DONE] as the string."""
    dec = SSEDecoder()
    events: list[tuple[float, Any]] = []
    t0 = time.perf_counter()
    async with session.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        async for data in resp.content.iter_any():
            t = time.perf_counter()
            events += [(t, p if p == "[DONE]" else orjson.loads(p)) for p in dec.feed(data)]
    return t0, events


def body(n: int = 8, chat: bool = False, continuous: bool = True, **kw: Any) -> dict[str, Any]:
    opts = {"include_usage": True, "continuous_usage_stats": continuous}
    b: dict[str, Any] = {"model": "stub-model", "max_tokens": n, "stream": True, "stream_options": opts}
    if chat:
        b["messages"] = [{"role": "user", "content": "a b c"}]
    else:
        b["prompt"] = [1, 2, 3, 4]
    b.update(kw)
    return b


async def test_completion_stream_shape_and_schedule() -> None:
    async with start_stub(ttft_s=0.02, itl_s=0.005, tokens_per_chunk=3, continuous_usage=True) as stub, \
            aiohttp.ClientSession() as s:  # fmt: skip
        _, ev = await stream(s, stub.base_url + "/completions", body(n=8))
        ((t_recv, t_admit, t_first, t_end, tokens, rid),) = stub.truth.requests
    content = [(t, e) for t, e in ev if isinstance(e, dict) and e["choices"]]
    # 8 tokens in chunks of 3: 3, 3, 2; continuous usage counts up; the last has finish_reason.
    assert [e["choices"][0]["text"] for _, e in content] == [" tok" * 3, " tok" * 3, " tok" * 2]
    assert [e["usage"]["completion_tokens"] for _, e in content] == [3, 6, 8]
    assert [e["choices"][0]["finish_reason"] for _, e in content] == [None, None, "length"]
    final = ev[-2][1]
    assert final["choices"] == [] and final["usage"] == {"prompt_tokens": 4, "total_tokens": 12,
                                                         "completion_tokens": 8}  # fmt: skip
    assert ev[-1][1] == "[DONE]"
    assert tokens == 8 and t_admit == t_recv and rid is None  # no id sent
    # Chunk j is due 20 ms + j * 3 * 5 ms after receipt (absolute schedule): never read before it,
    # and (a quiet machine permitting) read within a few ms of it.
    times = [t - t_recv for t, _ in content]
    assert t_first - t_recv >= 0.020
    for got, want in zip(times, [0.020, 0.035, 0.050], strict=True):
        assert want <= got < want + 0.005, times


async def test_chat_stream_shape_and_usage_switches() -> None:
    async with start_stub(continuous_usage=False) as stub, aiohttp.ClientSession() as s:
        _, ev = await stream(s, stub.base_url + "/chat/completions", body(n=2, chat=True))
        deltas = [e["choices"][0]["delta"] for _, e in ev if isinstance(e, dict) and e["choices"]]
        assert deltas == [{"role": "assistant", "content": ""}, {"content": " tok"}, {"content": " tok"}]
        # continuous_usage_stats is not honoured unless the stub is told to; include_usage is.
        assert [("usage" in e) for _, e in ev[:-1]] == [False, False, False, True]
        assert ev[-2][1]["usage"]["prompt_tokens"] == 3  # words
        _, ev = await stream(s, stub.base_url + "/chat/completions", body(n=2, chat=True, stream_options={}))
        assert all("usage" not in e for _, e in ev[:-1])


async def test_queueing_under_max_concurrency_is_fifo_and_known() -> None:
    """C=2, six requests at once, 10 tokens (service 20 + 9*5 = 65 ms): served TTFT from receipt is
    20, 20, 85, 85, 150, 150 ms, the queueing part being exactly the earlier requests' service times."""
    async with start_stub(ttft_s=0.02, itl_s=0.005, max_concurrency=2) as stub, aiohttp.ClientSession() as s:
        res = await asyncio.gather(*[stream(s, stub.base_url + "/completions", body(n=10)) for _ in range(6)])
        truth = stub.truth.summary(detail=True)
    assert truth["served"] == 6 and truth["queue_ms"]["count"] == 6
    reqs = sorted(truth["requests"], key=lambda r: r[1])  # by admission
    for _, admit, first, _, _, _ in reqs:
        assert 0.020 <= first - admit < 0.025  # the schedule starts at admission
    served_ttft = [first - recv for recv, _, first, _, _, _ in reqs]
    for got, want in zip(served_ttft, [0.020, 0.020, 0.085, 0.085, 0.150, 0.150], strict=True):
        assert abs(got - want) < 0.005, served_ttft  # receipts differ by a little
    # A queued request is admitted when an earlier one writes its last token (FIFO, no gap).
    ends = sorted(end for _, _, _, end, _, _ in reqs)
    for (_, admit, _, _, _, _), end in zip(reqs[2:], ends, strict=False):
        assert 0 <= admit - end < 0.002
    # The client sees at least what was served (it sent before receipt, reads after writing).
    client = sorted(ev[0][0] - t0 for t0, ev in res)
    assert all(c >= s for c, s in zip(client, sorted(served_ttft), strict=True))


async def test_ttft_jitter_is_seeded_exponential() -> None:
    """--ttft-jitter-ms: each first token comes an exponential draw (mean 30 ms) later, the same
    draws for the same seed. 60 streams one after another: the served TTFT minus the 20 ms base
    has a mean within 40% of 30 ms (3 standard errors of a mean of 60 draws), and the sequence
    repeats with the seed (give or take timer noise) and not with another."""

    async def served(seed: int) -> np.ndarray:
        async with start_stub(ttft_s=0.02, itl_s=0.001, ttft_jitter_s=0.03, seed=seed) as stub, \
                aiohttp.ClientSession() as s:  # fmt: skip
            for _ in range(60):
                await stream(s, stub.base_url + "/completions", body(n=1))
            async with s.get(f"http://127.0.0.1:{stub.port}/stub/truth?detail=1") as r:
                rows = (await r.json())["requests"]
        return np.array([row[2] - row[1] for row in rows]) - 0.02  # first token - admission - base

    a, b, c = await served(1), await served(1), await served(2)
    assert len(a) == 60 and a.min() > -0.001 and 0.018 <= a.mean() <= 0.042
    assert np.median(np.abs(a - b)) < 0.002  # same seed, same draws
    assert np.median(np.abs(a - c)) > 0.005  # another seed, other draws (typically ~20 ms apart)


async def test_truth_endpoint_and_reset() -> None:
    async with start_stub(ttft_s=0.01, itl_s=0.002) as stub, aiohttp.ClientSession() as s:
        for _ in range(3):
            await stream(s, stub.base_url + "/completions", body(n=5))
        async with s.get(f"http://127.0.0.1:{stub.port}/stub/truth") as r:
            truth = await r.json()
        assert truth["served"] == 3 and truth["count"] == 3 and truth["tokens"] == 15
        assert truth["itl_ms"]["count"] == 12 and 1.9 <= truth["itl_ms"]["p50"] < 3.0
        assert 9.9 <= truth["ttft_ms"]["p50"] < 12.0
        assert truth["late_ms"]["count"] == 15 and truth["hdr"]["ttft"].startswith("HISTF")
        async with s.post(f"http://127.0.0.1:{stub.port}/stub/reset") as r:
            assert r.status == 200
        async with s.get(f"http://127.0.0.1:{stub.port}/stub/truth") as r:
            truth = await r.json()
        assert truth["served"] == 0 and truth["ttft_ms"]["p50"] is None


async def test_truth_detail_carries_the_clients_request_id() -> None:
    """vLLM's `request_id` body field or the X-Request-Id header, kept per request (None without)."""
    async with start_stub(ttft_s=0.001, itl_s=0.001) as stub, aiohttp.ClientSession() as s:
        url = stub.base_url + "/completions"
        await stream(s, url, body(n=2, request_id="r-7"))
        await stream(s, url, body(n=3), headers={"x-request-id": "h-9"})
        await stream(s, url, body(n=4))
        async with s.post(url, json={"prompt": "a", "max_tokens": 2, "request_id": 5}) as r:
            assert r.status == 200  # not streamed
        async with s.get(f"http://127.0.0.1:{stub.port}/stub/truth?detail=1") as r:
            rows = (await r.json())["requests"]
    assert [(row[4], row[5]) for row in rows] == [(2, "r-7"), (3, "h-9"), (4, None), (2, "5")]


async def test_routes_and_errors() -> None:
    async with start_stub(vllm=False) as stub, aiohttp.ClientSession() as s:
        root = f"http://127.0.0.1:{stub.port}"
        async with s.get(root + "/v1/models") as r:
            models = await r.json()
        assert models["data"][0]["id"] == "stub-model" and models["data"][0]["owned_by"] == "stub"
        for path, status in [("/health", 200), ("/version", 404), ("/nope", 404), ("/metrics", 200)]:
            async with s.get(root + path) as r:
                assert r.status == status, path
        async with s.post(root + "/v1/completions", data=b"{not json") as r:
            assert r.status == 400
        async with s.post(root + "/v1/completions", json=body(model="other")) as r:
            assert r.status == 404 and "does not exist" in (await r.json())["message"]
        async with s.post(root + "/v1/completions", json={"prompt": "a b", "max_tokens": 3}) as r:
            whole = await r.json()  # not streamed: one JSON body after the whole schedule
        assert whole["choices"][0]["text"] == " tok" * 3 and whole["usage"]["completion_tokens"] == 3
        async with s.post(root + "/v1/completions", json=body(), headers={"x-stub-fault": "http_503"}) as r:
            assert r.status == 503
    async with start_stub(vllm=True) as stub, aiohttp.ClientSession() as s, \
            s.get(f"http://127.0.0.1:{stub.port}/version") as r:  # fmt: skip
        assert (await r.json())["version"]


async def test_keep_alive_and_pipelining_on_one_connection() -> None:
    async with start_stub(ttft_s=0.001, itl_s=0.001) as stub:
        reader, writer = await asyncio.open_connection("127.0.0.1", stub.port)
        payload = orjson.dumps(body(n=2))
        one = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))  # fmt: skip
        writer.write(one + one + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)  # until the server closes after the third
        writer.close()
    assert data.count(b"HTTP/1.1 200 OK") == 3 and data.count(b"data: [DONE]") == 2
    assert stub.truth.served == 2


async def test_client_disconnect_frees_the_slot() -> None:
    async with start_stub(ttft_s=0.01, itl_s=0.05, max_concurrency=1) as stub, aiohttp.ClientSession() as s:
        resp = await s.post(stub.base_url + "/completions", json=body(n=100))
        await resp.content.readany()
        resp.close()  # walk away mid-stream
        t0, ev = await asyncio.wait_for(stream(s, stub.base_url + "/completions", body(n=2)), 2)
        assert ev[0][0] - t0 < 0.05  # admitted at once, not after the abandoned stream's 5 s
        assert stub.truth.disconnected == 1


@pytest.mark.parametrize(
    ("spec", "fault"),
    [("http_500", Fault("http", status=500)), ("reset@3", Fault("reset", 3)), ("truncate", Fault("truncate")),
     ("malformed@0", Fault("malformed")), ("stall@2:1.5", Fault("stall", 2, stall_s=1.5))],
)  # fmt: skip
def test_fault_specs(spec: str, fault: Fault) -> None:
    assert Fault.parse(spec) == fault


def test_bad_fault_specs() -> None:
    for bad in ["boom", "stall@2", "http_5000", "reset@x"]:
        with pytest.raises(ReplayError, match="fault"):
            Fault.parse(bad)
    assert parse_fault_rule("stall@2:1.5:0.25") == (Fault("stall", 2, stall_s=1.5), 0.25)
    with pytest.raises(ReplayError, match="probability"):
        parse_fault_rule("reset@2:1.5")


def test_cli_process_serves_and_stops() -> None:
    with StubProcess(["--ttft-ms", "5", "--itl-ms", "1", "--vllm"]) as p:

        async def go() -> dict[str, Any]:
            async with aiohttp.ClientSession() as s:
                _, ev = await stream(s, p.base_url + "/completions", body(n=4))
                assert ev[-1][1] == "[DONE]"
                async with s.get(f"http://127.0.0.1:{p.port}/stub/truth") as r:
                    return await r.json()

        truth = asyncio.run(go())
        assert truth["served"] == 1 and truth["tokens"] == 4
        proc = p.proc
    assert proc is not None and proc.returncode == 0
    bad = subprocess.run([sys.executable, "-m", "replay.stub.server", "--fault", "boom:0.1"],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.startswith("error: fault: bad spec")
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("chat", [False, True])
async def test_burst_writes_every_event_at_once(chat: bool) -> None:
    """ITL 0 (burst): the same events as chunk-by-chunk emission, in one write, and the truth counts
    each chunk (ITL samples of 0 after the first)."""
    async with start_stub(ttft_s=0.01, itl_s=0.0, tokens_per_chunk=3, continuous_usage=True) as stub, \
            aiohttp.ClientSession() as s:  # fmt: skip
        t0, ev = await stream(s, stub.base_url + ("/chat/completions" if chat else "/completions"),
                              body(n=8, chat=chat))  # fmt: skip
        truth = stub.truth
        ((t_recv, _, t_first, t_end, tokens, _),) = truth.requests
    content = [e for _, e in ev if isinstance(e, dict) and e["choices"]]
    if chat:
        assert content[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        content = content[1:]
        texts = [e["choices"][0]["delta"]["content"] for e in content]
    else:
        texts = [e["choices"][0]["text"] for e in content]
    assert texts == [" tok" * 3, " tok" * 3, " tok" * 2]
    assert [e["usage"]["completion_tokens"] for e in content] == [3, 6, 8]
    assert [e["choices"][0]["finish_reason"] for e in content] == [None, None, "length"]
    assert ev[-2][1]["usage"]["completion_tokens"] == 8 and ev[-1][1] == "[DONE]"
    assert tokens == 8 and t_first == t_end and t_first - t_recv >= 0.01
    assert truth.chunks == 3 and truth.tokens == 8
    assert truth.itl.get_total_count() == 7 and truth.itl.get_max_value() == 0  # 3+3+2 tokens: 7 gaps of 0
