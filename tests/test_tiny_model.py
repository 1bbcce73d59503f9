"""The embedded tiny model: deterministic, idempotent, offline, and loadable by transformers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from replay.core.errors import ReplayError
from replay.targets import tiny_model


def _digest(d: Path) -> dict[str, str]:
    return {
        f: hashlib.sha256((d / f).read_bytes()).hexdigest()
        for f in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json")
    }


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return tiny_model.build()


def test_build_is_deterministic(tmp_path: Path, model_dir: Path) -> None:
    fresh = tiny_model.build(tmp_path / "a")
    assert _digest(fresh) == _digest(model_dir)
    stamp = json.loads((fresh / tiny_model.STAMP_FILE).read_text())
    assert stamp["fingerprint"] == tiny_model.fingerprint()


def test_build_is_idempotent_and_rebuilds_a_stale_stamp(tmp_path: Path) -> None:
    out = tiny_model.build(tmp_path / "m")
    weights = out / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert tiny_model.build(out) == out
    assert weights.stat().st_mtime_ns == mtime  # untouched: nothing rebuilt

    stamp = out / tiny_model.STAMP_FILE
    stamp.write_text(json.dumps({"fingerprint": "stale"}))
    assert not tiny_model.is_built(out)
    tiny_model.build(out)
    assert tiny_model.is_built(out)
    assert json.loads(stamp.read_text())["fingerprint"] == tiny_model.fingerprint()


def test_incomplete_model_is_not_built(tmp_path: Path, model_dir: Path) -> None:
    out = tmp_path / "m"
    out.mkdir()
    (out / tiny_model.STAMP_FILE).write_bytes((model_dir / tiny_model.STAMP_FILE).read_bytes())
    assert not tiny_model.is_built(out)  # stamp alone, no weights


def test_refuses_to_overwrite_a_foreign_directory(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ReplayError, match="refusing to overwrite"):
        tiny_model.build(out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_cli_bad_out_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert tiny_model.main(["--out", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a directory" in err


def test_cli_reports_up_to_date(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tiny_model.main(["--out", str(model_dir)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_tokenizer_round_trips_and_has_special_tokens(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert len(tok) == tiny_model.PARAMS["vocab_size"]
    for text in ["Hello world, 1234!", "  spaces\tand\nnewlines ", "ünïcödé → 日本語 🙂", ""]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens([tok.pad_token_id, tok.bos_token_id, tok.eos_token_id]) == [
        tiny_model.PAD,
        tiny_model.BOS,
        tiny_model.EOS,
    ]
    # Frequent corpus words are single tokens: the BPE actually learned merges.
    sample = next(tiny_model.corpus(tiny_model.PARAMS["seed"], 1))
    assert len(tok.encode(sample, add_special_tokens=False)) < len(sample.encode()) / 2
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == f"{tiny_model.BOS}<|user|>\nhi\n<|assistant|>\n"


def test_model_loads_and_runs_in_transformers(model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = model.config
    assert (cfg.model_type, cfg.head_dim, cfg.max_position_embeddings) == ("llama", 64, 2048)
    assert cfg.vocab_size == tiny_model.PARAMS["vocab_size"]
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7, 8]])).logits
    assert logits.shape == (1, 4, cfg.vocab_size)
    assert torch.isfinite(logits).all()
