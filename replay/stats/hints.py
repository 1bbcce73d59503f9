"""One-line hints for failures whose fix is a flag of ours, kept in summary.json and printed at the
end of a run. Why: a run where every request fails on the server's side looks like a server
problem; when the cause is what we sent, the user should read which flag fixes it, once, not find
it in thousands of identical error lines."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

# vLLM: "Token id 4022 is out of vocabulary"; our in-process target: "... outside the vocabulary".
_OUT_OF_VOCAB = re.compile(r"out of vocabulary|outside the vocabulary", re.IGNORECASE)


def out_of_vocab_hint(errors: Mapping[str, int], examples: Mapping[str, Sequence[str]]) -> str | None:
    """The hint when some error kind's examples say a prompt token id was out of vocabulary."""
    for kind, texts in sorted(examples.items()):
        hit = next((t for t in texts if _OUT_OF_VOCAB.search(t)), None)
        if hit is not None:
            n = errors.get(kind, 0)
            return (
                f"{n} request(s) failed with {kind} ({hit.strip()[:80]}): the server's vocabulary is "
                "smaller than the prompt token ids sent (below 4096 by default); "
                "pass --vocab-size N or --tokenizer DIR"
            )
    return None


def hints(errors: Mapping[str, int], examples: Mapping[str, Sequence[str]]) -> list[str]:
    return [h for h in (out_of_vocab_hint(errors, examples),) if h]
