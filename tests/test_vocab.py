"""Prompt token ids and a server's vocabulary (issue 10): the stub server is the independent truth.
Run with `--vocab-size 1024` it refuses any prompt id >= 1,024 with HTTP 400 and vLLM's own text,
as a vLLM serving a 1,024-token model does. Without a flag every request fails and the run ends with
one hint line naming the flag; with `--vocab-size` or `--tokenizer` every request succeeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from replay.capacity.options import CapacityOptions
from replay.capacity.search import CapacitySearch
from replay.capacity.slo import parse_slo
from replay.core.errors import ReplayError
from replay.run.config import RunConfig
from replay.scaleout.shard import SyntheticSchedule
from replay.schedule.vocab import id_range, resolve, tokenizer_vocab_size
from replay.stats.hints import out_of_vocab_hint
from replay.stub.server import StubProcess
from replay.targets import tiny_model

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 1024


def replay(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "replay", *args], capture_output=True, text=True, env=env, timeout=120
    )


def write_tokenizer(d: Path, n: int) -> Path:
    """A tokenizer.json defining ids 0..n-1: n-2 in the BPE vocab, the last two added tokens."""
    d.mkdir(parents=True, exist_ok=True)
    doc = {
        "model": {"type": "BPE", "vocab": {f"t{i}": i for i in range(n - 2)}, "merges": []},
        "added_tokens": [{"id": n - 2, "content": "<s>"}, {"id": n - 1, "content": "</s>"}],
    }
    (d / "tokenizer.json").write_text(json.dumps(doc))
    return d


@pytest.fixture(scope="module")
def stub():
    with StubProcess(["--ttft-ms", "5", "--itl-ms", "1", "--vllm", "--vocab-size", str(VOCAB)]) as p:
        yield p


def _run(stub: StubProcess, out: Path, *flags: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    r = replay("run", "--target", stub.base_url, "--rate", "20", "--duration", "2", "--output-tokens", "4",
               "--out", str(out), "--quiet", *flags)  # fmt: skip
    return r, json.loads((out / "summary.json").read_text())


def test_without_a_flag_every_request_is_refused_and_the_run_ends_with_one_hint(stub, tmp_path):
    r, s = _run(stub, tmp_path / "run")
    c = s["counts"]
    assert r.returncode == 3 and c["ok"] == 0 and c["scheduled"] > 20
    assert c["errors"] == {"http_400": c["scheduled"]}
    assert any("is out of vocabulary" in e for e in s["error_examples"]["http_400"])  # vLLM's text
    hints = [ln for ln in r.stderr.splitlines() if ln.startswith("replay: hint: ")]
    assert len(hints) == 1 and "--vocab-size" in hints[0] and "--tokenizer" in hints[0], r.stderr
    assert s["hints"] == [hints[0].removeprefix("replay: hint: ")]


@pytest.mark.parametrize("how", ["--vocab-size", "--tokenizer"])
def test_with_the_flag_every_request_succeeds(stub, tmp_path, how):
    value = VOCAB if how == "--vocab-size" else write_tokenizer(tmp_path / "tok", VOCAB)
    r, s = _run(stub, tmp_path / "run", how, str(value))
    c = s["counts"]
    assert r.returncode == 0, r.stderr
    assert c["scheduled"] == c["ok"] > 20 and not c["errors"] and s["hints"] == []
    assert "hint" not in r.stderr
    assert s["config"]["vocab_size" if how == "--vocab-size" else "tokenizer"]


def test_a_started_in_process_model_keeps_prompts_inside_its_own_vocabulary(tmp_path):
    """No flag: the target replay starts knows its model (1,024 tokens here) and the prompt ids
    stay inside it; the in-process target refuses an id outside the vocabulary, so one would show."""
    model = tiny_model.build(tmp_path / "m", {**tiny_model.PARAMS, "vocab_size": VOCAB})
    out = tmp_path / "run"
    r = replay("run", "--target", "transformers", "--model-dir", str(model), "--rate", "5", "--duration", "2",
               "--input-tokens", "16", "--output-tokens", "4", "--out", str(out), "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "summary.json").read_text())
    assert s["target"]["vocab_size"] <= VOCAB
    assert s["counts"]["scheduled"] == s["counts"]["ok"] > 3 and s["hints"] == []


def test_id_range_narrows_the_default_only() -> None:
    assert id_range(None) == (256, 4096)
    assert id_range(VOCAB) == (256, VOCAB)
    assert id_range(100_000) == (256, 4096)  # a larger vocabulary never widens the range
    assert id_range(300) == (150, 300)  # a tiny one keeps half its ids for prompts
    sched = SyntheticSchedule.from_config(RunConfig(target="x", rate=50.0, duration_s=4.0), VOCAB)
    ids = [t for r in sched() for t in r.prompt_token_ids or ()]
    assert len(ids) > 5000 and min(ids) >= 256 and max(ids) < VOCAB


def test_tokenizer_vocab_size_reads_tokenizer_json_and_model_dirs(tmp_path) -> None:
    assert tokenizer_vocab_size(write_tokenizer(tmp_path / "a", VOCAB)) == VOCAB
    assert tokenizer_vocab_size(tmp_path / "a" / "tokenizer.json") == VOCAB
    uni = tmp_path / "u"
    uni.mkdir()  # Unigram: the vocab is a list, ids are positions
    unigram = {"model": {"type": "Unigram", "vocab": [["a", 0.0]] * 500}}
    (uni / "tokenizer.json").write_text(json.dumps(unigram))
    assert tokenizer_vocab_size(uni) == 500
    cfg_only = tmp_path / "c"
    cfg_only.mkdir()
    (cfg_only / "config.json").write_text(json.dumps({"text_config": {"vocab_size": 777}}))
    assert tokenizer_vocab_size(cfg_only) == 777
    assert tokenizer_vocab_size(tiny_model.build()) == tiny_model.PARAMS["vocab_size"]
    with pytest.raises(ReplayError, match="--tokenizer"):
        tokenizer_vocab_size(tmp_path / "missing")


def test_resolve_prefers_the_flag_then_the_tokenizer_then_the_target(tmp_path) -> None:
    tok = write_tokenizer(tmp_path / "t", 2000)
    assert resolve(VOCAB, None, 8192) == (VOCAB, "--vocab-size")
    assert resolve(None, tok, 8192) == (2000, "--tokenizer")
    assert resolve(None, None, 8192) == (8192, "target")
    assert resolve(None, None, None) == (None, "default")


def test_bad_flags_are_one_line_errors(tmp_path) -> None:
    base = ("run", "--target", "http://127.0.0.1:9/v1", "--rate", "1", "--duration", "1")
    r = replay(*base, "--vocab-size", "1")
    assert r.returncode == 2 and r.stderr.strip() == "replay: error: --vocab-size: must be >= 2, got 1"
    r = replay(*base, "--tokenizer", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "--tokenizer" in r.stderr and "Traceback" not in r.stderr


def test_hint_only_for_out_of_vocabulary_errors() -> None:
    other = {"http_400": ["HTTP 400: max_tokens must be at least 1"]}
    assert out_of_vocab_hint({"http_400": 3}, other) is None
    h = out_of_vocab_hint({"http_400": 3}, {"http_400": ["HTTP 400: Token id 4022 is out of vocabulary"]})
    assert h is not None and h.startswith("3 request(s)") and "--vocab-size" in h and "\n" not in h


def test_capacity_search_takes_the_vocabulary_option(tmp_path) -> None:
    class T:
        vocab_size = 8192

    opts = CapacityOptions(slo=parse_slo("ttft_p99<=1s"), vocab_size=VOCAB)
    assert CapacitySearch(T(), opts, tmp_path).high_id == VOCAB  # type: ignore[arg-type]
    assert CapacitySearch(T(), CapacityOptions(slo=parse_slo("ttft_p99<=1s")), tmp_path).high_id == 4096  # type: ignore[arg-type]
