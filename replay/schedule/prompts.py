"""Prompts of exact token length, built as token ids so no tokenizer round trip can change the length.

Ids are drawn from a seeded generator keyed by the request id, so a run is reproducible and two
requests never share a prefix by accident (which would invent prefix-cache hits).

Prefix blocks (traces with hash ids): hash id h of block size B maps to B token ids drawn from a
generator seeded with (seed, a domain tag, h, B) -- never Python's `hash()`, which is salted per
process -- so every request naming h carries the same B tokens at the same position, and the
server's prefix cache sees exactly the sharing the trace recorded, no more. A request of input
length L with hash ids h1..hk gets block(h1) + ... + block(hk) cut to L tokens; when the blocks
cover fewer than L tokens the rest comes from the request's own unique stream. The builder seed
is part of every block's seed: rerunning with the same seed against a server that kept its cache
finds those prefixes already cached, so change the seed (or restart the server) for a cold run.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from replay.core.errors import ReplayError
from replay.core.request import Request

# Below this id most vocabularies keep special and byte tokens; stay clear of them.
DEFAULT_LOW_ID = 256
# Ids below this are valid in any vocabulary worth load-testing (the embedded tiny model has 8,192;
# an OpenAI-compatible URL does not tell its vocabulary size, and an out-of-range id is an HTTP 400).
DEFAULT_HIGH_ID = 4_096
# Tag mixed into block seeds so a block stream never equals a per-request stream.
_BLOCK_DOMAIN = 0x70726566  # "pref"
# Cached block tokens, in total: 16 M int32 = 64 MiB.
_CACHE_TOKENS = 1 << 24


class PromptBuilder:
    """Deterministic token-id prompts: `token_ids(request_id, n)` is a pure function of (seed, id, n)."""

    def __init__(self, seed: int, low_id: int = DEFAULT_LOW_ID, high_id: int = DEFAULT_HIGH_ID) -> None:
        if high_id <= low_id:
            raise ValueError(f"empty token id range [{low_id}, {high_id})")
        self.seed = seed
        self.low_id = low_id
        self.high_id = high_id
        self._blocks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached_tokens = 0

    def token_ids(self, request_id: int, n: int) -> list[int]:
        rng = np.random.default_rng([self.seed, request_id])
        return rng.integers(self.low_id, self.high_id, size=n).tolist()

    def block(self, hash_id: int, block_size: int) -> np.ndarray:
        """The `block_size` token ids of prefix block `hash_id` (read-only; LRU-cached)."""
        key = (hash_id, block_size)
        got = self._blocks.get(key)
        if got is not None:
            self._blocks.move_to_end(key)
            return got
        rng = np.random.default_rng([self.seed, _BLOCK_DOMAIN, hash_id, block_size])
        arr = rng.integers(self.low_id, self.high_id, size=block_size).astype(np.int32)
        arr.flags.writeable = False
        self._blocks[key] = arr
        self._cached_tokens += block_size
        while self._cached_tokens > _CACHE_TOKENS and len(self._blocks) > 1:
            _, old = self._blocks.popitem(last=False)
            self._cached_tokens -= len(old)
        return arr

    def prefix_token_ids(
        self,
        request_id: int,
        n: int,
        hash_ids: Sequence[int],
        block_size: int,
        *,
        require_full_coverage: bool = False,
    ) -> list[int]:
        """Exactly `n` ids: the hash ids' blocks in order, cut at `n`; any remainder is unique to
        the request. `require_full_coverage` turns a remainder into an error, for traces whose
        hash ids are meant to hash the whole prompt."""
        if not hash_ids:
            return self.token_ids(request_id, n)
        if block_size <= 0:
            raise ReplayError(f"request {request_id}: hash ids given with block size {block_size}")
        covered = len(hash_ids) * block_size
        if covered < n and require_full_coverage:
            raise ReplayError(
                f"request {request_id}: too few prefix blocks: {len(hash_ids)} x {block_size} tokens "
                f"cover {covered}, input length is {n}"
            )
        need = min(len(hash_ids), -(-n // block_size))
        parts = [self.block(h, block_size) for h in hash_ids[:need]]
        ids = np.concatenate(parts)[:n].tolist() if parts else []
        if len(ids) < n:
            ids.extend(self.token_ids(request_id, n - len(ids)))
        return ids

    def for_request(self, req: Request, *, require_full_coverage: bool = False) -> list[int]:
        """The prompt ids for a scheduled request: prefix blocks when it names hash ids, else unique."""
        return self.prefix_token_ids(
            req.id,
            req.input_tokens,
            req.prefix_hash_ids,
            req.prefix_block_size,
            require_full_coverage=require_full_coverage,
        )
