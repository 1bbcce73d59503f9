"""`replay run` as users run it: a real process against the stub server, bad input, SIGINT."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from replay.stats import histogram as H
from replay.stub.server import StubProcess

ROOT = Path(__file__).resolve().parents[1]


def replay(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "replay", *args], capture_output=True, text=True, env=env, timeout=120, **kw
    )


@pytest.fixture(scope="module")
def stub():
    with StubProcess(["--ttft-ms", "20", "--itl-ms", "5", "--vllm", "--continuous-usage"]) as p:
        yield p


def read_hlog(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        if line.startswith("Tag="):
            tag, *_, enc = line.split(",")
            counts[tag[4:]] = counts.get(tag[4:], 0) + H.decode(enc).get_total_count()
    return counts


def test_run_writes_a_consistent_run_directory(stub, tmp_path):
    out = tmp_path / "run"
    r = replay("run", "--target", stub.base_url, "--rate", "40", "--duration", "3", "--output-tokens", "16",
               "--interval", "1s", "--out", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    # The verdict itself depends on how busy the machine is; that it is stated does not.
    assert "self-check: " in r.stdout and f"run directory: {out}" in r.stdout
    s = json.loads((out / "summary.json").read_text())
    c = s["counts"]
    assert c["accounted"] and c["scheduled"] == c["ok"] > 60
    lines = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    assert len(lines) == c["scheduled"] and sorted(x["id"] for x in lines) == list(range(c["scheduled"]))
    assert all(x["output_tokens"] == 16 and x["status"] == "ok" for x in lines)
    assert s["tokens"]["output"] == 16 * c["ok"]
    # TTFT truth is 20 ms (the stub's schedule); ITL 5 ms.
    assert abs(s["metrics"]["ttft"]["p50"] - 20) < 2 and abs(s["metrics"]["itl"]["p50"] - 5) < 1
    # Whole-run histograms are the sum of the interval log's histograms.
    hl = read_hlog(out / "intervals.hlog")
    assert hl["ttft"] == s["metrics"]["ttft"]["count"] == c["ok"]
    assert hl["itl"] == s["metrics"]["itl"]["count"] == 15 * c["ok"]
    ts = [json.loads(x) for x in (out / "timeseries.jsonl").read_text().splitlines()]
    assert sum(row["scheduled"] for row in ts) == c["scheduled"]
    # The stub in --vllm mode exposes vLLM-style /metrics: the sidecar scraped them every second.
    server = [json.loads(x) for x in (out / "server_metrics.jsonl").read_text().splitlines()]
    assert len(server) >= 3 and s["server"]["running"]["peak"] >= 1
    assert s["server"]["generation_tokens_total"]["delta"] > 0


class _Html(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's naming
        body = b"<html><body>hello</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def html_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Html)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "case",
    [
        "unknown_target",
        "zero_rate",
        "negative_rate",
        "unreachable",
        "not_openai",
        "bad_duration",
        "bad_trace",
    ],  # fmt: skip
)
def test_bad_input_is_one_clear_line(case, stub, html_server, tmp_path):
    args = {
        "unknown_target": ["--target", "nosuch", "--rate", "5"],
        "zero_rate": ["--target", stub.base_url, "--rate", "0"],
        "negative_rate": ["--target", stub.base_url, "--rate", "-3"],
        "unreachable": ["--target", f"http://127.0.0.1:{_free_port()}", "--rate", "5", "--duration", "1"],
        "not_openai": ["--target", html_server, "--rate", "5", "--duration", "1"],
        "bad_duration": ["--target", stub.base_url, "--rate", "5", "--duration", "5 parsecs"],
        "bad_trace": ["--target", stub.base_url, "--trace", str(tmp_path / "missing.csv")],
    }[case]
    r = replay("run", *args, "--out", str(tmp_path / "o"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr
    assert len(err) == 1 or case == "bad_duration"  # argparse prints usage + one error line
    expect = {
        "unknown_target": "unknown target 'nosuch'",
        "zero_rate": "--rate",
        "negative_rate": "--rate",
        "unreachable": "connection refused",
        "not_openai": "not an OpenAI-compatible server",
        "bad_duration": "bad duration",
        "bad_trace": "missing.csv",
    }[case]
    assert expect in r.stderr


def test_sigint_leaves_a_valid_partial_run(stub, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen(
        [sys.executable, "-m", "replay", "run", "--target", stub.base_url, "--rate", "30", "--duration", "30",
         "--output-tokens", "64", "--interval", "1s", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not (out / "timeseries.jsonl").exists() or (out / "timeseries.jsonl").stat().st_size == 0:
        assert time.monotonic() < deadline, "run never got going"
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stderr
    assert "PARTIAL RUN" in stdout
    s = json.loads((out / "summary.json").read_text())
    c = s["counts"]
    assert s["partial"] is True and c["accounted"]
    assert c["not_sent"].get("stopped", 0) > 500  # most of 30 s x 30 req/s was never sent
    assert c["ok"] > 20
    lines = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    assert len(lines) == c["scheduled"]
    # In-flight requests were drained, not cut: every sent request finished ok.
    assert {x["status"] for x in lines if x["sent_s"] is not None} == {"ok"}
    assert read_hlog(out / "intervals.hlog")["ttft"] == c["ok"]
