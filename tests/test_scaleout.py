"""`replay run --workers N` end to end against the stub server, checked against what it served."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import orjson
import pytest

from replay.cli.main import main
from replay.core.errors import ReplayError
from replay.scaleout.launch import worker_factory
from replay.stub.server import StubProcess
from replay.targets.fake import FakeTarget
from replay.targets.registry import load_target


def truth(base_url: str) -> dict:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/stub/truth", timeout=10) as r:
        return json.loads(r.read())


def test_cli_two_workers_against_the_stub_match_its_served_truth(tmp_path: Path) -> None:
    with StubProcess(["--ttft-ms", "20", "--itl-ms", "4"]) as stub:
        out = tmp_path / "run"
        rc = main(
            ["run", "--target", stub.base_url, "--rate", "40", "--duration", "2", "--output-tokens", "16",
             "--workers", "2", "--interval", "1", "--out", str(out), "--quiet"]
        )  # fmt: skip
        served = truth(stub.base_url)
    assert rc in (0, 1)  # 1 only when the busy machine made a worker fall behind
    s = orjson.loads((out / "summary.json").read_bytes())
    assert s["workers"]["mode"] == "processes" and s["workers"]["count"] == 2
    assert [e["index"] for e in s["workers"]["each"]] == [0, 1]
    # Every request the client counts reached the stub, every token it counts was written by it.
    c = s["counts"]
    assert c["accounted"] and c["ok"] == c["scheduled"] == served["received"] == served["served"]
    assert s["tokens"]["output"] == served["tokens"] == 16 * c["ok"]
    assert s["metrics"]["ttft"]["count"] == served["ttft_ms"]["count"]
    # Client TTFT is the served TTFT plus transport and parsing: never less, and close at the median.
    assert served["ttft_ms"]["p50"] <= s["metrics"]["ttft"]["p50"] < served["ttft_ms"]["p50"] + 3.0
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
