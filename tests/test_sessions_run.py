"""Conversations as `replay run --turns` makes them: the recipe and engine hooks the command line
builds, the runner's per-turn figures, and what happens to a session whose turn fails. Truth: the stub
in its own process (per request: received, last byte written, tokens, prompt length, request id)."""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest
from stub_truth import SHIFT_Q, IdTarget, pct, reset, truth

from replay.cli.main import main
from replay.core.request import Request
from replay.report.html import render
from replay.run.config import RunConfig
from replay.run.plan import session_schedule
from replay.run.runner import execute, run_in_uvloop
from replay.schedule.sessions import TURN_STRIDE, chain_hooks, turn_of
from replay.stub.server import StubProcess
from replay.targets.openai_http import HTTPTargetConfig

TURNS, SESSIONS = 4, 16
STUB = ["--ttft-ms", "20", "--itl-ms", "5", "--vllm", "--continuous-usage"]
# Stub receive of turn k+1 - stub's end of turn k - think time: the end's read transit, the engine's
# timer and the next request's send transit. Measured here at lowest CPU priority beside the lead's
# benchmarks (2 shared cores, load average 2.2-2.7, 10 runs of 48 gaps): min -0.06, p10 0.09-0.33,
# p50 0.85-1.33, p90 1.6-4.2, p99 2.7-8.2 ms, the client's own dispatch lag p99 1.5-5.2 ms of it
# (CPU contention touches some turns only); with two other vLLM servers busy (load 3.4) p10 0.48,
# p50 2.7, max 37 ms. Issue 15's acceptance, 2 ms at p99, is for a quiet machine; here a shift is
# judged where contention moves least (stub_truth.SHIFT_Q, p10): a client that sends the next turn 1 ms
# late fails it, one that counts the think time from turn k's send instead of its end reads -55 ms (a
# turn's E2E) and fails the minimum.
GAP_MIN_MS, GAP_SHIFT_MS = -0.2, 1.0


class BodyTarget(IdTarget):
    """The real HTTP client with request ids, keeping each request's prompt ids as sent on the wire."""

    sent: dict[int, list[int]] = {}

    def _body(self, request: Request) -> bytes:
        body = super()._body(request)
        self.sent[request.id] = orjson.loads(body)["prompt"]
        return body


def _cfg(**kw):
    base = dict(target="stub", rate=8.0, duration_s=None, sessions=SESSIONS, turns=TURNS,
                think_time="uniform:0.05-0.2", input_tokens=64, output_tokens=8, follow_up_tokens=16,
                seed=3, interval_s=1.0, quiet=True, drain_timeout_s=30.0)  # fmt: skip
    base.update(kw)
    return RunConfig(**base)


def _run(stub, tmp_path, name, hooks=None):
    cfg = _cfg()
    recipe, offered = session_schedule(cfg)
    reset(stub.base_url)
    target = BodyTarget(HTTPTargetConfig(base_url=stub.base_url))
    target.sent = {}
    res = run_in_uvloop(
        execute(cfg, target, recipe(), tmp_path / name, offered, hooks=hooks or chain_hooks(recipe))
    )
    return recipe, res.summary, truth(stub.base_url), target.sent, res.run_dir


def gaps_ms(doc, think_s) -> np.ndarray:
    """Per follow-up turn: stub received it - stub ended the turn before - that turn's think time."""
    served = {int(x[5]): x for x in doc["requests"]}
    return np.array([(served[rid][0] - served[rid - 1][3] - think_s(rid - 1)) * 1e3
                     for rid in served if turn_of(rid) > 0])  # fmt: skip


def check_timing(gaps: np.ndarray) -> None:
    assert gaps.min() > GAP_MIN_MS, np.round(np.sort(gaps)[:5], 2)  # never before the think time passed
    assert pct(gaps, SHIFT_Q) < GAP_SHIFT_MS, np.round(np.sort(gaps), 2)


def test_session_turns_follow_the_previous_end_by_their_think_time_with_growing_prompts(tmp_path):
    with StubProcess(STUB) as stub:
        recipe, s, doc, sent, run_dir = _run(stub, tmp_path, "run")
    ids = sorted(s * TURN_STRIDE + k for s in range(SESSIONS) for k in range(TURNS))
    assert sorted(int(x[5]) for x in doc["requests"]) == ids  # every turn served once
    c = s["counts"]
    assert c["scheduled"] == c["ok"] == SESSIONS * TURNS and c["accounted"]
    # Per turn index: every turn scheduled and ok, its TTFT histogram holding exactly those.
    assert [(r["turn"], r["scheduled"], r["ok"], r["ttft_ms"]["count"]) for r in s["turns"]] == [
        (k, SESSIONS, SESSIONS, SESSIONS) for k in range(1, TURNS + 1)
    ]
    served = {int(x[5]): x for x in doc["requests"]}
    plen = {int(x[5]): n for x, n in zip(doc["requests"], doc["prompt_tokens"], strict=True)}
    for rid in ids:
        if turn_of(rid) == 0:
            assert plen[rid] == 64
            continue
        # Grows by exactly the previous turn's input and output as the stub counted them, + the new 16...
        assert plen[rid] == plen[rid - 1] + served[rid - 1][4] + 16, rid
        # ...and the previous turn's prompt is a real prefix of this one on the wire (token ids).
        assert sent[rid][: len(sent[rid - 1])] == sent[rid - 1], rid
    check_timing(gaps_ms(doc, recipe.sessions.think_s))
    # The reports render the summary's per-turn rows (they compute nothing).
    render(run_dir)
    md = (run_dir / "report.md").read_text()
    for r in s["turns"]:
        t = r["ttft_ms"]
        cells = f"| {t['p50']:.3g} | {t['p90']:.3g} | {t['p99']:.3g} |"
        assert f"| {r['turn']} | {SESSIONS} | {SESSIONS} | 0 {cells}" in md
    assert "Per turn of a conversation" in (run_dir / "report.html").read_text()


def test_the_timing_check_fails_a_client_that_counts_think_time_from_the_send(tmp_path):
    """The check above, given a client that sends turn k+1 think time after turn k was *sent*."""
    cfg = _cfg()
    recipe, _ = session_schedule(cfg)
    follow, rest = chain_hooks(recipe)

    def from_send(req, end_s, out):
        nxt = follow(req, end_s, out)
        if nxt is not None:
            nxt.intended_s = req.intended_s + recipe.sessions.think_s(req.id)
        return nxt

    with StubProcess(STUB) as stub:
        recipe2, _s, doc, _, _ = _run(stub, tmp_path, "early", hooks=(from_send, rest))
    gaps = gaps_ms(doc, recipe2.sessions.think_s)
    assert len(gaps) == SESSIONS * (TURNS - 1)
    with pytest.raises(AssertionError):
        check_timing(gaps)
    assert pct(gaps, 50) < -40  # a turn's E2E early (20 + 7 x 5 ms)


def test_a_failed_or_abandoned_turn_ends_its_session_and_the_rest_is_counted(tmp_path):
    """Through the command line with two workers: the stub fails a share of requests (HTTP 500) and
    the client leaves some turns 30 ms after their send (a turn takes 55 ms)."""
    out = tmp_path / "run"
    with StubProcess([*STUB, "--fault", "http_500:0.15"]) as stub:
        rc = main(["run", "--target", stub.base_url, "--rate", "10", "--sessions", "24", "--turns", "5",
                   "--think-time", "0.02", "--input-tokens", "32", "--output-tokens", "8",
                   "--follow-up-tokens", "8", "--abandon", "0.1:0.03", "--workers", "2", "--seed", "5",
                   "--out", str(out), "--quiet", "--interval", "1"])  # fmt: skip
        doc = truth(stub.base_url)
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    c = s["counts"]
    # Every turn of every session is one row, once.
    assert sorted(r["id"] for r in rows) == sorted(s * TURN_STRIDE + k for s in range(24) for k in range(5))
    assert c["scheduled"] == 24 * 5 and c["accounted"]
    by_id = {r["id"]: r for r in rows}
    broken = 0
    for sess in range(24):
        turns = [by_id[sess * TURN_STRIDE + k] for k in range(5)]
        assert [r["turn"] for r in turns] == [1, 2, 3, 4, 5]
        first_bad = next((k for k, r in enumerate(turns) if r["status"] != "ok"), 5)
        if first_bad < 5:
            broken += 1
            assert turns[first_bad]["status"] in ("error", "abandoned"), turns[first_bad]
        # After a turn that did not end ok, the session's later turns are never sent, counted as such.
        assert all(
            r["status"] == "not_sent" and r["error"] == "session_ended" for r in turns[first_bad + 1 :]
        )
    assert broken >= 5  # the faults and abandons did break sessions (P(a turn breaks) ~ 0.24)
    ended = sum(r["error"] == "session_ended" for r in rows)
    assert c["not_sent"] == {"session_ended": ended} and ended > 0
    # The stub received exactly the turns the client sent; it failed the ones the client counts http_500.
    sent = [r for r in rows if r["status"] != "not_sent"]
    assert doc["received"] == len(sent)
    assert c["errors"].get("http_500", 0) == doc["faults"].get("http_500", 0)
    assert c["abandoned"] == sum(r["status"] == "abandoned" for r in rows) > 0
    # Per turn: scheduled is every session's turn k; ok + not ok adds up; later turns fewer ok.
    t = s["turns"]
    assert [r["scheduled"] for r in t] == [24] * 5 and all(r["ok"] + r["not_ok"] == 24 for r in t)
    assert t[0]["ok"] >= t[-1]["ok"]
    assert [r["ttft_ms"]["count"] for r in t] == [r["ok"] for r in t]
