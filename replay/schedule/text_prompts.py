"""Text prompts of an exact token length (`--prompt-format text`), made with the model's tokenizer.

Why text at all: real clients send text, and the server's own tokenization is part of the cost a
user pays (on vLLM's API server it is work on the request path, more so at high rates and long
prompts). Token ids skip it, so ids alone understate TTFT. Why exact: every latency figure is read
against a prompt length, so the server must count the length the schedule asked for; the
summary's prompt-length error (usage.prompt_tokens minus the intended length) checks it.

How: a table of vocabulary entries that are one word with a leading space (" lorem") and that the
tokenizer encodes back to exactly that one token. A prompt's ids (from the schedule, seeded,
prefix blocks included) are mapped id -> word, so equal id prefixes stay equal text prefixes (the
prefix cache sees the same sharing as with ids), and the words joined are the text. A whitespace
pre-tokenizer never merges across the spaces, so the text is one token a word: that split is
checked once on a sample (then only the first prompt is encoded again, as a check); a tokenizer
that does not split so has every prompt encoded and checked. A mismatch stops the run with a
one-line error rather than sending prompts of the wrong length. Special tokens the tokenizer adds
to every encoding (a BOS) count: the server adds them too (vLLM's completions endpoint does), so
the text carries that many words fewer. The chat endpoint adds its template's tokens on top;
exact lengths here are for the completions endpoint.

Needs the `tokenizers` package (replay[local]); read from a tokenizer.json or a model directory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from replay.core import extras
from replay.core.errors import ReplayError
from replay.core.request import Request

FORMATS = ("ids", "text")
_WORD = re.compile(r" [A-Za-z]{2,12}")
_MAX_WORDS = 8192  # enough variety; a big vocabulary is not scanned to its end


def tokenizer_file(path: Path | str) -> Path:
    p = Path(path)
    tok = p if p.is_file() else p / "tokenizer.json"
    if not tok.is_file():
        raise ReplayError(f"--prompt-format text: {p}: no tokenizer.json to build text prompts with")
    return tok


class TextPrompts:
    """`text(ids)`: the words for the ids, whose encoding by the tokenizer is len(ids) + specials."""

    def __init__(self, path: Path | str) -> None:
        extras.require("local", "text prompts (--prompt-format text)", "tokenizers")
        import tokenizers

        self.path = tokenizer_file(path)
        self.tok = tokenizers.Tokenizer.from_file(str(self.path))
        # Tokens the tokenizer adds to any encoding (BOS/EOS by its post-processor).
        self.specials = len(self.tok.encode("", add_special_tokens=True).ids)
        words = []
        for i in range(self.tok.get_vocab_size()):
            s = self.tok.decode([i])
            if _WORD.fullmatch(s) and self.tok.encode(s, add_special_tokens=False).ids == [i]:
                words.append(s)
                if len(words) >= _MAX_WORDS:
                    break
        if len(words) < 64:
            raise ReplayError(f"--prompt-format text: {self.path}: only {len(words)} single-token "
                              "words (' word') in its vocabulary; this tokenizer is not supported, "
                              "use ids")  # fmt: skip
        self.words = np.array(words, dtype=object)
        # Does the pre-tokenizer cut a text of these words at every word? Then the model (BPE,
        # WordPiece, ...) only ever sees one word at a time, each word is one token by the table's
        # own check, and any text of them is exactly one token a word: prompts need no encoding of
        # their own (a 8k-token prompt costs ~20 ms to encode, a stall on the event loop).
        sample = "".join(self.words[np.random.default_rng(0).integers(0, len(words), 4096)])
        pre = self.tok.pre_tokenizer
        self.split_proven = pre is not None and len(pre.pre_tokenize_str(sample)) == 4096
        self._checked = False

    def text(self, ids: Any, request_id: int = -1) -> str:
        """The text for a prompt of len(ids) tokens as the server counts them (specials included)."""
        n = len(ids)
        arr = ids.array() if hasattr(ids, "array") else np.asarray(ids, dtype=np.int64)
        body = arr[: max(0, n - self.specials)]
        text = "".join(self.words[body % len(self.words)])
        if self.split_proven and self._checked:
            return text
        self._checked = True  # with a proven split, the first prompt is checked all the same
        got = len(self.tok.encode(text, add_special_tokens=True).ids)
        if got != n:
            raise ReplayError(f"--prompt-format text: request {request_id}: the text built for {n} tokens "
                              f"encodes to {got} with {self.path}; use --prompt-format ids")  # fmt: skip
        return text


_LOADED: dict[str, TextPrompts] = {}


def text_prompts(path: Path | str) -> TextPrompts:
    """One table per tokenizer per process (a worker process loads its own)."""
    key = str(Path(path).resolve())
    if key not in _LOADED:
        _LOADED[key] = TextPrompts(path)
    return _LOADED[key]


def as_text(schedule: Any, prompts: TextPrompts) -> Iterator[Request]:
    """The same requests with their token-id prompts replaced by text of the same token length."""
    for req in schedule:
        ids = req.prompt_token_ids
        if ids is not None and req.prompt_text is None:
            req.prompt_text = prompts.text(ids, req.id)
            req.prompt_token_ids = None
        yield req


@dataclass(frozen=True)
class AsText:
    """A picklable schedule recipe (`(index, count) -> requests`) whose prompts go as text."""

    inner: Any
    tokenizer: str

    def __call__(self, index: int = 0, count: int = 1) -> Iterator[Request]:
        return as_text(self.inner(index, count), text_prompts(self.tokenizer))
