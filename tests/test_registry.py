"""Named-target loading: the shipped targets/*.toml, URLs, and every kind of bad file."""

from __future__ import annotations

from pathlib import Path

import pytest

from replay.core.errors import ReplayError
from replay.targets import tiny_model
from replay.targets.openai_http import OpenAIHTTPTarget
from replay.targets.registry import known_names, load_target
from replay.targets.vllm_server import VLLMServerTarget


def test_shipped_vllm_target(tmp_path: Path) -> None:
    t = load_target("vllm", tmp_path, {"endpoint": "completions", "model": None})
    assert isinstance(t, VLLMServerTarget)
    assert t.cfg.model == str(tiny_model.build())  # builtin:tiny-llama resolved (built if missing)
    assert t.cfg.served_model_name == "tiny" and t.cfg.dtype == "float32" and t.cfg.max_model_len == 2048
    assert isinstance(t.cfg.extra_args, tuple) and "--max-num-seqs" in t.cfg.extra_args
    assert t.cfg.http["stall_timeout_s"] == 60
    assert t.run_dir == tmp_path and t.log_path == tmp_path / "server.log" and t.vocab_size == 8192
    # The CLI's --model is the model name on the server: for vllm, the name it serves under.
    t2 = load_target("vllm", tmp_path, {"model": "big", "endpoint": "chat"})
    assert isinstance(t2, VLLMServerTarget) and t2.cfg.served_name() == "big" and t2.cfg.endpoint == "chat"
    assert t2.cfg.model == t.cfg.model


def test_shipped_openai_target_and_urls(tmp_path: Path) -> None:
    t = load_target("openai", tmp_path, {"model": None})
    assert isinstance(t, OpenAIHTTPTarget)
    assert t.cfg.base_url == "http://127.0.0.1:8000/v1" and t.cfg.api_key_env == "OPENAI_API_KEY"
    assert t.cfg.model is None
    u = load_target("http://127.0.0.1:8123", tmp_path, {"model": "m", "endpoint": "chat"})
    assert isinstance(u, OpenAIHTTPTarget)
    assert u.cfg.base_url == "http://127.0.0.1:8123/v1" and u.cfg.model == "m" and u.cfg.endpoint == "chat"
    assert load_target("http://localhost:9/v1/", tmp_path).cfg.base_url == "http://localhost:9/v1"  # type: ignore[attr-defined]
    with pytest.raises(ReplayError, match="not a loopback address"):
        load_target("https://api.example.com/v1", tmp_path)


def test_unknown_name_lists_known() -> None:
    assert {"vllm", "openai"} <= set(known_names())
    with pytest.raises(ReplayError, match=r"unknown target 'vlm': known names are .*openai.*vllm"):
        load_target("vlm", Path("."))


def _write(tmp_path: Path, body: str, name: str = "t.toml") -> Path:
    p = tmp_path / name
    p.write_text(body)
    return p


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('kind = "vllm"\nmodel = "m"\n\nmax_modle_len = 10\n', r"t\.toml:4: max_modle_len: unknown key"),
        ('kind = "vllm"\nmodel = "m"\nmax_model_len = "big"\n', r"t\.toml:3: max_model_len: expected .*int"),
        ('kind = "vllm"\nmodel = "m"\nextra_args = "--x"\n', r"t\.toml:3: extra_args: expected"),
        ('kind = "vllm"\nmodel = "m"\ndtype = 16\n', r"t\.toml:3: dtype: expected"),
        ('kind = "vllm"\ndtype = "float32"\n', r"t\.toml: model: required key is missing"),
        ('kind = "triton"\n', r"t\.toml:1: kind: expected one of vllm, openai, transformers, got 'triton'"),
        ('model = "m"\n', r"t\.toml: kind: expected one of .* got None"),
        ('kind = "vllm"\nmodel = \n', r"t\.toml: invalid TOML: .*line 2"),
        ('kind = "openai"\nbase_url = "http://127.0.0.1:1/v1"\ntimeout = 3\n', r"unknown key"),
        ('kind = "vllm"\nmodel = "m"\n[env]\nA = "1"\n[http]\nstal_timeout_s = 1\n', r"stal_timeout_s"),
        ('kind = "vllm"\nmodel = "m"\n[http]\nstall_timeout_s = -1\n', r"stall_timeout_s: must be a"),
    ],
)
def test_bad_files(tmp_path: Path, body: str, message: str) -> None:
    path = _write(tmp_path, body)
    with pytest.raises(ReplayError, match=message):
        load_target(str(path), tmp_path)
    assert not (tmp_path / "server.log").exists()  # refused before anything started


def test_missing_file() -> None:
    with pytest.raises(ReplayError, match="target file /nope/x.toml: not found"):
        load_target("/nope/x.toml", Path("."))


def test_name_found_in_cwd_targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "targets").mkdir()
    body = 'kind = "openai"\nbase_url = "http://127.0.0.1:5/v1"\nmodel = "x"\n'
    _write(tmp_path / "targets", body, "mine.toml")
    monkeypatch.chdir(tmp_path)
    assert "mine" in known_names()
    t = load_target("mine", tmp_path)
    assert isinstance(t, OpenAIHTTPTarget) and t.cfg.model == "x"


def test_transformers_kind_is_lazy_and_maps_model(tmp_path: Path) -> None:
    path = _write(tmp_path, 'kind = "transformers"\nmodel_dir = "builtin:tiny-llama"\ndevice = "cpu"\n')
    t = load_target(str(path), tmp_path, {"endpoint": "completions", "model": None})
    assert type(t).__name__ == "TransformersLocalTarget"
    assert t.config.model_dir == str(tiny_model.build()) and t.config.device == "cpu"  # type: ignore[attr-defined]
    with pytest.raises(ReplayError, match="--model: the transformers target has no server model name"):
        load_target(str(path), tmp_path, {"model": "x"})
    with pytest.raises(ReplayError, match="completions only"):
        load_target(str(path), tmp_path, {"endpoint": "chat"})
