"""Process-tree telemetry against processes whose use is known: a child holding 300 MiB resident,
one spinning a core, one asleep; and summarize_series on a hand-made series."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from replay.stats.telemetry import ProcessTreeSampler, summarize_series

pytestmark = pytest.mark.timeout(60)

MIB = 1024 * 1024
HOLD = "import sys, time; b = bytearray(300 * 1024 * 1024); b[::4096] = b'x' * len(b[::4096]); " \
       "print('ready', flush=True); time.sleep(60)"  # fmt: skip
SPIN = "import time; print('ready', flush=True); t = time.time() + 60\nwhile time.time() < t: pass"
SLEEP = "import time; print('ready', flush=True); time.sleep(60)"


def _spawn(code: str) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


def test_rss_sums_the_tree_and_cpu_follows_load() -> None:
    hold, spin, idle = _spawn(HOLD), _spawn(SPIN), _spawn(SLEEP)
    try:
        base = {p.pid: psutil.Process(p.pid).memory_info().rss for p in (hold, spin, idle)}
        s = ProcessTreeSampler(lambda: [hold.pid, spin.pid, idle.pid], gpu=False)
        first = s.sample()
        assert "cpu_pct" not in first  # no interval yet: absent, not 0
        assert first["num_procs"] == 3
        assert first["rss_bytes"] == pytest.approx(sum(base.values()), rel=0.05)
        assert first["rss_bytes"] >= 300 * MIB
        time.sleep(1.0)
        busy = s.sample()["cpu_pct"]
        # One spinning process is one core: 100 %, less whatever the 2-core box gives to others.
        assert 50.0 <= busy <= 115.0

        only_idle = ProcessTreeSampler(lambda: [idle.pid], gpu=False)
        only_idle.sample()
        time.sleep(0.5)
        assert only_idle.sample()["cpu_pct"] < 5.0

        spin.kill()
        spin.wait()
        gone = s.sample()  # a dead pid is skipped, never an error
        assert gone["num_procs"] == 2
    finally:
        for p in (hold, spin, idle):
            p.kill()
            p.wait()


def test_sample_is_cheap() -> None:
    s = ProcessTreeSampler(lambda: [psutil.Process().pid], gpu=False)
    t0 = time.perf_counter()
    for _ in range(100):
        s.sample()
    assert (time.perf_counter() - t0) / 100 < 0.005


def test_summarize_series() -> None:
    rows = [
        {"t_s": 0.0, "running": 1, "kv_cache_usage": 0.2, "generation_tokens_total": 100.0},
        {"t_s": 1.0, "running": 3, "kv_cache_usage": 0.6, "generation_tokens_total": 160.0},
        {"t_s": 2.0, "running": 2, "generation_tokens_total": 250.0, "note": "x", "flag": True},
    ]
    out = summarize_series(rows)
    assert set(out) == {"running", "kv_cache_usage", "generation_tokens_total"}
    assert out["running"] == {"peak": 3.0, "mean": 2.0, "samples": 3.0}
    assert out["kv_cache_usage"]["peak"] == 0.6 and out["kv_cache_usage"]["mean"] == pytest.approx(0.4)
    assert out["kv_cache_usage"]["samples"] == 2.0  # missing in a row: not counted as 0
    assert out["generation_tokens_total"]["delta"] == 150.0
    assert summarize_series([]) == {}
