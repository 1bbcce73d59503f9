"""Conversations with a class mix (`--turns` with `--classes`): a session is drawn into one class and
keeps it for every turn (model, output length; its first turn's prompt length), later turns still grow
by exactly the previous prompt + output + new user tokens, and turns never made (a session broken by
an abandon) are counted in their session's class. Truth: the stub in its own process (its count of
requests per model name, tokens served per request id) and the bodies as they went on the wire."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import orjson
from stub_truth import IdTarget, truth

from replay.core.request import Request
from replay.run.config import RunConfig
from replay.run.plan import session_schedule
from replay.run.runner import execute, run_in_uvloop
from replay.schedule.behaviour import Abandoning, AbandonSpec
from replay.schedule.classes import WithClasses, load_classes
from replay.schedule.sessions import TURN_STRIDE, chain_hooks, turn_of
from replay.stub.server import StubProcess
from replay.targets.openai_http import HTTPTargetConfig

TURNS, SESSIONS, FOLLOW = 3, 24, 16
STUB = ["--ttft-ms", "10", "--itl-ms", "2", "--vllm", "--continuous-usage", "--model-ttft-ms", "slowm=30"]
MIX = """
[[class]]
name = "fast"
share = 1
input_tokens = 32
output_tokens = 8

[[class]]
name = "slow"
share = 1
model = "slowm"
input_tokens = 96
output_tokens = 24
"""
SHAPE = {"stub-model": ("fast", 32, 8), "slowm": ("slow", 96, 24)}  # wire model -> class, first in, out


class WireTarget(IdTarget):
    """The real HTTP client with request ids, keeping each request's body as sent on the wire."""

    sent: dict[int, dict] = {}

    def _body(self, request: Request) -> bytes:
        body = super()._body(request)
        self.sent[request.id] = orjson.loads(body)
        return body


def test_a_session_keeps_its_class_for_every_turn_and_its_turns_still_grow(tmp_path: Path) -> None:
    (tmp_path / "mix.toml").write_text(MIX)
    cfg = RunConfig(target="stub", rate=10.0, duration_s=None, sessions=SESSIONS, turns=TURNS,
                    think_time="uniform:0.02-0.05", input_tokens=64, output_tokens=4, follow_up_tokens=FOLLOW,
                    seed=3, interval_s=1.0, quiet=True, drain_timeout_s=30.0, classes=tmp_path / "mix.toml",
                    class_mix=load_classes(tmp_path / "mix.toml"), abandon="0.1:0.004")  # fmt: skip
    assert cfg.problems() == []
    inner, offered = session_schedule(cfg)
    # As `replay run` wraps it: classes, then abandons (5 ms: before the stub's first token).
    recipe = Abandoning(WithClasses(inner, cfg.class_mix, cfg.seed), AbandonSpec.parse(cfg.abandon), cfg.seed)
    with StubProcess(STUB) as stub:
        target = WireTarget(HTTPTargetConfig(base_url=stub.base_url))
        target.sent = {}
        res = run_in_uvloop(
            execute(cfg, target, recipe(), tmp_path / "run", offered, hooks=chain_hooks(recipe))
        )
        doc = truth(stub.base_url)
    s, sent = res.summary, target.sent
    served = {int(x[5]): x[4] for x in doc["requests"]}  # id -> tokens the stub wrote
    # The stub's count per model name is the wire's; every session's turns went out under one model.
    assert (
        Counter(b["model"] for b in sent.values()) == Counter(doc["by_model"]) and len(doc["by_model"]) == 2
    )
    session_model = {rid // TURN_STRIDE: b["model"] for rid, b in sent.items() if turn_of(rid) == 0}
    assert len(session_model) == SESSIONS
    for rid, b in sent.items():
        klass, first_in, out = SHAPE[b["model"]]
        assert b["model"] == session_model[rid // TURN_STRIDE], rid
        assert b["max_tokens"] == out
        if turn_of(rid) == 0:
            assert len(b["prompt"]) == first_in
        else:  # the previous turn's prompt, its output as served, and the new user message
            prev = sent[rid - 1]["prompt"]
            assert (
                b["prompt"][: len(prev)] == prev and len(b["prompt"]) == len(prev) + served[rid - 1] + FOLLOW
            )
    # Per class: N sessions of the class x TURNS, whatever broke (abandons end sessions: the turns
    # never made are counted not_sent in their session's class).
    c = s["counts"]
    assert c["accounted"] and c["abandoned"] > 0 and c["scheduled"] == SESSIONS * TURNS
    cls = {r["name"]: r for r in s["classes"]}
    by_session = Counter(SHAPE[m][0] for m in session_model.values())
    assert {k: cls[k]["scheduled"] for k in cls} == {k: n * TURNS for k, n in by_session.items()}
    assert sum(cls[k]["ok"] for k in cls) == c["ok"] == sum(1 for rid in served if served[rid] > 0)
    rows = [json.loads(x) for x in (tmp_path / "run" / "requests.jsonl").read_text().splitlines()]
    assert all(r.get("class") == SHAPE[session_model[r["id"] // TURN_STRIDE]][0] for r in rows)
