"""`--vocab-size` / `--tokenizer`, shared by `run` and `capacity`: the prompt-id bound for a server
whose vocabulary replay cannot see (an OpenAI-compatible URL). See replay.schedule.vocab."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_vocab_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--vocab-size", type=int, default=None, metavar="N",
        help="the server's vocabulary size: prompt token ids stay below it (default: the model's, "
        "for a target replay starts; else below 4096)",
    )  # fmt: skip
    g.add_argument(
        "--tokenizer", type=Path, default=None, metavar="DIR",
        help="read the vocabulary size from this tokenizer (tokenizer.json) or model directory",
    )  # fmt: skip


def vocab_problem(vocab_size: int | None) -> str | None:
    if vocab_size is not None and vocab_size < 2:
        return f"--vocab-size: must be >= 2, got {vocab_size}"
    return None
