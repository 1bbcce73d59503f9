"""A whole run against a stub that injects every fault at random: each is counted under its kind
(matching the stub's own count of what it injected), the run goes on, nothing is lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from replay.stub.server import StubProcess

ROOT = Path(__file__).resolve().parents[1]

# stub fault label -> the error kind the client must record for it
EXPECTED_KIND = {
    "reset": "connection_reset",
    "truncate": "truncated_stream",
    "malformed": "malformed_response",
    "stall": "stall",
    "http_500": "http_500",
    "http_429": "http_429",
}


def test_random_faults_are_each_counted_under_their_kind(tmp_path):
    faults = ["reset@3:0.08", "truncate@2:0.08", "malformed@1:0.08", "stall@1:3:0.05", "http_500:0.08",
              "http_429:0.05"]  # fmt: skip
    args = ["--ttft-ms", "10", "--itl-ms", "2", "--vllm", "--continuous-usage", "--seed", "7"]
    for f in faults:
        args += ["--fault", f]
    target = tmp_path / "faulty.toml"
    with StubProcess(args) as stub:
        target.write_text(
            f'kind = "openai"\nbase_url = "{stub.base_url}"\n'
            "stall_timeout_s = 0.5\nfirst_token_timeout_s = 5\n"
        )
        out = tmp_path / "run"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        r = subprocess.run(
            [sys.executable, "-m", "replay", "run", "--target", str(target), "--rate", "40",
             "--duration", "6", "--output-tokens", "12", "--out", str(out), "--quiet"],
            capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        with urllib.request.urlopen(stub.base_url.removesuffix("/v1") + "/stub/truth") as resp:
            truth = json.loads(resp.read())
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    c = s["counts"]
    injected = truth["faults"]
    assert set(injected) == set(EXPECTED_KIND), injected  # every kind was drawn at least once
    for label, kind in EXPECTED_KIND.items():
        assert c["errors"].get(kind, 0) == injected[label], (kind, c["errors"], injected)
    assert sum(c["errors"].values()) == sum(injected.values())
    assert c["ok"] == truth["received"] - sum(injected.values())
    assert c["accounted"] and c["scheduled"] == truth["received"]
    lines = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    assert len(lines) == c["scheduled"]
    assert all(x["output_tokens"] == 12 for x in lines if x["status"] == "ok")
    # A bounded set of example messages per kind, for the report.
    assert all(1 <= len(v) <= 5 for v in s["error_examples"].values())
