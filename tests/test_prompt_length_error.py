"""Per-request prompt-length error: the server's reported prompt tokens against the length asked for,
counted in the recorder, merged across workers and summarised in summary.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from replay.core.request import Request, record_for
from replay.stats.recorder import Counts, Recorder
from replay.stats.summary import prompt_length_error
from replay.stub.server import StubProcess
from replay.trace.model import TraceRecord, make_header, write_trace

ROOT = Path(__file__).resolve().parents[1]


def _done(i: int, requested: int, reported: int | None, status: str = "ok"):
    rec = record_for(Request(id=i, intended_s=0.0, input_tokens=requested, output_tokens=4))
    rec.sent_s, rec.end_s, rec.status = 0.0, 0.01, status
    rec.usage_input_tokens, rec.usage_output_tokens = reported, 4
    rec.finish_tokens()
    return rec


def test_recorder_counts_differences_and_merges_exactly():
    # (requested, reported): three exact, two +3, one -1, one unreported, one error (not compared).
    cases = [(10, 10), (20, 20), (7, 7), (10, 13), (5, 8), (9, 8), (12, None)]
    whole, a, b = Recorder(), Recorder(), Recorder()
    for i, (req, rep) in enumerate(cases):
        r = _done(i, req, rep)
        assert r.requested_input_tokens == req and r.input_tokens == (rep if rep is not None else req)
        whole.add(r)
        (a if i % 2 else b).add(r)
    err = _done(99, 10, 50, status="error")
    whole.add(err)
    a.add(err)
    s = prompt_length_error(whole.counts)
    assert s == {
        "compared": 6,
        "mismatched": 3,
        "max_abs_tokens": 3,
        "mean_abs_tokens": round((3 + 3 + 1) / 6, 3),
        "differences": {"+3": 2, "-1": 1},
    }
    merged = Counts()
    merged.merge(a.counts)
    merged.merge(b.counts)
    assert prompt_length_error(merged) == s
    line = _done(0, 10, 13).to_json()
    assert line["requested_input_tokens"] == 10 and line["input_tokens"] == 13


def test_nothing_compared_is_reported_as_such():
    assert prompt_length_error(Counts()) == {
        "compared": 0, "mismatched": 0, "max_abs_tokens": 0, "mean_abs_tokens": None, "differences": {},
    }  # fmt: skip


@pytest.fixture(scope="module")
def stub():
    # The stub reports prompt_tokens = number of ids for id prompts, number of words for text.
    with StubProcess(["--ttft-ms", "5", "--itl-ms", "1"]) as p:
        yield p


def _run(stub: StubProcess, trace: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-m", "replay", "run", "--target", stub.base_url, "--trace", str(trace),
         "--out", str(out), "--quiet"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads((out / "summary.json").read_text())


def test_token_id_prompts_have_zero_error(stub, tmp_path):
    recs = [TraceRecord(i * 0.02, 20 + 7 * i, 4) for i in range(12)]
    write_trace(tmp_path / "t.jsonl", recs, make_header("test"))
    s = _run(stub, tmp_path / "t.jsonl", tmp_path / "run")
    assert s["counts"]["ok"] == 12
    assert s["prompt_length_error"] == {
        "compared": 12, "mismatched": 0, "max_abs_tokens": 0, "mean_abs_tokens": 0.0, "differences": {},
    }  # fmt: skip
    lines = [json.loads(x) for x in (tmp_path / "run" / "requests.jsonl").read_text().splitlines()]
    assert sorted(x["requested_input_tokens"] for x in lines) == [20 + 7 * i for i in range(12)]
    assert all(x["input_tokens"] == x["requested_input_tokens"] for x in lines)


def test_text_prompts_of_the_wrong_length_are_counted(stub, tmp_path):
    # Text of 3 words (the stub counts 3) claimed as 5 tokens: error -2; a correct one: 0.
    recs = [TraceRecord(i * 0.02, 5 if i % 3 else 3, 4, prompt_text="one two three") for i in range(9)]
    write_trace(tmp_path / "t.jsonl", recs, make_header("test"))
    s = _run(stub, tmp_path / "t.jsonl", tmp_path / "run")
    ple = s["prompt_length_error"]
    assert ple["compared"] == 9 and ple["mismatched"] == 6
    assert ple["differences"] == {"-2": 6} and ple["max_abs_tokens"] == 2
    lines = [json.loads(x) for x in (tmp_path / "run" / "requests.jsonl").read_text().splitlines()]
    assert all(x["input_tokens"] == 3 for x in lines)
    assert sorted(x["requested_input_tokens"] for x in lines) == [3] * 3 + [5] * 6
