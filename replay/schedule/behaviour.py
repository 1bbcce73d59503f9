"""What users do besides arriving: leave before their answer is done (`--abandon`), and (sessions)
think between turns. Both draw seconds from a small seeded distribution (`Dist`).

Draws are keyed by (seed, purpose, request id) through splitmix64, not taken from one running
generator: every worker process rebuilds the schedule and keeps only its share of ids, and a
request's draw must not depend on which other requests that worker saw.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from replay.core.errors import ReplayError
from replay.core.request import PROBE, Request

_MASK = (1 << 64) - 1
KINDS = ("exp", "uniform", "fixed")


def _mix(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit value from any integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def uniforms(seed: int, salt: int, key: int) -> tuple[float, float]:
    """Two independent uniforms in [0, 1) for (seed, salt, key): the same in every process."""
    a = _mix((seed & 0xFFFFFFFF) << 32 ^ (salt & 0xFFFF) << 16 ^ _mix(key))
    b = _mix(a)
    return (a >> 11) / 2**53, (b >> 11) / 2**53


def _seconds(text: str, what: str) -> float:
    t = text.strip().lower()
    scale = 1e-3 if t.endswith("ms") else 1.0
    t = t.removesuffix("ms").removesuffix("s")
    try:
        v = float(t) * scale
    except ValueError:
        raise ReplayError(f"{what}: {text!r} is not a number of seconds (e.g. 1.5, 1.5s, 300ms)") from None
    if not (v >= 0 and math.isfinite(v)):
        raise ReplayError(f"{what}: {text!r} must be a finite number of seconds >= 0")
    return v


@dataclass(frozen=True, slots=True)
class Dist:
    """Seconds drawn per key: `exp:MEAN`, `uniform:LO-HI` or a fixed `SECONDS`."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str, what: str) -> Dist:
        kind, sep, rest = text.partition(":")
        kind = kind.strip().lower()
        if not sep:
            return cls("fixed", _seconds(text, what))
        if kind == "exp":
            return cls("exp", _seconds(rest, what))
        if kind == "uniform":
            lo, dash, hi = rest.partition("-")
            if not dash:
                raise ReplayError(f"{what}: {text!r}: uniform needs LO-HI seconds, e.g. uniform:0.5-3")
            d = cls("uniform", _seconds(lo, what), _seconds(hi, what))
            if d.b < d.a:
                raise ReplayError(f"{what}: {text!r}: LO must not exceed HI")
            return d
        raise ReplayError(f"{what}: {text!r}: expected exp:MEAN, uniform:LO-HI or SECONDS")

    def at(self, u: float) -> float:
        """The draw for a uniform `u` in [0, 1) (inverse CDF)."""
        if self.kind == "exp":
            return -self.a * math.log1p(-u)
        if self.kind == "uniform":
            return self.a + u * (self.b - self.a)
        return self.a

    def mean(self) -> float:
        return (self.a + self.b) / 2 if self.kind == "uniform" else self.a

    def to_json(self) -> dict[str, Any]:
        if self.kind == "uniform":
            return {"kind": "uniform", "low_s": self.a, "high_s": self.b}
        return {"kind": self.kind, "mean_s" if self.kind == "exp" else "seconds": self.a}


@dataclass(frozen=True, slots=True)
class AbandonSpec:
    """`--abandon SHARE:DIST`: that share of requests is cancelled by the client DIST seconds after its
    intended send time (if still going then), e.g. `0.2:exp:1.5`, `0.1:uniform:0.05-2`, `0.3:0.5`."""

    share: float
    after: Dist

    @classmethod
    def parse(cls, text: str) -> AbandonSpec:
        what = "--abandon"
        share, sep, dist = text.partition(":")
        try:
            p = float(share)
        except ValueError:
            p = -1.0
        if not sep or not 0.0 <= p <= 1.0:
            raise ReplayError(f"{what}: {text!r}: expected SHARE:DIST, a share in [0, 1], e.g. 0.2:exp:1.5")
        return cls(p, Dist.parse(dist, what))

    def to_json(self) -> dict[str, Any]:
        return {"share": self.share, "after": self.after.to_json()}


_ABANDON_SALT = 1


def with_abandons(schedule: Iterable[Request], spec: AbandonSpec, seed: int) -> Iterator[Request]:
    """The same requests, a seeded `spec.share` of them given their drawn patience (probes stay)."""
    for req in schedule:
        if req.klass == PROBE:
            yield req
            continue
        u_pick, u_time = uniforms(seed, _ABANDON_SALT, req.id)
        if u_pick < spec.share:
            req.abandon_after_s = spec.after.at(u_time)
        yield req


@dataclass(frozen=True)
class Abandoning:
    """A picklable schedule recipe (`(index, count) -> requests`) with abandons drawn on top."""

    inner: Any
    spec: AbandonSpec
    seed: int

    def __call__(self, index: int = 0, count: int = 1) -> Iterator[Request]:
        return with_abandons(self.inner(index, count), self.spec, self.seed)

    @property
    def follow_up(self) -> Any:
        """The inner recipe's follow-ups (a session's later turns), each given its own abandon draw."""
        inner = getattr(self.inner, "follow_up", None)
        if inner is None:
            return None

        def follow(req: Request, end_s: float, output_tokens: int) -> Request | None:
            nxt = inner(req, end_s, output_tokens)
            return None if nxt is None else next(with_abandons((nxt,), self.spec, self.seed))

        return follow

    @property
    def remainder(self) -> Any:
        return getattr(self.inner, "remainder", None)
