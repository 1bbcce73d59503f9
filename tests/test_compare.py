"""`replay compare`: regression verdicts and exit codes on real runs of known speed."""

from __future__ import annotations

import asyncio
import shutil

import orjson
import pytest

from replay.cli.main import main
from replay.core.errors import ReplayError
from replay.core.request import Request
from replay.report.compare import compare, parse_thresholds
from replay.run.config import RunConfig
from replay.run.runner import execute
from replay.targets.fake import FakeTarget


def _run(out, ttft_s, fail_every=0):
    sched = [Request(id=i, intended_s=i * 0.04, input_tokens=4, output_tokens=6) for i in range(40)]
    cfg = RunConfig(target="fake", rate=25, duration_s=2, interval_s=0.5, quiet=True)
    target = FakeTarget(ttft_s=ttft_s, itl_s=0.005, fail_every=fail_every)
    asyncio.run(execute(cfg, target, sched, out, 25.0))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("cmp")
    return {
        "fast": _run(base / "fast", 0.020),
        "slow": _run(base / "slow", 0.250),  # TTFT 12.5 times the baseline's
        "flaky": _run(base / "flaky", 0.020, fail_every=5),  # 20% errors
    }


def test_same_run_is_no_regression(runs, capsys):
    assert main(["compare", str(runs["fast"]), str(runs["fast"])]) == 0
    assert "verdict: no regression" in capsys.readouterr().out


def test_slower_candidate_regresses_on_ttft(runs, capsys):
    # Medians: robust to the odd scheduling hiccup of a busy test machine, unlike a p99 of 40.
    assert main(["compare", str(runs["fast"]), str(runs["slow"])]) == 1  # defaults: ttft_p99 +10%
    out = capsys.readouterr().out
    assert "verdict: REGRESSION in ttft_p99" in out
    rows = {r.name: r for r in compare(runs["fast"], runs["slow"], "ttft_p50=10%,itl_p50=10%")}
    assert rows["ttft_p50"].regressed and rows["ttft_p50"].b == pytest.approx(0.25, rel=0.1)
    assert not rows["itl_p50"].regressed
    # The other way round it is an improvement, not a regression.
    assert main(["compare", str(runs["slow"]), str(runs["fast"]), "--threshold", "ttft_p50=10%"]) == 0


def test_thresholds_decide(runs):
    """TTFT p50 goes from 20 ms to 250 ms: +1150%, +230 ms."""
    a, b = str(runs["fast"]), str(runs["slow"])
    assert main(["compare", a, b, "--threshold", "ttft_p50=1400%"]) == 0
    assert main(["compare", a, b, "--threshold", "ttft_p50=900%"]) == 1
    assert main(["compare", a, b, "--threshold", "ttft_p50=260ms"]) == 0
    assert main(["compare", a, b, "--threshold", "ttft_p50=200ms"]) == 1
    assert main(["compare", a, b, "--threshold", "itl_p50=20%"]) == 0


def test_error_rate_and_throughput(runs):
    a, flaky = str(runs["fast"]), str(runs["flaky"])
    assert main(["compare", a, flaky, "--threshold", "error_rate=1%"]) == 1
    assert main(["compare", a, flaky, "--threshold", "error_rate=25%"]) == 0
    rows = {r.name: r for r in compare(runs["fast"], runs["flaky"], "error_rate=1%,req_s=10%")}
    assert rows["error_rate"].b == pytest.approx(0.2)
    assert rows["req_s"].regressed  # 20% fewer successful requests per second


def test_missing_figure_counts_against(runs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(runs["fast"], broken)
    s = orjson.loads((broken / "summary.json").read_bytes())
    s["metrics"]["ttft"]["p99"] = None
    (broken / "summary.json").write_bytes(orjson.dumps(s))
    rows = {r.name: r for r in compare(runs["fast"], broken, "ttft_p99=10%")}
    assert rows["ttft_p99"].regressed and rows["ttft_p99"].note == "missing in B"


@pytest.mark.parametrize(
    ("spec", "needle"),
    [("ttft_p99", "NAME=LIMIT"), ("ttft_p99=5", "give % or a time unit"), ("foo=5%", "unknown figure"),
     ("req_s=5ms", "takes % or a bare number")],
)  # fmt: skip
def test_bad_thresholds(spec, needle):
    with pytest.raises(ReplayError, match=needle):
        parse_thresholds(spec)


def test_bad_directories_exit_2(runs, tmp_path, capsys):
    assert main(["compare", str(runs["fast"]), str(tmp_path)]) == 2
    assert "not a replay run directory" in capsys.readouterr().err
    (tmp_path / "capacity.json").write_text("{}")
    assert main(["compare", str(runs["fast"]), str(tmp_path)]) == 2
    assert "is a run directory but" in capsys.readouterr().err


def test_capacity_directories_compare_max_rate(tmp_path):
    def cap(name, rate, goodput):
        d = tmp_path / name
        d.mkdir()
        doc = {"result": {"max_slo_rate_req_s": rate, "goodput_at_max_req_s": goodput}, "baseline": None}
        (d / "capacity.json").write_bytes(orjson.dumps(doc))
        return str(d)

    a, b, c = cap("a", 10.0, 9.5), cap("b", 9.5, 9.0), cap("c", 8.0, 7.5)
    assert main(["compare", a, b]) == 0  # -5% within the default 10%
    assert main(["compare", a, c]) == 1  # -20%
    assert main(["compare", c, a]) == 0  # more capacity is no regression
    assert main(["compare", a, b, "--threshold", "max_slo_rate=0.2"]) == 1  # absolute: at most 0.2 req/s less
