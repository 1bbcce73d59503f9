"""Figures that are measured correctly but read as something they are not: flagged where shown.

A TPOT of ~0 ms is not an infinitely fast decode: every token after the first arrived in the
same chunk as the first (a non-streaming server, or one that sends its whole answer at once).
An ITL p50 of ~0 ms with multi-token outputs says most tokens came in the same chunk as the one
before: ITL measures the server's chunking there, not its per-token decode time. A failed client
self-check means the latencies include the client's own queueing. Each flag is one sentence; the
console table, report.md and report.html show them beside the figures.
"""

from __future__ import annotations

from typing import Any

# Under this a per-token time means more than 20,000 tokens/s for one request: no decoder streams
# that fast, the tokens came together (a chunk stamped once, microseconds apart).
ZERO_MS = 0.05

TEXT = {
    "tpot0": "TPOT p50 is ~0 ms{at}: all output tokens arrived with the first one (no streaming, or one "
    "chunk per answer), so it is not a decode speed",
    "itl0": "ITL p50 is ~0 ms{at} with multi-token outputs: most tokens came in the same chunk as the one "
    "before, so ITL measures the server's chunking, not its per-token decode",
    "selfcheck": "client self-check failed{at}: the generator fell behind, so latencies include the "
    "client's own queueing",
}


def latency_kinds(latency_ms: dict[str, Any]) -> list[str]:
    """Which implausible readings one set of latency summaries holds ({"tpot": {"p50", "count"}...})."""
    tpot, itl = latency_ms.get("tpot") or {}, latency_ms.get("itl") or {}
    if tpot.get("count") and tpot.get("p50") is not None and tpot["p50"] < ZERO_MS:
        return ["tpot0"]  # implies ITL 0 as well: one flag says it
    if itl.get("count") and itl.get("p50") is not None and itl["p50"] < ZERO_MS:
        return ["itl0"]
    return []


def _flag(kind: str, wheres: list[str]) -> str:
    shown = ", ".join(wheres[:3]) + (f" and {len(wheres) - 3} more" if len(wheres) > 3 else "")
    return TEXT[kind].format(at=f" ({shown})" if shown else "")


def plausibility(summary: dict[str, Any], selfcheck: bool = True) -> list[str]:
    """Flags for a run's summary.json document (`selfcheck=False`: where the self-check verdict is
    already shown in full, as in the console table)."""
    out = [_flag(k, []) for k in latency_kinds(summary.get("metrics", {}))]
    sc = summary.get("selfcheck") or {}
    if selfcheck and sc.get("trustworthy") is False:
        why = "; ".join(sc.get("reasons", [])[:2])
        out.append(_flag("selfcheck", []) + (f" ({why})" if why else ""))
    return out


def capacity_flags(doc: dict[str, Any]) -> list[str]:
    """Flags for a capacity document, one per kind, naming where: the single-request baseline, the
    probe levels and the open-loop steps whose figures are implausible or whose self-check failed."""
    found: dict[str, list[str]] = {}
    base = doc.get("baseline") or {}
    for k in latency_kinds(base.get("latency_ms") or {}):
        found.setdefault(k, []).append("single-request baseline")
    for lv in doc.get("probe", []):
        if base and lv.get("concurrency") == base.get("concurrency"):
            continue  # the baseline itself
        for k in latency_kinds(lv.get("latency_ms") or {}):
            found.setdefault(k, []).append(f"probe {lv.get('concurrency')} streams")
    for s in doc.get("steps", []):
        where = f"step {s.get('index')} at {s.get('rate_req_s', 0):.4g} req/s"
        for k in latency_kinds(s.get("latency_ms") or {}):
            found.setdefault(k, []).append(where)
        if s.get("trustworthy") is False:
            found.setdefault("selfcheck", []).append(where)
    return [_flag(k, found[k]) for k in TEXT if k in found]
