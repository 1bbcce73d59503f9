"""Issue-4 benchmark: what `replay record` adds to the latency clients see, under load.

    PYTHONPATH=. python bench/record_proxy_bench.py [--rates 10,50,100] [--seconds 10] [--tokens 64]

One stub server (first token 20 ms after the request, one token every 5 ms, one per SSE event).
For each Poisson rate, the same seeded schedule is replayed twice: straight at the stub and through
the recording proxy. Reported: TTFT and ITL p50/p99 both ways and their difference (the added
latency a client sees: the extra hop and the proxy's work), the proxy's own per-chunk figure
(body piece read from the stub -> handed to the client's socket), its CPU, and whether the trace
got every request. Writes bench/results-record-proxy.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _replay_run(url: str, rate: float, a: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = [PY, "-m", "replay", "run", "--target", url, "--rate", f"{rate:g}", "--duration", str(a.seconds),
           "--input-tokens", "64", "--output-tokens", str(a.tokens), "--seed", "7", "--out", str(out),
           "--quiet"]  # fmt: skip
    subprocess.run(cmd, env=ENV, capture_output=True, timeout=a.seconds + 120, check=True)
    s = json.loads((out / "summary.json").read_text())
    m = s["metrics"]
    return {
        "ok": s["counts"]["ok"],
        "ttft_p50": m["ttft"]["p50"],
        "ttft_p99": m["ttft"]["p99"],
        "itl_p50": m["itl"]["p50"],
        "itl_p99": m["itl"]["p99"],
        "trustworthy": s["selfcheck"]["trustworthy"],
    }


def _one_rate(stub_url: str, rate: float, a: argparse.Namespace, d: Path) -> dict[str, Any]:
    direct = _replay_run(stub_url, rate, a, d / f"direct-{rate:g}")
    trace = d / f"trace-{rate:g}.jsonl"
    proxy = subprocess.Popen(
        [PY, "-m", "replay", "record", "--upstream", stub_url, "--listen", "127.0.0.1:0", "--out", str(trace)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    assert proxy.stdout is not None
    m = re.search(r"listening on (\S+),", proxy.stdout.readline())
    assert m, proxy.stderr.read() if proxy.stderr else ""
    ps = psutil.Process(proxy.pid)
    t0, c0 = time.perf_counter(), sum(ps.cpu_times()[:2])
    via = _replay_run(m.group(1), rate, a, d / f"via-{rate:g}")
    cpu = (sum(ps.cpu_times()[:2]) - c0) / (time.perf_counter() - t0) * 100
    proxy.send_signal(signal.SIGINT)
    proxy.communicate(timeout=60)
    stats = json.loads(Path(str(trace) + ".proxy.json").read_text())
    lat = stats["added_latency_ms"]
    return {
        "rate": rate,
        "direct": direct,
        "via_proxy": via,
        "added_ttft_p50_ms": round(via["ttft_p50"] - direct["ttft_p50"], 3),
        "added_ttft_p99_ms": round(via["ttft_p99"] - direct["ttft_p99"], 3),
        "added_itl_p99_ms": round(via["itl_p99"] - direct["itl_p99"], 3),
        "proxy_first_chunk_ms": {k: lat["first_chunk"][k] for k in ("p50", "p99", "max")},
        "proxy_chunk_ms": {k: lat["chunk"][k] for k in ("p50", "p99", "max", "count")},
        "proxy_cpu_percent": round(cpu, 1),
        "recorded": stats["recorded"],
    }


def _ok(trusted: bool) -> str:
    return "ok" if trusted else "FELL BEHIND"


def _md(res: dict[str, Any]) -> str:
    out = [
        "# replay record: added latency under load",
        "",
        f"{res['host']}; stub TTFT 20 ms, ITL 5 ms; 64 in / {res['tokens']} out tokens; "
        f"{res['seconds']} s Poisson per rate; same seeded schedule direct and through the proxy. "
        "A row whose client self-check fell behind measured the host, not the proxy.",
        "",
        "| req/s | TTFT p50 direct / via (ms) | TTFT p99 direct / via | added TTFT p50 / p99 | ITL p99 direct / via "
        "| proxy per-chunk p50 / p99 / max | proxy CPU | recorded / ok | client self-check direct / via |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rates"]:
        d, v, c = r["direct"], r["via_proxy"], r["proxy_chunk_ms"]
        out.append(
            f"| {r['rate']:g} | {d['ttft_p50']:.2f} / {v['ttft_p50']:.2f} | {d['ttft_p99']:.2f} / {v['ttft_p99']:.2f} "
            f"| {r['added_ttft_p50_ms']:+.2f} / {r['added_ttft_p99_ms']:+.2f} "
            f"| {d['itl_p99']:.2f} / {v['itl_p99']:.2f} | {c['p50']:.3f} / {c['p99']:.3f} / {c['max']:.3f} "
            f"| {r['proxy_cpu_percent']:.0f}% | {r['recorded']} / {v['ok']} "
            f"| {_ok(d['trustworthy'])} / {_ok(v['trustworthy'])} |"
        )
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rates", default="10,50,100")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "bench")
    a = ap.parse_args()
    stub = subprocess.Popen([PY, "-m", "replay.stub.server", "--port", "0", "--ttft-ms", "20", "--itl-ms", "5"],
                            stdout=subprocess.PIPE, env=ENV)  # fmt: skip
    try:
        assert stub.stdout is not None
        url = f"http://127.0.0.1:{json.loads(stub.stdout.readline())['port']}"
        with tempfile.TemporaryDirectory() as tmp:
            rates = [_one_rate(url, float(r), a, Path(tmp)) for r in a.rates.split(",")]
    finally:
        stub.terminate()
        stub.wait(10)
    res = {
        "host": f"{platform.node()}, {psutil.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}",
        "tokens": a.tokens,
        "seconds": a.seconds,
        "rates": rates,
    }
    (a.out / "results-record-proxy.json").write_text(json.dumps(res, indent=2) + "\n")
    (a.out / "results-record-proxy.md").write_text(_md(res))
    print(_md(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
