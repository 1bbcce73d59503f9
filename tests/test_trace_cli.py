"""`replay trace stats|convert|synth`, driven through argparse as a user would."""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from replay.cli.trace import add_trace_subparser, main
from replay.trace.formats import load_trace

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "traces" / "samples"
FIX = ROOT / "tests" / "fixtures"
AZURE = SAMPLES / "azure_llm_2023_conv_sample.csv"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["trace", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_mounts_on_any_subparsers_object():
    parser = argparse.ArgumentParser()
    add_trace_subparser(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["trace", "stats", "x.csv", "--json"])
    assert ns.func.__name__ == "cmd_stats" and ns.json and ns.file == Path("x.csv")


def test_stats_json_against_independent_truth(capsys):
    code, out, _ = run(capsys, "stats", AZURE, "--json")
    assert code == 0
    s = json.loads(out)
    # The truth read from the CSV by hand (csv + numpy's nanosecond datetimes), not by replay's loader.
    with open(AZURE, newline="") as fh:
        rows = list(csv.DictReader(fh))
    stamps = np.array([r["TIMESTAMP"] for r in rows], dtype="datetime64[ns]")
    t = (stamps - stamps[0]).astype(np.int64) / 1e9
    inp = np.array([int(r["ContextTokens"]) for r in rows])
    outp = np.array([int(r["GeneratedTokens"]) for r in rows])
    assert len(rows) == 200 and np.all(np.diff(t) >= 0)
    assert s["requests"] == 200 and s["format"] == "azure"
    assert s["span_s"] == pytest.approx(t[-1])
    # Mean rate over one pass: N arrivals over the span stretched by N / (N - 1) (one more gap).
    assert s["mean_rate"] == pytest.approx(200 / (t[-1] * 200 / 199))
    for key, vals in (("input_tokens", inp), ("output_tokens", outp)):
        d = s[key]
        for q in (50, 90, 99):
            assert d[f"p{q}"] == int(np.percentile(vals, q, method="inverted_cdf"))
        assert (d["min"], d["max"]) == (vals.min(), vals.max())
        assert d["mean"] == pytest.approx(vals.mean())
    one = s["rate_windows"]["1s"]
    whole = int(t[-1] * 200 / 199)
    per_s = np.bincount(t.astype(int), minlength=whole)[:whole]
    assert one["windows"] == whole and one["max"] == per_s.max()
    assert one["peaks"][0] == {"start_s": int(np.argmax(per_s)), "rate": float(per_s.max())}
    ten = s["rate_windows"]["10s"]
    per_10 = np.bincount((t // 10).astype(int))[: whole // 10] / 10
    assert ten["max"] == pytest.approx(per_10.max()) and ten["mean"] == pytest.approx(per_10.mean())


def test_stats_table_and_prefix_reuse(capsys):
    code, out, _ = run(capsys, "stats", SAMPLES / "mooncake_fast25_conversation_sample.jsonl")
    assert code == 0
    assert "requests  200" in out and "per 10s" in out and "p99" in out
    recs = list(load_trace(SAMPLES / "mooncake_fast25_conversation_sample.jsonl"))
    blocks = [h for r in recs for h in r.hash_ids]
    assert f"{len(blocks)} blocks of 512 tokens, {len(set(blocks))} unique" in out


def test_stats_untimed_and_bad_input(capsys):
    code, out, _ = run(capsys, "stats", FIX / "sharegpt_small.json")
    assert code == 0 and "arrivals  none" in out and "estimated from text" in out
    code, _, err = run(capsys, "stats", SAMPLES / "servegen_offline_trace_a_sample.jsonl")
    assert code == 2 and err.count("\n") == 1 and "field 'output_length': missing" in err
    code, out, _ = run(
        capsys, "stats", SAMPLES / "servegen_offline_trace_a_sample.jsonl", "--default-output-tokens", "9"
    )
    assert code == 0 and "prefix    " in out


def test_convert_round_trip(capsys, tmp_path):
    dst = tmp_path / "azure.jsonl"
    code, out, _ = run(capsys, "convert", AZURE, dst)
    assert code == 0 and out == f"wrote 200 records to {dst}\n"
    head = json.loads(dst.read_text().splitlines()[0])
    assert head["replay_trace"] == 1 and head["source_format"] == "azure" and head["timed"] is True
    orig, back = list(load_trace(AZURE)), list(load_trace(dst))
    assert len(back) == 200
    for a, b in zip(orig, back, strict=True):
        assert b.arrival_s == pytest.approx(a.arrival_s, abs=1e-6)
        assert (b.input_tokens, b.output_tokens) == (a.input_tokens, a.output_tokens)


def test_convert_keeps_hashes_sessions_and_untimed_flag(capsys, tmp_path):
    dst = tmp_path / "b.jsonl"
    assert run(capsys, "convert", FIX / "bailian_form.jsonl", dst)[0] == 0
    assert [(r.hash_ids, r.block_size, r.session_id) for r in load_trace(dst)] == [
        (r.hash_ids, r.block_size, r.session_id) for r in load_trace(FIX / "bailian_form.jsonl")
    ]
    dst2 = tmp_path / "s.jsonl"
    assert run(capsys, "convert", FIX / "sharegpt_small.json", dst2)[0] == 0
    tf = load_trace(dst2)
    assert not tf.timed and tf.lengths_estimated
    assert [r.prompt_text for r in tf][1] == "hi"


def test_convert_sort(capsys, tmp_path):
    src = tmp_path / "u.csv"
    src.write_text("Timestamp,Request tokens,Response tokens\n10,1,1\n5,2,1\n12,3,1\n")
    code, _, err = run(capsys, "convert", src, tmp_path / "x.jsonl")
    assert code == 2 and "u.csv:3: field 'Timestamp': arrives 5 s before the previous row" in err
    code, out, _ = run(capsys, "convert", src, tmp_path / "x.jsonl", "--sort")
    assert code == 0
    assert [(r.arrival_s, r.input_tokens) for r in load_trace(tmp_path / "x.jsonl")] == [
        (0.0, 2),
        (5.0, 1),
        (7.0, 3),
    ]
    code, _, err = run(capsys, "convert", src, src)
    assert code == 2 and "refusing to overwrite" in err


def test_convert_with_a_real_tokenizer(capsys, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    dst = tmp_path / "s.jsonl"
    code, _, _ = run(
        capsys, "convert", FIX / "sharegpt_small.json", dst, "--tokenizer", tmp_path / "tokenizer.json"
    )
    assert code == 0
    tf = load_trace(dst)
    assert not tf.lengths_estimated
    # The Whitespace pre-tokenizer splits on \w+|[^\w\s]+; with an empty vocabulary each piece
    # is one [UNK] token.
    want = [
        len(re.findall(r"\w+|[^\w\s]+", r.prompt_text or "")) for r in load_trace(FIX / "sharegpt_small.json")
    ]
    assert [r.input_tokens for r in tf] == want and want[0] > 10


def test_synth_poisson_rate_and_const_lengths(capsys, tmp_path):
    dst = tmp_path / "p.jsonl"
    code, out, _ = run(
        capsys, "synth", dst, "--rate", "50", "--requests", "2000", "--arrival", "poisson",
        "--input-dist", "const:128", "--output-dist", "const:16", "--seed", "4",
    )  # fmt: skip
    assert code == 0 and out == f"wrote 2000 synthetic records to {dst}\n"
    recs = list(load_trace(dst))
    t = np.array([r.arrival_s for r in recs])
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
    # 1999 Exp(1/50) gaps: mean 0.02 s, sd of the mean 0.02 / sqrt(1999); allow 5 sd.
    assert abs(np.diff(t).mean() - 0.02) < 5 * 0.02 / math.sqrt(1999)
    assert {(r.input_tokens, r.output_tokens) for r in recs} == {(128, 16)}
    again = tmp_path / "q.jsonl"
    run(capsys, "synth", again, "--rate", "50", "--requests", "2000", "--input-dist", "const:128",
        "--output-dist", "const:16", "--seed", "4")  # fmt: skip
    assert again.read_bytes().splitlines()[1:] == dst.read_bytes().splitlines()[1:]


def test_synth_lognormal_gamma_duration_and_prefix_groups(capsys, tmp_path):
    dst = tmp_path / "g.jsonl"
    code, _, _ = run(
        capsys, "synth", dst, "--rate", "100", "--duration", "30s", "--arrival", "gamma",
        "--burstiness", "0.25", "--input-dist", "lognormal:500,0.5", "--output-dist", "const:8",
        "--prefix-groups", "4", "--prefix-tokens", "64", "--block-size", "16",
    )  # fmt: skip
    assert code == 0
    recs = list(load_trace(dst))
    t = np.array([r.arrival_s for r in recs])
    assert t[-1] < 30.0
    gaps = np.diff(t)
    assert 1.6 < gaps.std() / gaps.mean() < 2.4  # gamma shape 0.25: CV = 1/sqrt(0.25) = 2
    inp = np.array([r.input_tokens for r in recs])
    sd_mean = 500 * math.sqrt(math.exp(0.25) - 1) / math.sqrt(len(inp))
    assert abs(inp.mean() - 500) < 5 * sd_mean
    groups = {r.hash_ids for r in recs}
    assert groups == {tuple(range(g * 4, g * 4 + 4)) for g in range(4)}
    assert all(r.block_size == 16 for r in recs)


def test_synth_empirical_from_trace_and_from_numbers(capsys, tmp_path):
    nums = tmp_path / "n.txt"
    nums.write_text("7\n9\n\n11\n")
    dst = tmp_path / "e.jsonl"
    code, _, _ = run(
        capsys, "synth", dst, "--rate", "10", "--requests", "300", "--input-dist", f"empirical:{AZURE}",
        "--output-dist", f"empirical:{nums}",
    )  # fmt: skip
    assert code == 0
    recs = list(load_trace(dst))
    assert {r.output_tokens for r in recs} == {7, 9, 11}
    assert {r.input_tokens for r in recs} <= {r.input_tokens for r in load_trace(AZURE)}


def test_synth_errors_are_one_line(capsys, tmp_path):
    base = ["synth", tmp_path / "x.jsonl", "--rate", "5", "--output-dist", "const:1"]
    code, _, err = run(capsys, *base, "--input-dist", "const:1")
    assert code == 2 and "give --duration or --requests" in err
    code, _, err = run(capsys, *base, "--requests", "3", "--input-dist", "lognormal:5")
    assert code == 2 and err == "replay: error: --input-dist: bad lognormal parameters '5'\n"
    code, _, err = run(capsys, *base, "--requests", "3", "--input-dist", "zipf:2")
    assert code == 2 and "expected lognormal:MEAN,SIGMA" in err
    bad = tmp_path / "bad.txt"
    bad.write_text("3\nfour\n")
    code, _, err = run(capsys, *base, "--requests", "3", "--input-dist", f"empirical:{bad}")
    assert code == 2 and f"{bad}:2: field 'length': not an integer" in err
