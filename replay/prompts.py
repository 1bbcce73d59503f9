"""Prompts of exact token length, built as token ids so no tokenizer round trip can change the length.

Ids are drawn from a seeded generator keyed by the request id, so a run is reproducible and two
requests never share a prefix by accident (which would invent prefix-cache hits).
"""

from __future__ import annotations

import numpy as np

# Below this id most vocabularies keep special and byte tokens; stay clear of them.
DEFAULT_LOW_ID = 256
# Any real LLM vocabulary is larger than this, so ids below it are valid everywhere.
DEFAULT_HIGH_ID = 30_000


class PromptBuilder:
    """Deterministic token-id prompts: `token_ids(request_id, n)` is a pure function of (seed, id, n)."""

    def __init__(self, seed: int, low_id: int = DEFAULT_LOW_ID, high_id: int = DEFAULT_HIGH_ID) -> None:
        if high_id <= low_id:
            raise ValueError(f"empty token id range [{low_id}, {high_id})")
        self.seed = seed
        self.low_id = low_id
        self.high_id = high_id

    def token_ids(self, request_id: int, n: int) -> list[int]:
        rng = np.random.default_rng([self.seed, request_id])
        return rng.integers(self.low_id, self.high_id, size=n).tolist()
