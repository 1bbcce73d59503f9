"""Formats results; computes nothing it could not get from the recorder's histograms and counts.

`build_summary` makes the summary.json document; `console_table` the readable end-of-run table.
"""

from __future__ import annotations

from typing import Any

from hdrh.histogram import HdrHistogram

from replay.stats import histogram as H
from replay.stats.classes import classes_lines, classes_section
from replay.stats.hints import hints
from replay.stats.plausibility import plausibility
from replay.stats.recorder import LATENCY_METRICS, PROBE_METRICS, RATE_METRICS, Counts
from replay.stats.saturation import headline
from replay.stats.turns import turns_lines, turns_section

SCHEMA_VERSION = 1


def metric_summaries(hists: dict[str, HdrHistogram]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in LATENCY_METRICS:
        out[name] = H.summary_ms(hists[name])  # us -> ms
    for name in RATE_METRICS:
        out[name] = H.summary_ms(hists[name], scale=1e-3)  # milli-tokens/s -> tokens/s
    return out


def throughput(counts: Counts) -> dict[str, float | None]:
    """Rates over the run's wall span: from run start to the last request's end."""
    span = counts.last_end_s
    if span <= 0:
        return {"req_s": None, "output_tok_s": None, "total_tok_s": None, "span_s": None}
    return {
        "req_s": round(counts.ok / span, 3),
        "output_tok_s": round(counts.output_tokens / span, 1),
        "total_tok_s": round((counts.output_tokens + counts.input_tokens) / span, 1),
        "span_s": round(span, 3),
    }


def counts_json(counts: Counts) -> dict[str, Any]:
    return {
        "scheduled": counts.scheduled,
        "ok": counts.ok,
        "errors": dict(sorted(counts.errors.items())),
        "not_sent": dict(sorted(counts.not_sent.items())),
        "unfinished": counts.unfinished,
        "abandoned": counts.abandoned,
        "abandoned_mid_stream": counts.abandoned_mid_stream,
        "accounted": counts.accounted(),
    }


def prompt_length_error(counts: Counts, top: int = 10) -> dict[str, Any]:
    """Server-reported minus requested prompt tokens (goal: zero for token-id prompts); the `top`
    most frequent nonzero differences, signed, as {"+3": count}."""
    d, n = counts.prompt_len_diffs, counts.prompt_len_compared
    abs_sum = sum(abs(k) * v for k, v in d.items())
    return {
        "compared": n,
        "mismatched": sum(d.values()),
        "max_abs_tokens": max((abs(k) for k in d), default=0),
        "mean_abs_tokens": round(abs_sum / n, 3) if n else None,
        "differences": {f"{k:+d}": v for k, v in d.most_common(top)},
    }


def build_summary(
    *,
    hists: dict[str, HdrHistogram],
    counts: Counts,
    config: dict[str, Any],
    target: dict[str, Any],
    selfcheck: dict[str, Any],
    versions: dict[str, str],
    offered_rate: float | None,
    partial: bool,
    error_examples: dict[str, list[str]],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "partial": partial,
        "config": config,
        "seed": config.get("seed"),
        "target": target,
        "versions": versions,
        "offered_rate_req_s": offered_rate,
        "counts": counts_json(counts),
        "error_examples": error_examples,
        "hints": hints(counts.errors, error_examples),
        "tokens": {"input": counts.input_tokens, "output": counts.output_tokens},
        "prompt_length_error": prompt_length_error(counts),
        "throughput": throughput(counts),
        "metrics": metric_summaries(hists),
        "selfcheck": selfcheck,
        "histograms": {name: H.encode(h) for name, h in hists.items()},
    }
    if counts.probe_scheduled:
        summary["probe"] = probe_section(summary["metrics"], counts, config)
    if counts.turn_scheduled:  # conversations: TTFT per turn index (replay.stats.turns)
        summary["turns"] = turns_section(hists, counts.turn_scheduled, counts.turn_ok)
    mix = config.get("class_mix")
    if mix:  # tenants/adapters: every class's figures and SLO apart (replay.stats.classes)
        summary["classes"] = classes_section(hists, mix, counts.class_scheduled, counts.class_ok,
                                             counts.class_failed)  # fmt: skip
    if extra:
        summary.update(extra)
    return summary


def probe_section(metrics: dict[str, Any], counts: Counts, config: dict[str, Any]) -> dict[str, Any]:
    """The probe stream apart (--probe-rate): its counts and latencies, named as the main load's."""
    return {
        "rate_req_s": config.get("probe_rate"),
        "scheduled": counts.probe_scheduled,
        "ok": counts.probe_ok,
        "not_ok": counts.probe_scheduled - counts.probe_ok,
        "metrics": {m.removeprefix("probe_"): metrics[m] for m in PROBE_METRICS},
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.2f}"
    return str(v)


def _fmt_int(v: Any) -> str:
    return "-" if v is None else f"{v:.0f}"


def console_table(summary: dict[str, Any]) -> str:
    """A compact, human-readable table of the figures users look at first."""
    m = summary["metrics"]
    # First: did the server keep up with the offered load (replay.stats.saturation)?
    lines = headline(summary.get("saturation"), summary.get("config", {}).get("drain_timeout_s"))
    if lines:
        lines.append("")
    cols = ("p50", "p90", "p99", "p99.9", "max", "mean", "count")
    lines.append(f"{'metric (ms)':<16}" + "".join(f"{c:>10}" for c in cols))
    rows = ("ttft", "ttft_intended", "itl", "tpot", "e2e", "e2e_intended", "send_lag", "dispatch_lag")
    for name in rows:
        lines.append(f"{name:<16}" + "".join(f"{_fmt(m[name][c]):>10}" for c in cols))
    tps = m["output_tps"]
    lines.append(f"{'tok/s/request':<16}" + "".join(f"{_fmt_int(tps[c]):>10}" for c in cols))
    probe = summary.get("probe")
    if probe:  # the quiet user's view beside the load's (--probe-rate)
        for name in ("ttft", "ttft_intended", "itl", "e2e"):
            row = probe["metrics"][name]
            lines.append(f"{'probe ' + name:<16}" + "".join(f"{_fmt(row[c]):>10}" for c in cols))
    if summary.get("turns"):
        lines.append("")
        lines.extend(turns_lines(summary["turns"]))
    if summary.get("classes"):
        lines.append("")
        lines.extend(classes_lines(summary["classes"]))
    c = summary["counts"]
    t = summary["throughput"]
    errs = ", ".join(f"{k}={v}" for k, v in c["errors"].items()) or "none"
    ns = ", ".join(f"{k}={v}" for k, v in c["not_sent"].items()) or "none"
    offered = summary.get("offered_rate_req_s")
    lines.append("")
    lines.append(
        f"requests: scheduled {c['scheduled']}, ok {c['ok']}, errors {sum(c['errors'].values())} ({errs}), "
        + (f"unfinished {c['unfinished']}, " if c.get("unfinished") else "")
        + (
            f"abandoned {c['abandoned']} ({c['abandoned_mid_stream']} mid-stream), "
            if c.get("abandoned")
            else ""
        )
        + f"not sent {sum(c['not_sent'].values())} ({ns})"
    )
    lines.append(
        f"throughput: {_fmt(t['req_s'])} req/s achieved"
        + (f" of {offered:g} offered" if offered else "")
        + f", {_fmt(t['output_tok_s'])} output tok/s, {_fmt(t['total_tok_s'])} total tok/s"
        + f" over {_fmt(t['span_s'])} s"
    )
    if probe:
        lines.append(f"probe: {probe['ok']} of {probe['scheduled']} ok at {_fmt(probe['rate_req_s'])} req/s "
                     "(counted in requests above; latencies apart from the load's)")  # fmt: skip
    ple = summary.get("prompt_length_error")
    fmt = summary.get("config", {}).get("prompt_format") or "ids"
    if ple and ple["mismatched"]:
        lines.append(
            f"prompt length: {ple['mismatched']} of {ple['compared']} requests differ from the requested "
            f"length as the server counts it (max {ple['max_abs_tokens']} tokens; prompts as {fmt})"
        )
    elif fmt != "ids":  # text prompts: say so, and that the server counted the lengths asked for
        told = f"all {ple['compared']} as requested" if ple and ple["compared"] else "not reported"
        lines.append(f"prompts: {fmt}; length as the server counts it: {told}")
    workers = summary.get("workers")
    if workers:
        each = workers.get("each", [])
        cpus = ", ".join(f"{e.get('cpu_percent', 0):.0f}%" for e in each)
        lines.append(f"workers: {workers.get('count', len(each))} processes (client CPU each: {cpus})")
    sc = summary["selfcheck"]
    if sc["trustworthy"]:
        lines.append(
            f"self-check: ok (dispatch lag p99 {_fmt(sc['dispatch_lag_p99_ms'])} ms, "
            f"loop lag p99 {_fmt(sc['loop_lag_p99_ms'])} ms, max {_fmt(sc.get('loop_lag_max_ms'))} ms, "
            f"client CPU {sc['client_cpu_percent']:.0f}%)"
        )
    else:
        lines.append("self-check: GENERATOR FELL BEHIND — latencies include the client's own queueing:")
        lines.extend(f"  - {r}" for r in sc["reasons"])
    if summary.get("partial"):
        lines.append("PARTIAL RUN: stopped before the schedule ended")
    lines.extend(f"CHECK: {f}" for f in plausibility(summary, selfcheck=False))  # implausible figures
    return "\n".join(lines)
