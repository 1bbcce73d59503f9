"""`--prompt-format ids|text`, shared by `run`: prompts as token ids (exact, no tokenizer on either
side) or as text of the same token length, made with the model's tokenizer (the server then pays
its own tokenization, as with real clients). See replay.schedule.text_prompts."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from replay.core.errors import ReplayError


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prompt-format", default="ids", choices=("ids", "text"),
        help="ids: token-id prompts (default); text: text of the same token length, built with the "
        "model's tokenizer (--tokenizer DIR, or the model of a target replay starts)",
    )  # fmt: skip


def tokenizer_dir(tokenizer: Path | None, target: Any) -> Path:
    """Where text prompts get their tokenizer: --tokenizer, else the model directory of a target
    replay starts (vLLM, in process). A URL does not tell its tokenizer."""
    if tokenizer is not None:
        return tokenizer
    for model in (getattr(target, "model_dir", None), getattr(getattr(target, "cfg", None), "model", None)):
        if model and (Path(model) / "tokenizer.json").is_file():
            return Path(model)
    raise ReplayError("--prompt-format text: needs the model's tokenizer: pass --tokenizer DIR "
                      "(a target given by URL does not tell its tokenizer)")  # fmt: skip


def with_prompt_format(recipe: Any, prompt_format: str, tokenizer: Path | None, target: Any) -> Any:
    """The schedule recipe with its prompts as `prompt_format` asks (checked now: a tokenizer that
    cannot make exact text fails before the run, not at its first request)."""
    if prompt_format != "text":
        return recipe
    from replay.schedule.text_prompts import AsText, text_prompts

    if getattr(recipe, "follow_up", None) is not None:
        raise ReplayError("--prompt-format text: not with sessions (--turns) yet: later turns carry the "
                          "server's output as token ids")  # fmt: skip

    where = tokenizer_dir(tokenizer, target)
    text_prompts(where)
    return AsText(recipe, str(where))
