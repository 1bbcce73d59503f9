"""`replay run --workers N` end to end against the stub server, checked against what it served."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest
from stub_truth import SHIFT_Q, pair, pct, served_by_order, truth

from replay.cli.main import main
from replay.core.errors import ReplayError
from replay.scaleout.launch import worker_factory
from replay.stub.server import StubProcess
from replay.targets.fake import FakeTarget
from replay.targets.registry import load_target

# ms, on the SHIFT_Q-th percentile of per-request errors (see stub_truth; paired by order, since
# the command line sends no request id). Noise, 10 runs at load average 8-10 on the shared 2-core
# machine: TTFT error 0.10-0.14, mean-ITL error median -0.001..0.001; with the client's sent stamped
# 2 ms early (one-off check) the TTFT error read 2.13.
TTFT_ERR_MS = 1.0
ITL_MEAN_MS = 1.0


def run_two_workers(out: Path) -> tuple[int, dict, dict]:
    with StubProcess(["--ttft-ms", "20", "--itl-ms", "4"]) as stub:
        rc = main(
            ["run", "--target", stub.base_url, "--rate", "40", "--duration", "2", "--output-tokens", "16",
             "--workers", "2", "--interval", "1", "--strict", "--out", str(out), "--quiet"]
        )  # fmt: skip
        served = truth(stub.base_url)
    return rc, orjson.loads((out / "summary.json").read_bytes()), served


def test_cli_two_workers_against_the_stub_match_its_served_truth(tmp_path: Path) -> None:
    out = tmp_path / "run"
    rc, s, served = run_two_workers(out)
    # With --strict the exit code is the self-check's verdict: 1 exactly when it found the run
    # untrustworthy (a worker fell behind on this machine), and it says why.
    sc = s["selfcheck"]
    assert rc == (0 if sc["trustworthy"] else 1), sc
    assert sc["trustworthy"] == (not sc["reasons"]), sc
    assert s["workers"]["mode"] == "processes" and s["workers"]["count"] == 2
    assert [e["index"] for e in s["workers"]["each"]] == [0, 1]
    # Every request the client counts reached the stub, every token it counts was written by it.
    c = s["counts"]
    assert c["accounted"] and c["ok"] == c["scheduled"] == served["received"] == served["served"]
    assert s["tokens"]["output"] == served["tokens"] == 16 * c["ok"]
    assert s["metrics"]["ttft"]["count"] == served["ttft_ms"]["count"]
    # Client TTFT is the served TTFT plus transport and parsing, request by request.
    rows = [orjson.loads(x) for x in (out / "requests.jsonl").read_bytes().splitlines()]
    p = pair(rows, served_by_order(served, rows))
    assert pct(p.ttft_err_ms, SHIFT_Q) < TTFT_ERR_MS, np.round(np.sort(p.ttft_err_ms), 3)
    assert abs(pct(p.itl_mean_err_ms, 50)) < ITL_MEAN_MS, np.round(np.sort(p.itl_mean_err_ms), 3)
    assert s["target"]["kind"] == "openai_http" and s["target"]["model"] == "stub-model"
    # The parent scrapes the server once a second, as one process does, into the same files.
    assert s["server"].get("scrape") and (out / "server_metrics.jsonl").read_bytes().count(b"\n") >= 1


def test_worker_factory_pins_what_the_parent_found(tmp_path: Path) -> None:
    http = load_target("http://127.0.0.1:9", tmp_path)
    http.model = "found-by-probe"  # what start() would have set from GET /v1/models
    made = worker_factory(http)()
    assert type(made) is type(http) and made.cfg.model == "found-by-probe"
    assert made.cfg.base_url == http.cfg.base_url and made is not http
    with pytest.raises(ReplayError, match="cannot be shared across worker processes"):
        worker_factory(FakeTarget())


def test_in_process_transformers_target_gets_one_worker() -> None:
    from replay.scaleout.workers import resolve_workers
    from replay.targets import transformers_local as tl

    local = object.__new__(tl.TransformersLocalTarget)  # the real class; no model needed to ask this
    assert resolve_workers(None, local, 1e6, 1000) == 1
    with pytest.raises(ReplayError, match="--workers"):
        resolve_workers(2, local, 10.0, 10)
