"""report.html: one self-contained page (plotly.js and the figures inlined, no network) from saved data.

Works for a capacity directory (capacity.json + its step and probe runs) and for a single run
directory (summary.json, timeseries.jsonl). Everything shown is read back from those files, so
`replay report DIR` re-renders the same page any time later.
"""

from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any

import orjson

from replay.capacity.slo import parse_slo
from replay.capacity.stats import window_hists
from replay.core.errors import ReplayError
from replay.report import capacity_charts as C
from replay.report import figures as F
from replay.report.markdown import STEP_COLUMNS, capacity_key_rows, step_rows
from replay.report.run_charts import distribution_charts, timeseries_charts
from replay.stats import histogram as H
from replay.stats.plausibility import capacity_flags, plausibility

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#222;padding:0}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:right}th{background:#f4f4f4}td.l,th.l{text-align:left}
.pass{color:#2ca02c;font-weight:600}.fail{color:#d62728;font-weight:600}.undecided{color:#8c6d00}
.charts{display:flex;flex-direction:column;gap:14px}
figure.chart{margin:0;border:1px solid #e4e4e4;border-radius:6px;padding:6px;background:#fff;width:100%;
box-sizing:border-box}div.plot{width:100%}
figcaption{font-size:14px;font-weight:600;margin:2px 4px}
.flags{border-left:4px solid #d62728;background:#fff5f5;padding:6px 14px;margin:12px 0;font-size:14px}
.flags ul{margin:4px 0;padding-left:20px}
.key{font-size:15px}.key td{font-size:14px}.note{color:#666;font-size:13px}.nodata{color:#999}
"""


def _page(title: str, body: list[str]) -> str:
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; script-src 'unsafe-inline'; "
        "style-src 'unsafe-inline'; img-src data: blob:; font-src data:\">"
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        + "\n".join(body)
        + F.page_script()
        + "</body></html>\n"
    )


def _table(header: list[str], rows: list[list[Any]], left: int = 1, cls: str = "") -> str:
    def cell(tag: str, i: int, v: Any) -> str:
        c = ' class="l"' if i < left else ""
        text = v if isinstance(v, str) and v.startswith("<span") else escape(_s(v))
        return f"<{tag}{c}>{text}</{tag}>"

    out = [f'<table class="{cls}"><tr>' + "".join(cell("th", i, h) for i, h in enumerate(header)) + "</tr>"]
    out += ["<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows]
    return "".join(out) + "</table>"


def _s(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def flags_box(flags: list[str]) -> str:
    """Implausible figures (replay.stats.plausibility), said before anyone reads them."""
    if not flags:
        return ""
    items = "".join(f"<li>{escape(f)}</li>" for f in flags)
    head = "<strong>&#9888; Check before trusting these figures:</strong>"
    return f'<div class="flags" id="flags">{head}<ul>{items}</ul></div>'


def verdict_span(ok: bool) -> str:
    return '<span class="pass">PASS</span>' if ok else '<span class="fail">FAIL</span>'


# --- capacity report ---------------------------------------------------------------------------


def capacity_html(cap_dir: Path, doc: dict[str, Any]) -> str:
    res = doc.get("result", {})
    target = doc.get("target", {})
    title = f"Capacity — {target.get('name') or target.get('kind') or doc['options'].get('target_name')}"
    body = [f"<h1>{escape(title)}</h1>", f'<p class="key">SLO: <code>{escape(doc["slo"])}</code></p>']
    body.append(_table(["figure", "value"], capacity_key_rows(doc), cls="key"))
    body.append(flags_box(capacity_flags(doc)))
    body.append("<h2>Latency and goodput vs offered load</h2><div class='charts'>")
    slo_metrics = [b.metric for b in parse_slo(doc["slo"]).bounds]
    shown = ["ttft_intended", "itl", "e2e_intended"]
    shown += (
        [m for m in slo_metrics if m not in shown and m in doc["steps"][0]["latency_ms"]]
        if doc["steps"]
        else []
    )
    labels = {"ttft_intended": "TTFT (from intended send)", "e2e_intended": "E2E (from intended send)"}
    if doc["steps"]:
        body += [C.latency_vs_load(doc, m, labels.get(m, m.upper())) for m in shown]
        body.append(C.goodput_chart(doc))
    else:
        body.append('<p class="nodata">no open-loop step ran</p>')
    body.append("</div><h2>Closed-loop probe</h2><div class='charts'>" + C.probe_chart(doc) + "</div>")
    best = _decisive_step(doc, res.get("highest_pass_req_s"), "pass")
    fail = _decisive_step(doc, res.get("first_fail_rate_req_s"), "fail")
    warm = doc["options"]["warmup_s"]
    for step, what, fig in (
        (best, "At the highest passing rate", "best"),
        (fail, "At the lowest failing rate", "fail"),
    ):
        if step is None:
            continue
        run_dir = cap_dir / step["run_dir"]
        label = f"step {step['index']}, {step['rate_req_s']:.4g} req/s"
        body.append(f"<h2>{escape(what)} ({escape(label)})</h2><div class='charts'>")
        if (run_dir / "intervals.hlog").is_file():
            body += distribution_charts(window_hists(run_dir, warm), f"{label}, warm-up excluded", fig)
            body += timeseries_charts(run_dir, label, fig)
        body.append("</div>")
    body.append("<h2>All open-loop steps</h2>" + _steps_table(doc) + f"<p>{escape(STEP_COLUMNS)}</p>")
    body.append("<h2>Probe levels</h2>" + _probe_table(doc))
    rep = doc.get("replicas")
    if rep and rep.get("replicas") is not None:
        body.append("<h2>Replica estimate</h2>")
        body.append(
            f"<p class='key'>{rep['replicas']} replicas (by requests {rep['replicas_by_requests']}, "
            f"by output tokens {rep['replicas_by_output_tokens']})</p><ul>"
            + "".join(f"<li>{escape(a)}</li>" for a in rep["assumptions"])
            + "</ul>"
        )
    body.append(f"<p class='note'>Rendered from {escape(str(cap_dir))}/capacity.json by replay report.</p>")
    return _page(title, body)


def _decisive_step(doc: dict[str, Any], rate: float | None, verdict: str) -> dict[str, Any] | None:
    if not rate:
        return None
    return next((s for s in doc["steps"] if s["rate_req_s"] == rate and s.get("verdict") == verdict), None)


def _steps_table(doc: dict[str, Any]) -> str:
    header, rows = step_rows(doc)
    col = header.index("verdict")
    cls = {"PASS": "pass", "FAIL": "fail"}
    for row in rows:
        v = row[col]
        row[col] = f'<span class="{cls.get(v, "undecided")}">{escape(v)}</span>'
    return _table(header, rows, left=2)


def _probe_table(doc: dict[str, Any]) -> str:
    rows = [
        [
            lv["concurrency"],
            lv["throughput_req_s"],
            lv["output_tok_s"],
            lv["latency_ms"]["ttft"]["p50"],
            lv["latency_ms"]["ttft"]["p99"],
            lv["latency_ms"]["tpot"]["p50"],
            lv["latency_ms"]["e2e"]["p50"],
            verdict_span(lv["slo_met"]),
        ]
        for lv in doc["probe"]
    ]
    return _table(
        ["streams", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "E2E p50", "SLO"], rows
    )


# --- single-run report -------------------------------------------------------------------------


def run_html(run_dir: Path, summary: dict[str, Any]) -> str:
    from replay.report.markdown import (
        CLASS_HEADER,
        CLASS_NOTE,
        TURN_HEADER,
        TURN_NOTE,
        class_rows,
        run_key_rows,
        turn_rows,
    )

    cfg = summary.get("config", {})
    title = f"Run — {cfg.get('target', '?')}"
    body = [f"<h1>{escape(title)}</h1>", _table(["figure", "value"], run_key_rows(summary), cls="key")]
    body.append(flags_box(plausibility(summary)))
    m = summary["metrics"]
    cols = ("p50", "p90", "p99", "p99.9", "max", "mean", "count")
    rows = [[k if k != "output_tps" else "output_tps (tok/s)", *(m[k].get(c) for c in cols)] for k in m]
    body.append("<h2>Latency (ms)</h2>")
    body.append(_table(["metric", "p50", "p90", "p99", "p99.9", "max", "mean", "count"], rows))
    if summary.get("turns"):
        body.append("<h2>Per turn of a conversation</h2>" + _table(TURN_HEADER, turn_rows(summary)))
        body.append(f"<p class='note'>{escape(TURN_NOTE)}</p>")
    if summary.get("classes"):
        body.append("<h2>Per class (tenants and adapters)</h2>")
        body.append(_table(CLASS_HEADER, class_rows(summary), left=2))
        body.append(f"<p class='note'>{escape(CLASS_NOTE)}</p>")
    hists = {k: H.decode(v) for k, v in summary.get("histograms", {}).items()}
    body.append("<h2>Percentile distributions</h2><div class='charts'>")
    body += distribution_charts(hists, "whole run", "run")
    body.append("</div><h2>Time series</h2><div class='charts'>")
    body += timeseries_charts(run_dir, "whole run", "run")
    body.append(f"</div><p class='note'>Rendered from {escape(str(run_dir))} by replay report.</p>")
    return _page(title, body)


def render(run_dir: Path) -> list[Path]:
    """Write report.html and report.md into `run_dir` (a capacity or a single-run directory)."""
    from replay.report.markdown import capacity_md, run_md

    if (run_dir / "capacity.json").is_file():
        doc = orjson.loads((run_dir / "capacity.json").read_bytes())
        html, md = capacity_html(run_dir, doc), capacity_md(doc)
    elif (run_dir / "summary.json").is_file():
        summary = orjson.loads((run_dir / "summary.json").read_bytes())
        html, md = run_html(run_dir, summary), run_md(summary)
    else:
        raise ReplayError(f"{run_dir}: no capacity.json or summary.json here (not a replay run directory)")
    out = [run_dir / "report.html", run_dir / "report.md"]
    out[0].write_text(html, encoding="utf-8")
    out[1].write_text(md, encoding="utf-8")
    return out
