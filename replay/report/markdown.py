"""report.md: the key figures of a capacity search or a single run, for a pull request or a wiki.

The same rows feed the HTML report's headline table, so both always agree.
"""

from __future__ import annotations

from typing import Any

from replay.stats.plausibility import capacity_flags, plausibility


def _f(v: Any, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        v = f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"
    return f"{v}{unit}"


STEP_COLUMNS = (
    "Per second over each step's measurement window (warm-up excluded, cut short where a step "
    "stopped early): rate is the nominal offered rate, arrived the rate this seeded draw actually "
    "scheduled. Each SLO bound shows its measured value and 95% interval (allowing for bursts of "
    "violations); a step is PASS or FAIL only when every interval is on one side of its bound, "
    "UNDECIDED when one straddles it after the step's longest run, UNTRUSTED (never judged, re-run) "
    "when the client itself fell behind. Server: mean requests running / waiting, peak KV-cache use, "
    "preemptions. Noise: the machine's load average over the step, the server's CPU share."
)
VERDICTS = {"pass": "PASS", "fail": "FAIL", "undecided": "UNDECIDED", "untrusted": "UNTRUSTED"}


def answer_text(r: dict[str, Any]) -> str:
    """'18.2 req/s (95% CI 16.9–19.4)' or why there is no answer."""
    rate = r.get("max_slo_rate_req_s")
    if rate is None:
        return f"no answer: {r.get('stop_reason', '-')}"
    lo, hi = r.get("interval_req_s") or (None, None)
    if lo is None:
        return f"{_f(rate)} req/s"
    span = f"{_f(lo)}–{_f(hi)}" if hi is not None else f"at least {_f(lo)}, no failing step yet"
    return f"{_f(rate)} req/s (95% CI {span} req/s)"


def _how(r: dict[str, Any]) -> str:
    pas, fail = r.get("highest_pass_req_s"), r.get("first_fail_rate_req_s")
    bracket = f"highest PASS {_f(pas, ' req/s')}, lowest FAIL {_f(fail, ' req/s')}"
    if r.get("method") == "fit":
        c = next((c for c in r.get("crossings", []) if c["bound"] == r.get("binding_bound")), None)
        n = f" over {c['steps']} steps" if c else ""
        return f"where {r['binding_bound']} crosses its bound, fitted{n}; within {bracket}"
    return f"between the {bracket}"


def _noise_summary(steps: list[dict[str, Any]]) -> str:
    if not steps:
        return "-"
    behind = sum(not s.get("trustworthy", True) for s in steps)
    noise = [s["noise"] for s in steps if s.get("noise")]
    loads = [max(n["load_avg_1m"]) for n in noise]
    share = [n["server_cpu_share"] for n in noise if n["server_cpu_share"] is not None]
    cores = noise[0]["cores"] if noise else None
    parts = [f"client fell behind in {behind} step(s) (re-run, not judged)" if behind else "client kept up"]
    if loads:
        parts.append(f"load average up to {max(loads):.2f} on {cores} cores")
    if share:
        parts.append(f"server CPU share up to {max(share):.0%}")
    return "; ".join(parts)


def _prefix_summary(steps: list[dict[str, Any]]) -> str:
    states = sorted({(s.get("clean_start") or {}).get("prefix_cache", "-") for s in steps})
    return "; ".join(states) if states else "-"


def capacity_key_rows(doc: dict[str, Any]) -> list[list[str]]:
    r = doc.get("result", {})
    base = (doc.get("baseline") or {}).get("latency_ms", {})
    steps = doc.get("steps", [])
    by = r.get("steps_by_verdict") or {}
    rows = [
        ["max rate meeting the SLO", answer_text(r)],
        ["how it was found", _how(r) if r.get("max_slo_rate_req_s") is not None else "-"],
        ["steps", ", ".join(f"{by.get(v, 0)} {VERDICTS[v]}" for v in VERDICTS)],
        ["goodput at the highest PASS", _f(r.get("goodput_at_pass_req_s"), " req/s")],
        [
            "SLO attainment at the highest PASS",
            _f(None if r.get("attainment_at_pass") is None else r["attainment_at_pass"] * 100, "%"),
        ],
        ["knee of latency vs load", _f((r.get("knee") or {}).get("rate_req_s"), " req/s")],
        ["closed-loop max throughput", _f(r.get("max_throughput_req_s"), " req/s")],
        ["prefix cache before each step", _prefix_summary(steps)],
        ["noise", _noise_summary(steps)],
    ]
    if base:
        rows.append(
            [
                "single-request baseline (p50)",
                f"TTFT {_f(base['ttft']['p50'])} ms, TPOT {_f(base['tpot']['p50'])} ms, "
                f"E2E {_f(base['e2e']['p50'])} ms",
            ]
        )
    rep = doc.get("replicas")
    if rep and rep.get("replicas") is not None:
        d = rep["demand"]
        rows.append(
            [
                f"replicas for {d['source']}",
                f"{rep['replicas']} at the interval's low end ({_f(rep.get('per_replica_low_req_s'))} req/s "
                f"each), {rep.get('replicas_at_estimate')} at the estimate; peak {d['req_s']['peak']:.3g} "
                f"req/s, {rep['headroom']:.0%} headroom",
            ]
        )
    rows.append(["stop reason", str(r.get("stop_reason", "-"))])
    for note in r.get("notes", []):
        rows.append(["note", note])
    for w in r.get("warnings", []):
        rows.append(["warning", w])
    rows.append(
        ["search time", _f(r.get("elapsed_s"), " s") + f", {r.get('open_loop_steps', 0)} open-loop steps"]
    )
    return rows


def md_flags(flags: list[str]) -> list[str]:
    """Implausible figures (replay.stats.plausibility) as a quoted warning under the key figures."""
    if not flags:
        return []
    return ["", "> **Check before trusting these figures:**", ">", *(f"> - {f}" for f in flags)]


def _md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_f(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows]
    return out


def _bound_cell(part: dict[str, Any], check: dict[str, Any] | None) -> str:
    """'97.2 ms (81.0–110)' for a percentile; '0.50% (0.10–1.2%)' for an error rate."""
    if part["bound"].startswith("error_rate"):
        if part["estimate"] is None:
            return "-"
        return f"{part['estimate']:.2%} ({part['low']:.2%}–{part['high']:.2%})"
    shown = check["shown"] if check else "-"
    iv = part.get("value_interval")
    return f"{shown} ({_f(iv[0])}–{_f(iv[1])})" if iv else shown


def _server_cell(sv: dict[str, Any] | None) -> str:
    if not sv:
        return "-"
    out = []
    if "running" in sv:
        out.append(f"run {sv['running']['mean']:.3g}")
    if "waiting" in sv:
        out.append(f"wait {sv['waiting']['mean']:.3g}")
    if "kv_cache_usage" in sv:
        out.append(f"KV {sv['kv_cache_usage']['peak']:.0%}")
    if "preemptions_total" in sv:
        out.append(f"preempt {sv['preemptions_total'].get('delta', 0):.0f}")
    return ", ".join(out) or "-"


def _noise_cell(nz: dict[str, Any] | None) -> str:
    if not nz:
        return "-"
    out = [f"load {max(nz['load_avg_1m']):.2f}"]
    if nz.get("server_cpu_share") is not None:
        out.append(f"server CPU {nz['server_cpu_share']:.0%}")
    if not nz["client_trustworthy"]:
        out.append("client fell behind")
    return ", ".join(out)


def step_rows(doc: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """The open-loop steps table (header, rows), shared by report.md and report.html."""
    bounds = [b.strip() for b in doc["slo"].split(",")]
    rows = []
    for s in doc["steps"]:
        checks = {c["bound"]: c for c in (s.get("point_verdict") or {}).get("checks", [])}
        cells = {p["bound"]: _bound_cell(p, checks.get(p["bound"])) for p in s.get("bounds", [])}
        looks = s.get("looks") or []
        rows.append(
            [
                s["index"],
                s["phase"],
                s["rate_req_s"],
                s.get("arrived_req_s"),
                VERDICTS.get(s.get("verdict", ""), s.get("verdict", "-")),
                f"{_f(s.get('window_s'))} ({len(looks)} look{'s' if len(looks) != 1 else ''})",
                *(cells.get(b, "-") for b in bounds),
                (s.get("saturation") or {}).get("verdict", "-"),
                s["achieved_req_s"],
                _server_cell(s.get("server")),
                _noise_cell(s.get("noise")),
                ("; ".join(s["reasons"])[:160] or "-").replace("|", "/"),
            ]
        )
    header = ["#", "phase", "rate", "arrived", "verdict", "window s", *bounds, "saturation", "achieved"]
    return [*header, "server", "noise", "why"], rows


def capacity_md(doc: dict[str, Any]) -> str:
    target = doc.get("target", {})
    name = target.get("name") or target.get("kind") or doc["options"].get("target_name")
    lines = [f"# Capacity: {name}", "", f"SLO: `{doc['slo']}`", ""]
    lines += _md_table(["figure", "value"], capacity_key_rows(doc))
    lines += md_flags(capacity_flags(doc))
    crossings = (doc.get("result") or {}).get("crossings") or []
    if crossings:
        lines += ["", "## Where each bound crosses (fitted over the steps)", ""]
        rows = [[c["bound"], c["rate_req_s"], _f(c["low"]), _f(c["high"]), c["steps"]] for c in crossings]
        lines += _md_table(["bound", "rate (req/s)", "95% low", "95% high", "steps fitted"], rows)
    lines += ["", "## Open-loop steps", ""]
    header, rows = step_rows(doc)
    lines += _md_table(header, rows)
    lines += ["", STEP_COLUMNS]
    lines += ["", "## Closed-loop probe", ""]
    rows = [
        [
            lv["concurrency"],
            lv["throughput_req_s"],
            lv["latency_ms"]["ttft"]["p50"],
            lv["latency_ms"]["e2e"]["p50"],
            "met" if lv["slo_met"] else "missed",
        ]
        for lv in doc["probe"]
    ]
    lines += _md_table(["streams", "req/s", "TTFT p50 ms", "E2E p50 ms", "SLO"], rows)
    rep = doc.get("replicas")
    if rep and rep.get("replicas") is not None:
        lines += ["", "## Replica estimate assumptions", ""] + [f"- {a}" for a in rep["assumptions"]]
    return "\n".join(lines) + "\n"


def run_key_rows(summary: dict[str, Any]) -> list[list[str]]:
    c, t, m = summary["counts"], summary["throughput"], summary["metrics"]
    cfg = summary.get("config", {})
    mode = f"closed loop, {cfg['concurrency']} streams" if cfg.get("concurrency") else "open loop"
    offered = summary.get("offered_rate_req_s")
    return [
        ["mode", mode + (f", offered {offered:.4g} req/s" if offered else "")],
        [
            "requests",
            f"{c['scheduled']} scheduled, {c['ok']} ok, {sum(c['errors'].values())} errors, "
            + (f"{c['unfinished']} unfinished, " if c.get("unfinished") else "")
            + (
                f"{c['abandoned']} abandoned by the client ({c.get('abandoned_mid_stream', 0)} mid-stream), "
                if c.get("abandoned")
                else ""
            )
            + f"{sum(c['not_sent'].values())} not sent",
        ],  # fmt: skip
        [
            "throughput",
            f"{_f(t['req_s'])} req/s, {_f(t['output_tok_s'])} output tok/s over {_f(t['span_s'])} s",
        ],
        ["TTFT p50 / p99", f"{_f(m['ttft']['p50'])} / {_f(m['ttft']['p99'])} ms"],
        *_probe_rows(summary.get("probe"), m),
        ["TTFT from intended p99", f"{_f(m['ttft_intended']['p99'])} ms"],
        ["ITL p50 / p99", f"{_f(m['itl']['p50'])} / {_f(m['itl']['p99'])} ms"],
        ["E2E p50 / p99", f"{_f(m['e2e']['p50'])} / {_f(m['e2e']['p99'])} ms"],
        *_prompt_rows(summary),
        ["generator trustworthy", _f(summary["selfcheck"]["trustworthy"])],
    ]


def _probe_rows(probe: dict[str, Any] | None, m: dict[str, Any]) -> list[list[str]]:
    """The quiet user's view (--probe-rate) right under the load's TTFT, each figure beside the
    load's: what the load does to a small request is read off one pair of lines."""
    if not probe:
        return []
    pm = probe["metrics"]
    return [
        [
            "probe TTFT p50 / p99",
            f"{_f(pm['ttft']['p50'])} / {_f(pm['ttft']['p99'])} ms (load: {_f(m['ttft']['p50'])} / "
            f"{_f(m['ttft']['p99'])} ms)",
        ],
        [
            "probe E2E p50 / p99",
            f"{_f(pm['e2e']['p50'])} / {_f(pm['e2e']['p99'])} ms (load: {_f(m['e2e']['p50'])} / "
            f"{_f(m['e2e']['p99'])} ms)",
        ],
        [
            "probe requests",
            f"{probe['ok']} of {probe['scheduled']} ok at {_f(probe.get('rate_req_s'))} req/s "
            "(in the counts above; latencies apart from the load's)",
        ],
    ]


def _prompt_rows(summary: dict[str, Any]) -> list[list[str]]:
    """How prompts were sent and whether the server counted the length asked for."""
    ple = summary.get("prompt_length_error") or {}
    fmt = (summary.get("config") or {}).get("prompt_format")
    if not ple.get("compared") and not fmt:
        return []
    err = (
        f"{ple['mismatched']} of {ple['compared']} differ (max {ple['max_abs_tokens']} tokens)"
        if ple.get("compared")
        else "not reported by the server"
    )
    return [["prompts", f"{fmt or 'ids'}; length error (server - intended): {err}"]]


TURN_HEADER = ["turn", "scheduled", "ok", "not ok", "TTFT p50 ms", "TTFT p90 ms", "TTFT p99 ms", "TTFT count"]
TURN_NOTE = (
    "Conversations: TTFT of each turn index (ok turns). A later turn re-sends the conversation so far "
    "as its prompt prefix: the server's prefix cache and the longer context both show here. Not ok "
    "counts every status but ok; the turns after one that did not end ok are counted not sent "
    "(session_ended)."
)


def turn_rows(summary: dict[str, Any]) -> list[list[Any]]:
    """summary.json's "turns" (replay.stats.turns) as table rows, shared by report.md and report.html."""
    rows = []
    for r in summary.get("turns") or []:
        t = r["ttft_ms"]
        label = f"{r['turn']}+" if r.get("and_later") else str(r["turn"])
        rows.append([label, r["scheduled"], r["ok"], r["not_ok"], t["p50"], t["p90"], t["p99"], t["count"]])
    return rows


CLASS_HEADER = ["class", "model", "share (drawn)", "scheduled", "ok", "TTFT p50 / p99 ms", "ITL p50 / p99 ms",
                "E2E p50 / p99 ms", "SLO", "held"]  # fmt: skip
CLASS_NOTE = (
    "Tenants and adapters (--classes): each class's requests measured apart (ok requests), its SLO judged "
    "on its own histograms; the overall figures above cover every class. Share: configured (drawn)."
)


def class_rows(summary: dict[str, Any]) -> list[list[Any]]:
    """summary.json's "classes" (replay.stats.classes) as table rows, for report.md and report.html."""
    rows = []
    for r in summary.get("classes") or []:
        m = r["metrics"]
        p50_p99 = [f"{_f(m[k]['p50'])} / {_f(m[k]['p99'])}" for k in ("ttft", "itl", "e2e")]
        held = {None: "-", True: "yes"}.get(r["slo_held"]) or "NO: " + "; ".join(r["slo_failures"])
        drawn = "-" if r.get("share_drawn") is None else f"{r['share_drawn']:.3f}"
        rows.append([r["name"], r["model"] or "(target's)", f"{r['share']:.3f} ({drawn})", r["scheduled"],
                     r["ok"], *p50_p99, r["slo"] or "-", held])  # fmt: skip
    return rows


def run_md(summary: dict[str, Any]) -> str:
    cfg = summary.get("config", {})
    lines = [f"# Run: {cfg.get('target', '?')}", ""]
    lines += _md_table(["figure", "value"], run_key_rows(summary))
    lines += md_flags(plausibility(summary))
    lines += ["", "## Latency (ms)", ""]
    cols = ("p50", "p90", "p99", "p99.9", "max", "mean", "count")
    rows = [[k, *(v.get(c) for c in cols)] for k, v in summary["metrics"].items()]
    lines += _md_table(["metric", *cols], rows)
    if summary.get("turns"):
        lines += ["", "## Per turn of a conversation", ""]
        lines += _md_table(TURN_HEADER, turn_rows(summary))
        lines += ["", TURN_NOTE]
    if summary.get("classes"):
        lines += ["", "## Per class (tenants and adapters)", ""]
        lines += _md_table(CLASS_HEADER, class_rows(summary))
        lines += ["", CLASS_NOTE]
    return "\n".join(lines) + "\n"
