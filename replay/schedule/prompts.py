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

`prompt()` returns the ids as a `TokenIds` chain of lazily made pieces (cached blocks, chunks of
the request's own stream) rather than a list: a schedule stays cheap to iterate, and the body of
a 120k-token request is a join of JSON fragments made once per block (see replay.core.prompt).
`token_ids` / `prefix_token_ids` give the same ids as lists.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import partial

import numpy as np

from replay.core.errors import ReplayError
from replay.core.prompt import Piece, TokenIds
from replay.core.request import Request

# Below this id most vocabularies keep special and byte tokens; stay clear of them.
DEFAULT_LOW_ID = 256
# Ids below this are valid in any vocabulary worth load-testing (the embedded tiny model has 8,192;
# an OpenAI-compatible URL does not tell its vocabulary size, and an out-of-range id is an HTTP 400).
DEFAULT_HIGH_ID = 4_096
# Tag mixed into block seeds so a block stream never equals a per-request stream.
_BLOCK_DOMAIN = 0x70726566  # "pref"
# Cached block tokens, in total: 8 M, ~72 MiB once made (int32 ids + ~5 bytes of JSON text each).
_CACHE_TOKENS = 1 << 23
# A request's own (unique) ids are made in chunks of this many: one chunk is ~0.1 ms of work.
STREAM_CHUNK = 8192


class PromptBuilder:
    """Deterministic token-id prompts: `token_ids(request_id, n)` is a pure function of (seed, id, n)."""

    def __init__(self, seed: int, low_id: int = DEFAULT_LOW_ID, high_id: int = DEFAULT_HIGH_ID) -> None:
        if high_id <= low_id:
            raise ValueError(f"empty token id range [{low_id}, {high_id})")
        self.seed = seed
        self.low_id = low_id
        self.high_id = high_id
        self._blocks: OrderedDict[tuple[int, int], Piece] = OrderedDict()
        self._cached_tokens = 0

    def token_ids(self, request_id: int, n: int) -> list[int]:
        return TokenIds(self.stream(request_id, n)).tolist()

    def stream(self, request_id: int, n: int) -> list[Piece]:
        """The first `n` ids of the request's own stream, as pieces of at most STREAM_CHUNK ids.
        One generator drawn chunk after chunk gives the same ids as one draw of `n`."""
        state = _Stream(np.random.default_rng([self.seed, request_id]), self.low_id, self.high_id)
        sizes = [min(STREAM_CHUNK, n - at) for at in range(0, n, STREAM_CHUNK)]
        return [Piece(k, partial(state.chunk, i, k)) for i, k in enumerate(sizes)]

    def block(self, hash_id: int, block_size: int) -> np.ndarray:
        """The `block_size` token ids of prefix block `hash_id` (read-only; LRU-cached)."""
        return self.block_piece(hash_id, block_size).ids

    def block_piece(self, hash_id: int, block_size: int) -> Piece:
        """Prefix block `hash_id` as a shared piece (LRU-cached, made on first use)."""
        key = (hash_id, block_size)
        got = self._blocks.get(key)
        if got is not None:
            self._blocks.move_to_end(key)
            return got
        piece = Piece(block_size, partial(_draw, (self.seed, _BLOCK_DOMAIN, hash_id, block_size), self.low_id,
                                          self.high_id, block_size))  # fmt: skip
        self._blocks[key] = piece
        self._cached_tokens += block_size
        while self._cached_tokens > _CACHE_TOKENS and len(self._blocks) > 1:
            _, old = self._blocks.popitem(last=False)
            self._cached_tokens -= old.size
        return piece

    def prefix_token_ids(
        self,
        request_id: int,
        n: int,
        hash_ids: Sequence[int],
        block_size: int,
        *,
        require_full_coverage: bool = False,
    ) -> list[int]:
        """`prompt()` as a list."""
        return self.prompt(
            request_id, n, hash_ids, block_size, require_full_coverage=require_full_coverage
        ).tolist()

    def prompt(
        self,
        request_id: int,
        n: int,
        hash_ids: Sequence[int] = (),
        block_size: int = 0,
        *,
        require_full_coverage: bool = False,
    ) -> TokenIds:
        """Exactly `n` ids: the hash ids' blocks in order, cut at `n`; any remainder is unique to
        the request. `require_full_coverage` turns a remainder into an error, for traces whose
        hash ids are meant to hash the whole prompt. Nothing is drawn until the pieces are used."""
        if not hash_ids:
            return TokenIds(self.stream(request_id, n))
        if block_size <= 0:
            raise ReplayError(f"request {request_id}: hash ids given with block size {block_size}")
        covered = len(hash_ids) * block_size
        if covered < n and require_full_coverage:
            raise ReplayError(
                f"request {request_id}: too few prefix blocks: {len(hash_ids)} x {block_size} tokens "
                f"cover {covered}, input length is {n}"
            )
        need = min(len(hash_ids), -(-n // block_size))
        pieces = [self.block_piece(h, block_size) for h in hash_ids[:need]]
        got = need * block_size
        if got > n:  # the last block is cut
            last = pieces[-1]
            keep = block_size - (got - n)
            pieces[-1] = Piece(keep, partial(_head, last, keep))
            got = n
        if got < n:
            pieces += self.stream(request_id, n - got)
        return TokenIds(pieces)

    def for_request(self, req: Request, *, require_full_coverage: bool = False) -> TokenIds:
        """The prompt ids for a scheduled request: prefix blocks when it names hash ids, else unique."""
        return self.prompt(
            req.id,
            req.input_tokens,
            req.prefix_hash_ids,
            req.prefix_block_size,
            require_full_coverage=require_full_coverage,
        )


def _draw(key: tuple[int, ...], low: int, high: int, n: int) -> np.ndarray:
    return np.random.default_rng(list(key)).integers(low, high, size=n).astype(np.int32)


def _head(piece: Piece, n: int) -> np.ndarray:
    return piece.ids[:n]


class _Stream:
    """One request's own generator, drawn in order chunk by chunk as its pieces are made."""

    __slots__ = ("rng", "low", "high", "next", "drawn")

    def __init__(self, rng: np.random.Generator, low: int, high: int) -> None:
        self.rng = rng
        self.low = low
        self.high = high
        self.next = 0  # index of the next chunk to draw
        self.drawn: dict[int, np.ndarray] = {}  # drawn ahead of their piece (made out of order)

    def chunk(self, i: int, size: int) -> np.ndarray:
        """Chunk `i` (every chunk before the last is STREAM_CHUNK long; the last is `size`)."""
        while self.next < i:
            self.drawn[self.next] = self._draw(STREAM_CHUNK)
        if self.next == i:
            return self._draw(size)
        return self.drawn.pop(i)

    def _draw(self, n: int) -> np.ndarray:
        self.next += 1
        return self.rng.integers(self.low, self.high, size=n).astype(np.int32)
