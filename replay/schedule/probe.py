"""The probe stream (`--probe-rate R`): fixed small requests on their own seeded Poisson arrivals,
merged by intended time into the main schedule, tagged `klass = "probe"` so the recorder measures
them apart: the latency a quiet user sees while the load runs (as `vllm bench serve` does with its
probe requests).

The probe runs as long as the main schedule does: it stops at the main schedule's last request, so
a run bounded by `--requests` or a trace's end needs no duration of its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from replay.core.request import PROBE, Request
from replay.schedule import arrivals
from replay.schedule.arrivals import ArrivalSpec
from replay.schedule.prompts import DEFAULT_HIGH_ID, DEFAULT_LOW_ID, PromptBuilder

PROBE_INPUT_TOKENS = 32
PROBE_OUTPUT_TOKENS = 16
PROBE_ID_BASE = 1 << 40  # probe ids: apart from any schedule's own (0, 1, 2, ...)
_SEED_SALT = 0x9B0B  # its arrivals and prompts: a stream of their own, not a copy of the main load's


def probe_stream(rate: float, seed: int, low_id: int = DEFAULT_LOW_ID, high_id: int = DEFAULT_HIGH_ID,
                 shard: tuple[int, int] | None = None) -> Iterator[Request]:  # fmt: skip
    """Endless probe requests at Poisson `rate`; `shard=(w, n)` keeps ids with `id % n == w`."""
    prompts = PromptBuilder(seed ^ _SEED_SALT, low_id, high_id)
    for k, t in enumerate(arrivals.offsets(ArrivalSpec(kind="poisson", rate=rate), seed ^ _SEED_SALT)):
        rid = PROBE_ID_BASE + k
        if shard is not None and rid % shard[1] != shard[0]:
            continue
        ids = prompts.prompt(k, PROBE_INPUT_TOKENS)
        yield Request(id=rid, intended_s=t, input_tokens=PROBE_INPUT_TOKENS,
                      output_tokens=PROBE_OUTPUT_TOKENS, prompt_token_ids=ids, klass=PROBE)  # fmt: skip


def beside(main: Iterable[Request], probe: Iterator[Request]) -> Iterator[Request]:
    """Both in order of intended time; probes before a main request at the same instant; the probe ends
    with the main schedule."""
    nxt = next(probe, None)
    for req in main:
        while nxt is not None and nxt.intended_s <= req.intended_s:
            yield nxt
            nxt = next(probe, None)
        yield req


@dataclass(frozen=True)
class WithProbe:
    """A picklable schedule recipe (`(index, count) -> requests`) with the probe stream merged in."""

    inner: Any
    rate: float
    seed: int
    low_id: int = DEFAULT_LOW_ID
    high_id: int = DEFAULT_HIGH_ID

    def __call__(self, index: int = 0, count: int = 1) -> Iterator[Request]:
        shard = None if count == 1 else (index, count)
        probes = probe_stream(self.rate, self.seed, self.low_id, self.high_id, shard)
        return beside(self.inner(index, count), probes)

    @property
    def follow_up(self) -> Any:  # the main load's (sessions); probes have none
        return getattr(self.inner, "follow_up", None)

    @property
    def remainder(self) -> Any:
        return getattr(self.inner, "remainder", None)
