"""Which token ids a run's prompts may use, and where that bound comes from.

Why: prompts are token ids (exact lengths, no tokenizer round trip), and a server refuses any id
at or above its vocabulary: vLLM answers HTTP 400 "Token id 4022 is out of vocabulary". An
OpenAI-compatible URL does not say how large its vocabulary is, so by default ids stay below
DEFAULT_HIGH_ID (4,096), which fits most models; a smaller vocabulary needs `--vocab-size N`, or
`--tokenizer DIR` to read it. A target replay starts itself (vLLM, in process) knows its model
and exposes `vocab_size`, which is used when neither flag is given. The bound only ever narrows
the default range: ids below 4,096 are as good a load as any for a larger vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from replay.core.errors import ReplayError
from replay.schedule.prompts import DEFAULT_HIGH_ID, DEFAULT_LOW_ID


def id_range(vocab_size: int | None) -> tuple[int, int]:
    """[low, high) for prompt ids: below min(vocab, 4,096), above the special/byte tokens that
    most vocabularies keep at the bottom (256), or above half the range for a vocabulary so small
    that 256 would leave too little of it."""
    high = min(vocab_size, DEFAULT_HIGH_ID) if vocab_size else DEFAULT_HIGH_ID
    return min(DEFAULT_LOW_ID, high // 2), high


def _max_id(vocab: Any) -> int:
    """Highest id in a tokenizer.json model vocab: {token: id} (BPE, WordPiece) or [[token, score]]
    (Unigram, where the id is the position)."""
    if isinstance(vocab, dict):
        return max((int(v) for v in vocab.values()), default=-1)
    if isinstance(vocab, list):
        return len(vocab) - 1
    return -1


def tokenizer_vocab_size(path: Path) -> int:
    """Number of token ids a tokenizer directory (or tokenizer.json file) defines: one past the
    highest id of its vocabulary and added tokens. Read as JSON, not through transformers: the
    flag must work without a model install. Falls back to a model dir's config.json vocab_size."""
    p = Path(path)
    tok = p if p.is_file() else p / "tokenizer.json"
    try:
        doc = json.loads(tok.read_text())
        ids = [_max_id((doc.get("model") or {}).get("vocab"))]
        ids += [int(t["id"]) for t in doc.get("added_tokens") or [] if "id" in t]
        if max(ids) >= 0:
            return max(ids) + 1
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    try:
        conf = json.loads((p / "config.json").read_text())
        v = conf.get("vocab_size") or (conf.get("text_config") or {}).get("vocab_size")
        if isinstance(v, int) and v > 0:
            return v
    except (OSError, ValueError, AttributeError):
        pass
    raise ReplayError(f"--tokenizer: {p}: no readable tokenizer.json (or config.json with vocab_size)")


def resolve(
    vocab_size: int | None, tokenizer: Path | None, target_vocab: int | None
) -> tuple[int | None, str]:
    """(vocabulary size to stay below, where it came from): the user's --vocab-size, else the
    --tokenizer's, else what a target that knows its model says, else none (the default range)."""
    if vocab_size is not None:
        return vocab_size, "--vocab-size"
    if tokenizer is not None:
        return tokenizer_vocab_size(tokenizer), "--tokenizer"
    if target_vocab:
        return int(target_vocab), "target"
    return None, "default"
