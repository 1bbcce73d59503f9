"""Tenants and adapters (`--classes FILE`): a weighted mix of request classes, each with its own model
name (the base model or a LoRA adapter the server serves under that name), prompt and output lengths,
arrival share and SLO. One server carries several tenants; their figures must be read apart, because
a mix's overall p99 hides the tenant whose SLO broke.

The file is TOML or JSON (by suffix; `.json` is JSON, anything else TOML), one table per class:

    [[class]]
    name = "chat"          # letters, digits, _ . - ; not "probe"
    share = 0.7            # relative weight (normalised over the classes)
    model = "adapter-a"    # optional: the "model" of its requests (default: the target's model)
    input_tokens = 128     # optional: default --input-tokens (a trace keeps its own lengths)
    output_tokens = 64     # optional: default --output-tokens (a trace keeps its own lengths)
    slo = "ttft_p99<=500ms"  # optional: judged per class in the summary and by `replay capacity`

JSON: `{"class": [{...}, ...]}` or a bare list. Each request is drawn into a class by a seeded uniform
of (seed, request id) (replay.schedule.behaviour.uniforms; a conversation's turns by their session's
first-turn id, so a session keeps one class), the same in every worker process, so the classes'
arrivals are independent thinnings of the one arrival process (each Poisson, rate x share).
A class that sets lengths gets its prompt rebuilt at that length by the shared prompt builder (a
session's first turn only: later turns keep the grown context, and take the class's output length).

Errors name the file and the class and field (or the TOML/JSON line), in one line.
"""

from __future__ import annotations

import bisect
import json
import re
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from replay.core.errors import ReplayError
from replay.core.request import PROBE, Request
from replay.schedule.behaviour import uniforms
from replay.schedule.prompts import DEFAULT_HIGH_ID, DEFAULT_LOW_ID, PromptBuilder
from replay.schedule.sessions import turn_of

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_FIELDS = {"name", "share", "model", "input_tokens", "output_tokens", "slo"}
_SALT = 0xC1A5  # the class draw: its own uniform stream, not the abandon draw's
_PROMPT_SALT = 0x7E4A  # a class's own prompts: not the same ids as the main builder's at another length


@dataclass(frozen=True)
class TrafficClass:
    name: str
    share: float  # normalised: the classes' shares sum to 1
    model: str | None = None  # None: the target's own model
    input_tokens: int | None = None
    output_tokens: int | None = None
    slo: str | None = None


def load_classes(path: Path | str) -> tuple[TrafficClass, ...]:
    """Parse and check a class file; ReplayError (one line: file, class, field) on anything wrong."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ReplayError(f"--classes: {p}: cannot read ({exc.strerror or exc})") from None
    if p.suffix.lower() == ".json":
        try:
            doc: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ReplayError(f"{p}: line {exc.lineno}: not JSON ({exc.msg})") from None
    else:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ReplayError(f"{p}: not TOML: {exc}") from None  # tomllib's text names line and column
    rows = doc.get("class", doc.get("classes")) if isinstance(doc, dict) else doc
    if not isinstance(rows, list) or not rows:
        raise ReplayError(f"{p}: expected [[class]] tables (TOML) or a list of classes (JSON), found none")
    raw = [_one(p, i, row) for i, row in enumerate(rows, 1)]
    names = [c["name"] for c in raw]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ReplayError(f"{p}: class {dup!r}: name: given twice")
    total = sum(c["share"] for c in raw)
    return tuple(TrafficClass(**{**c, "share": c["share"] / total}) for c in raw)


def _one(p: Path, i: int, row: Any) -> dict[str, Any]:
    where = f"{p}: class {i}"
    if not isinstance(row, dict):
        raise ReplayError(f"{where}: expected a table of fields, got {type(row).__name__}")
    name = row.get("name")
    if not isinstance(name, str) or not _NAME.match(name) or name == PROBE:
        raise ReplayError(f"{where}: name: {name!r}: expected 1-64 of letters, digits, _ . - (not 'probe')")
    where = f"{p}: class {name!r}"
    extra = sorted(set(row) - _FIELDS)
    if extra:
        raise ReplayError(f"{where}: {extra[0]}: unknown field (fields: {', '.join(sorted(_FIELDS))})")
    share = row.get("share")
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share < float("inf"):
        raise ReplayError(f"{where}: share: expected a positive number, got {share!r}")
    out: dict[str, Any] = {"name": name, "share": float(share)}
    model = row.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise ReplayError(f"{where}: model: expected a model name, got {model!r}")
    out["model"] = model
    for f in ("input_tokens", "output_tokens"):
        v = row.get(f)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ReplayError(f"{where}: {f}: expected a whole number >= 1, got {v!r}")
        out[f] = v
    slo = row.get("slo")
    if slo is not None and (not isinstance(slo, str) or not slo.strip()):
        raise ReplayError(f"{where}: slo: expected an SLO string like 'ttft_p99<=500ms', got {slo!r}")
    out["slo"] = slo
    return out


def picker(classes: tuple[TrafficClass, ...], seed: int) -> Any:
    """request id -> its class: a seeded uniform against the cumulative shares."""
    cum, acc = [], 0.0
    for c in classes:
        acc += c.share
        cum.append(acc)
    cum[-1] = 1.0  # no uniform falls past the last class through rounding

    def pick(rid: int) -> TrafficClass:
        return classes[bisect.bisect_right(cum, uniforms(seed, _SALT, rid)[0])]

    return pick


def _draw_key(req: Request) -> int:
    """The id a request's class is drawn by: a session turn's session (its first turn's id)."""
    return req.id - turn_of(req.id) if req.session_id is not None else req.id


def with_classes(schedule: Iterable[Request], classes: tuple[TrafficClass, ...], seed: int,
                 prompts: PromptBuilder) -> Iterator[Request]:  # fmt: skip
    """The same requests, each tagged with its drawn class (klass, model) and given that class's
    lengths; probes pass untouched."""
    pick = picker(classes, seed)
    for req in schedule:
        if req.klass == PROBE:
            yield req
            continue
        c = pick(_draw_key(req))
        req.klass, req.model = c.name, c.model
        if c.output_tokens is not None:
            req.output_tokens = c.output_tokens
        later_turn = req.session_id is not None and turn_of(req.id) > 0  # its prompt is the grown context
        if c.input_tokens is not None and c.input_tokens != req.input_tokens and not later_turn:
            req.input_tokens = c.input_tokens
            req.prompt_token_ids = prompts.prompt(req.id, c.input_tokens)
            req.prompt_text = None
        yield req


@dataclass(frozen=True)
class WithClasses:
    """A picklable schedule recipe (`(index, count) -> requests`) with the class mix drawn on top."""

    inner: Any
    classes: tuple[TrafficClass, ...]
    seed: int
    low_id: int = DEFAULT_LOW_ID
    high_id: int = DEFAULT_HIGH_ID

    def __call__(self, index: int = 0, count: int = 1) -> Iterator[Request]:
        prompts = PromptBuilder(self.seed ^ _PROMPT_SALT, self.low_id, self.high_id)
        return with_classes(self.inner(index, count), self.classes, self.seed, prompts)

    @property
    def follow_up(self) -> Any:
        """The inner recipe's follow-ups (a session's later turns), each in its session's class."""
        inner = getattr(self.inner, "follow_up", None)
        if inner is None:
            return None

        def follow(req: Request, end_s: float, output_tokens: int) -> Request | None:
            nxt = inner(req, end_s, output_tokens)
            return None if nxt is None else next(self._tag((nxt,)))

        return follow

    @property
    def remainder(self) -> Any:
        """The inner recipe's never-made turns, counted in their session's class."""
        inner = getattr(self.inner, "remainder", None)
        if inner is None:
            return None
        return lambda req, at_s: self._tag(inner(req, at_s))

    def _tag(self, reqs: Iterable[Request]) -> Iterator[Request]:
        prompts = PromptBuilder(self.seed ^ _PROMPT_SALT, self.low_id, self.high_id)
        return with_classes(reqs, self.classes, self.seed, prompts)
