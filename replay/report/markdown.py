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
    "scheduled, achieved the completions, goodput the arrivals that met every SLO bound."
)


def capacity_key_rows(doc: dict[str, Any]) -> list[list[str]]:
    r = doc.get("result", {})
    base = (doc.get("baseline") or {}).get("latency_ms", {})
    rows = [
        ["max rate meeting the SLO", _f(r.get("max_slo_rate_req_s"), " req/s")],
        ["first failing rate", _f(r.get("first_fail_rate_req_s"), " req/s")],
        [
            "resolution (fail - pass) / fail",
            _f(None if r.get("resolution") is None else r["resolution"] * 100, "%"),
        ],
        ["confirmed by repeats", "not repeated" if r.get("confirmed") is None else _f(r.get("confirmed"))],
        ["goodput at the max rate", _f(r.get("goodput_at_max_req_s"), " req/s")],
        [
            "SLO attainment at the max rate",
            _f(None if r.get("attainment_at_max") is None else r["attainment_at_max"] * 100, "%"),
        ],
        ["knee of latency vs load", _f((r.get("knee") or {}).get("rate_req_s"), " req/s")],
        ["closed-loop max throughput", _f(r.get("max_throughput_req_s"), " req/s")],
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
                f"{rep['replicas']} (peak {d['req_s']['peak']:.3g} req/s, {rep['headroom']:.0%} headroom)",
            ]
        )
    rows.append(["stop reason", str(r.get("stop_reason", "-"))])
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


def capacity_md(doc: dict[str, Any]) -> str:
    target = doc.get("target", {})
    name = target.get("name") or target.get("kind") or doc["options"].get("target_name")
    lines = [f"# Capacity: {name}", "", f"SLO: `{doc['slo']}`", ""]
    lines += _md_table(["figure", "value"], capacity_key_rows(doc))
    lines += md_flags(capacity_flags(doc))
    r = doc.get("result", {})
    if r.get("decisive"):
        lines += ["", "## Decisive rates (repeats)", ""]
        rows = []
        for rate, sp in r["decisive"].items():
            bounds = "; ".join(
                f"{b} {v['min'] * 1000:.1f}–{v['max'] * 1000:.1f} ms"
                if not b.startswith(("error_rate", "output_tps"))
                else f"{b} {v['min']:.4g}–{v['max']:.4g}"
                for b, v in sp["bounds"].items()
            )
            att = sp["attainment"]
            rows.append(
                [
                    rate,
                    f"{sp['passed']}/{sp['runs']}",
                    bounds or "-",
                    "-" if att is None else f"{att['min'] * 100:.1f}–{att['max'] * 100:.1f}%",
                ]
            )
        lines += _md_table(["rate (req/s)", "passed", "measured range", "attainment range"], rows)
    lines += ["", "## Open-loop steps", ""]
    rows = []
    for s in doc["steps"]:
        lat = s["latency_ms"]
        rows.append(
            [
                s["index"],
                s["phase"],
                s["rate_req_s"],
                s.get("arrived_req_s"),
                "PASS" if s["passed"] else "FAIL",
                lat["ttft_intended"]["p99"],
                lat["itl"]["p99"],
                s["achieved_req_s"],
                s["goodput"]["goodput_req_s"],
                ("; ".join(s["reasons"])[:120] or "-").replace("|", "/"),
            ]
        )
    header = ["#", "phase", "rate", "arrived", "verdict", "TTFT p99 ms", "ITL p99 ms", "achieved", "goodput"]
    lines += _md_table([*header, "why"], rows)
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
            + f"{sum(c['not_sent'].values())} not sent",
        ],  # fmt: skip
        [
            "throughput",
            f"{_f(t['req_s'])} req/s, {_f(t['output_tok_s'])} output tok/s over {_f(t['span_s'])} s",
        ],
        ["TTFT p50 / p99", f"{_f(m['ttft']['p50'])} / {_f(m['ttft']['p99'])} ms"],
        ["TTFT from intended p99", f"{_f(m['ttft_intended']['p99'])} ms"],
        ["ITL p50 / p99", f"{_f(m['itl']['p50'])} / {_f(m['itl']['p99'])} ms"],
        ["E2E p50 / p99", f"{_f(m['e2e']['p50'])} / {_f(m['e2e']['p99'])} ms"],
        ["generator trustworthy", _f(summary["selfcheck"]["trustworthy"])],
    ]


def run_md(summary: dict[str, Any]) -> str:
    cfg = summary.get("config", {})
    lines = [f"# Run: {cfg.get('target', '?')}", ""]
    lines += _md_table(["figure", "value"], run_key_rows(summary))
    lines += md_flags(plausibility(summary))
    lines += ["", "## Latency (ms)", ""]
    cols = ("p50", "p90", "p99", "p99.9", "max", "mean", "count")
    rows = [[k, *(v.get(c) for c in cols)] for k, v in summary["metrics"].items()]
    lines += _md_table(["metric", *cols], rows)
    return "\n".join(lines) + "\n"
