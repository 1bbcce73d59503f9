"""Synthetic sessions: turn k+1 is made when turn k ends and sent a drawn think time later, its prompt
the previous prompt + the reported output + a new user message. Truth: the stub in its own process
(per request: received, last byte written, tokens, prompt length, the client's request id)."""

from __future__ import annotations

import numpy as np
from stub_truth import IdTarget, pct, truth
from test_engine import drive_t0

from replay.engine.open_loop import EngineOptions
from replay.run.runner import run_in_uvloop
from replay.schedule.behaviour import Dist
from replay.schedule.sessions import TURN_STRIDE, Sessions, SessionSpec, turn_of
from replay.stub.server import StubProcess
from replay.targets.openai_http import HTTPTargetConfig

SPEC = SessionSpec(turns=4, think=Dist.parse("uniform:0.05-0.2", "think"), first_tokens=64, follow_tokens=16,
                   output_tokens=8)  # fmt: skip
# Turn k+1 reaches the stub think time after the stub wrote turn k's end, plus the end's read transit
# and the next request's send transit (each ~0.1 ms on loopback). Issue 15's acceptance is 2 ms at
# p99 on a quiet machine (a benchmark's job); here, at load average ~5 on 2 shared cores, 3 runs of 24
# gaps read p10 -0.01..0.07, p50 0.5-0.8, p99 2.1-18 ms (contention touches some turns only), so a
# shift is judged at p10 and p50: a client that sends the next turn 1-2 ms late fails both.
GAP_P10_MS, GAP_P50_MS = 0.5, 1.5


def test_turns_follow_their_think_time_after_the_previous_end_with_growing_prompts():
    sessions = Sessions(SPEC, seed=4)
    made = {}

    def follow(req, end_s, out):
        nxt = sessions.follow_up(req, end_s, out)
        made[req.id] = req
        if nxt is not None:
            made[nxt.id] = nxt
        return nxt

    first = list(sessions.first_turns(np.arange(8) * 0.07, duration_s=None, max_sessions=8))
    with StubProcess(["--ttft-ms", "20", "--itl-ms", "5", "--vllm", "--continuous-usage"]) as stub:
        target = IdTarget(HTTPTargetConfig(base_url=stub.base_url))
        got, _eng, t0 = run_in_uvloop(drive_t0(target, first, EngineOptions(follow_up=follow)))
        doc = truth(stub.base_url)
    assert len(got) == 8 * SPEC.turns and all(r.status == "ok" for r in got)
    assert sorted(r.id for r in got) == sorted(
        s * TURN_STRIDE + k for s in range(8) for k in range(SPEC.turns)
    )
    served = {int(x[5]): x for x in doc["requests"]}
    prompt_len = {int(x[5]): n for x, n in zip(doc["requests"], doc["prompt_tokens"], strict=True)}
    by_id = {r.id: r for r in got}
    gaps_ms, lag_ms = [], []
    for rid, r in by_id.items():
        if turn_of(rid) == 0:
            assert prompt_len[rid] == SPEC.first_tokens
            continue
        prev = rid - 1
        # Prompts grow by exactly the previous turn's input and output (as the stub counted them) + 16.
        assert prompt_len[rid] == prompt_len[prev] + served[prev][4] + SPEC.follow_tokens, rid
        # ...and the previous prompt is a real prefix of this one (token ids).
        assert made[rid].prompt_token_ids[: len(made[prev].prompt_token_ids)] == made[prev].prompt_token_ids
        think = sessions.think_s(prev)
        gaps_ms.append((served[rid][0] - served[prev][3] - think) * 1e3)
        lag_ms.append((r.dispatch_s - r.intended_s) * 1e3)
        # The intended time is the previous turn's end (as the client read it) plus the think time.
        assert abs(r.intended_s - (by_id[prev].end_s + think)) < 1e-5
    gaps = np.array(gaps_ms)
    assert gaps.min() > -0.2, np.sort(gaps)[:5]  # never before the think time has passed
    assert pct(gaps, 10) < GAP_P10_MS and pct(gaps, 50) < GAP_P50_MS, np.round(np.sort(gaps), 2)
    # Dispatch lag is measured against the follow-up's own intended time.
    assert pct(lag_ms, 50) < GAP_P50_MS and min(lag_ms) > -0.3
