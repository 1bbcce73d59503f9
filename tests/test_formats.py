"""Loaders against the real upstream samples (traces/samples/) and hand-made fixtures of the forms
no sample covers (tests/fixtures/). Truths are computed here independently of the loaders."""

from __future__ import annotations

import json
import math
from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from replay.core.errors import ReplayError
from replay.trace.formats import FORMATS, detect_format, load_trace, read_trace
from replay.trace.load_json import iter_json_array
from replay.trace.model import TraceRecord, make_header, write_trace

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "traces" / "samples"
FIX = ROOT / "tests" / "fixtures"


def _csv_rows(path: Path) -> list[list[str]]:
    lines = path.read_bytes().decode().splitlines()
    return [ln.split(",") for ln in lines[1:] if ln]


def _azure_seconds(ts: str) -> Decimal:
    """Independent truth: seconds since midnight as an exact decimal (samples stay in one day)."""
    hms = ts.split(" ")[1]
    h, m, s = hms.split(":")
    return Decimal(h) * 3600 + Decimal(m) * 60 + Decimal(s)


@pytest.mark.parametrize("name", ["azure_llm_2023_code_sample.csv", "azure_llm_2023_conv_sample.csv"])
def test_azure_2023_samples(name):
    path = SAMPLES / name
    raw = path.read_bytes()
    assert b"\r\n" in raw  # the quirk under test: CRLF line ends
    rows = _csv_rows(path)
    assert all(len(r[0].split(".")[1]) == 7 for r in rows)  # 7 fractional digits
    tf = load_trace(path)
    assert tf.format == "azure" and tf.timed
    recs = list(tf)
    assert len(recs) == len(rows) == 200
    t0 = _azure_seconds(rows[0][0])
    for rec, row, line in zip(recs, rows, range(2, 202), strict=True):
        assert rec.arrival_s == pytest.approx(float(_azure_seconds(row[0]) - t0), abs=1e-9)
        assert (rec.input_tokens, rec.output_tokens) == (int(row[1]), int(row[2]))
        assert rec.source_line == line
        assert rec.hash_ids == () and rec.session_id is None
    assert tf.stats.records == 200 and tf.stats.bad_rows == 0 and not tf.stats.notices


def test_azure_2024_form_timezone_and_mixed_precision():
    recs = list(load_trace(FIX / "azure_2024_form.csv"))
    # 00:00:00.009930 is the origin; "00:00:01+00:00" has no fraction; the last row is written
    # in +02:00 and is 00:00:02.000001 UTC.
    expect = [0.0, 0.007405, 0.012384, 0.027915, 0.07396, 0.99007, 1.49007, 1.990071]
    assert [r.arrival_s for r in recs] == pytest.approx(expect, abs=1e-12)
    assert [r.input_tokens for r in recs][:3] == [2162, 2399, 76]


def test_azure_mixing_zoned_and_naive_times_is_an_error(tmp_path):
    p = tmp_path / "mixed.csv"
    p.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2024-05-10 00:00:00+00:00,1,1\n2024-05-10 00:00:01,1,1\n"
    )
    with pytest.raises(ReplayError, match=r"mixed\.csv:3: field 'TIMESTAMP': mixes times"):
        list(load_trace(p))


def test_vidur_sample_matches_the_azure_trace_it_was_derived_from():
    azure = list(load_trace(SAMPLES / "azure_llm_2023_conv_sample.csv"))
    vidur = load_trace(SAMPLES / "vidur_splitwise_conv_processed_sample.csv")
    assert vidur.format == "vidur" and vidur.timed
    got = list(vidur)
    assert len(got) == len(azure)
    for a, v in zip(azure, got, strict=True):
        assert v.arrival_s == pytest.approx(a.arrival_s, abs=2e-6)
        assert (v.input_tokens, v.output_tokens) == (a.input_tokens, a.output_tokens)


def test_vidur_without_arrivals_is_untimed(tmp_path):
    p = tmp_path / "lengths.csv"
    p.write_text("num_prefill_tokens,num_decode_tokens\n10,2\n20,3\n")
    tf = load_trace(p)
    assert tf.format == "vidur" and not tf.timed
    assert [(r.arrival_s, r.input_tokens, r.output_tokens) for r in tf] == [(0.0, 10, 2), (0.0, 20, 3)]


def test_splitwise_sample():
    tf = load_trace(SAMPLES / "splitwise_sim_test_trace.csv")
    assert tf.format == "splitwise"
    got = [(r.arrival_s, r.input_tokens, r.output_tokens) for r in tf]
    assert got == [(0.0, 4096, 32), (2.0, 2048, 8), (3.0, 2048, 16)]


def test_burstgpt_sample_columns_by_name():
    tf = load_trace(SAMPLES / "burstgpt_1_first3rows_quoted.csv")
    assert tf.format == "burstgpt"
    got = [(r.arrival_s, r.input_tokens, r.output_tokens) for r in tf]
    assert got == [(0.0, 472, 18), (40.0, 1087, 230), (113.0, 417, 276)]


def test_burstgpt_failures_dropped_and_counted_or_kept_and_sessions():
    notices: list[str] = []
    tf = load_trace(FIX / "burstgpt_sessions.csv", notice=notices.append)
    recs = list(tf)
    # Rows at 10 s (two), 11, 13, 14; the two zero-response rows are failures. The origin is the
    # first row even though a failure shares its second.
    assert [(r.arrival_s, r.session_id) for r in recs] == [(0.0, "s1"), (1.0, "s1"), (4.0, None)]
    assert tf.stats.dropped == {"failed request (Response tokens = 0)": 2}
    assert tf.stats.rows == 5 and tf.stats.records == 3
    assert notices == [f"{FIX / 'burstgpt_sessions.csv'}:1: ignoring unknown column(s): Region"]
    kept = list(load_trace(FIX / "burstgpt_sessions.csv", keep_failures=True, notice=notices.append))
    assert [r.output_tokens for r in kept] == [18, 0, 30, 0, 276]
    assert len(notices) == 2  # one notice per TraceFile, not per pass


def test_burstgpt_failure_at_the_start_still_sets_the_origin(tmp_path):
    p = tmp_path / "b.csv"
    p.write_text("Timestamp,Request tokens,Response tokens\n5,10,0\n7,10,3\n")
    assert [r.arrival_s for r in load_trace(p)] == [2.0]


@pytest.mark.parametrize(
    "name", ["mooncake_fast25_conversation_sample.jsonl", "mooncake_fast25_synthetic_sample.jsonl"]
)
def test_mooncake_samples(name):
    path = SAMPLES / name
    truth = [json.loads(line) for line in path.read_text().splitlines()]
    tf = load_trace(path)
    assert tf.format == "mooncake"
    recs = list(tf)
    assert len(recs) == len(truth) == 200
    t0 = truth[0]["timestamp"]
    for rec, row in zip(recs, truth, strict=True):
        assert rec.arrival_s == pytest.approx((row["timestamp"] - t0) / 1000, abs=1e-12)
        assert (rec.input_tokens, rec.output_tokens) == (row["input_length"], row["output_length"])
        assert rec.hash_ids == tuple(row["hash_ids"]) and rec.block_size == 512
        assert len(rec.hash_ids) == math.ceil(rec.input_tokens / 512)


def test_mooncake_too_few_blocks_is_a_row_error(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text(
        '{"timestamp": 0, "input_length": 600, "output_length": 1, "hash_ids": [0, 1]}\n'
        '{"timestamp": 5, "input_length": 1100, "output_length": 1, "hash_ids": [0, 1]}\n'
    )
    with pytest.raises(ReplayError, match=r"m\.jsonl:2: field 'hash_ids': too few blocks: 2 x 512"):
        list(load_trace(p))


def test_bailian_form_sessions_and_16_token_blocks():
    tf = load_trace(FIX / "bailian_form.jsonl")
    assert tf.format == "bailian"
    recs = list(tf)
    assert [r.arrival_s for r in recs] == [0.0, 0.25, 1.125, 2.5]
    assert [r.session_id for r in recs] == ["0", "1", "0", "0"]  # root of each chat chain
    assert [r.parent_id for r in recs] == [None, None, "0", "2"]
    assert all(r.block_size == 16 for r in recs)
    assert recs[3].hash_ids == (0, 1, 4, 5, 7, 8, 9)


def test_servegen_offline_hash_trace_needs_an_output_length():
    path = SAMPLES / "servegen_offline_trace_a_sample.jsonl"
    with pytest.raises(ReplayError, match=r"trace_a_sample\.jsonl:1: field 'output_length': missing"):
        list(load_trace(path))
    tf = load_trace(path, default_output_tokens=32)
    assert tf.format == "servegen-offline" and not tf.timed
    recs = list(tf)
    truth = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(recs) == 10
    for rec, row in zip(recs, truth, strict=True):
        assert rec.arrival_s == 0.0 and rec.output_tokens == 32
        assert rec.input_tokens == row["input_length"] and rec.hash_ids == tuple(row["hash_ids"])
        assert rec.block_size == 16
    # All ten share the first ten blocks (a common 160-token instruction prefix).
    assert all(r.hash_ids[:10] == tuple(range(10)) for r in recs)


def test_servegen_offline_stat_trace():
    recs = list(load_trace(SAMPLES / "servegen_offline_trace_d_sample.jsonl"))
    assert len(recs) == 20
    assert (recs[0].input_tokens, recs[0].output_tokens) == (61, 2370)
    assert all(r.hash_ids == () and r.block_size == 0 for r in recs)


def test_servegen_rate_profile_is_recognised_and_refused():
    with pytest.raises(ReplayError, match="ServeGen chunk-.*not a per-request trace"):
        load_trace(SAMPLES / "servegen_language_m-large_chunk-0-trace_sample.csv")


def test_sharegpt_array_streamed_with_escapes_and_brackets_in_strings():
    path = FIX / "sharegpt_small.json"
    tf = load_trace(path)
    assert tf.format == "sharegpt" and not tf.timed and tf.lengths_estimated
    recs = list(tf)
    whole = orjson.loads(path.read_bytes())
    assert [r.session_id for r in recs] == ["conv-a", "conv-b", "conv-d"]
    assert recs[0].prompt_text == whole[0]["conversations"][0]["value"]
    assert recs[1].prompt_text == "hi"  # first human turn followed by a model turn
    # Lengths estimated at ceil(characters / 4), counted by hand from the fixture: conv-a's prompt
    # is 53 characters (14) and its reply 87 (22, the JSON "\\" is one character); conv-b's "hi"
    # is 2 (1) and "hello there, how can I help you today?" 38 (10); conv-d's prompt 36 (9), "yes" 3 (1).
    assert [(r.input_tokens, r.output_tokens) for r in recs] == [(14, 22), (1, 10), (9, 1)]
    assert tf.stats.dropped == {"no human turn followed by a model reply": 1}
    assert [r.source_line for r in recs] == [2, 6, 16]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 1 << 20])
def test_json_array_splitter_is_chunk_size_independent(chunk):
    path = FIX / "sharegpt_small.json"
    with open(path, "rb") as fh:
        parts = [orjson.loads(raw) for _, raw in iter_json_array(fh, chunk_size=chunk)]
    assert parts == orjson.loads(path.read_bytes())


def test_sharegpt_lengths_from_a_tokenizer_when_given():
    words = lambda s: len(s.split())  # noqa: E731 - a stand-in tokenizer with a known count
    tf = load_trace(FIX / "sharegpt_small.json", count_tokens=words)
    assert not tf.lengths_estimated
    assert [r.input_tokens for r in tf] == [8, 1, 5]


def test_sharegpt_truncated_array_is_an_error(tmp_path):
    p = tmp_path / "cut.json"
    p.write_bytes((FIX / "sharegpt_small.json").read_bytes()[:300])
    with pytest.raises(ReplayError, match=r"cut\.json: field 'record': file ends inside"):
        list(load_trace(p))


def test_our_jsonl_round_trip(tmp_path):
    recs = [
        TraceRecord(0.0, 100, 10, hash_ids=(1, 2), block_size=64, session_id="a"),
        TraceRecord(0.5, 3, 4, prompt_token_ids=[7, 8, 9], parent_id="a"),
        TraceRecord(1.25, 5, 6, prompt_text="hello world"),
    ]
    p = tmp_path / "t.jsonl"
    assert write_trace(p, recs, make_header("test")) == 3
    assert detect_format(p) == "replay"
    back = list(read_trace(p))
    for a, b in zip(recs, back, strict=True):
        b.source_line = a.source_line = 0
        assert a == b


def test_our_jsonl_header_checked(tmp_path):
    p = tmp_path / "t.jsonl"
    rec = '{"arrival_s": 0, "input_tokens": 1, "output_tokens": 1}\n'
    p.write_text('{"replay_trace": 2, "source": "x"}\n' + rec)
    with pytest.raises(ReplayError, match=r"t\.jsonl:1: field 'replay_trace': version 2 not supported"):
        list(load_trace(p))
    p.write_text(rec)
    with pytest.raises(ReplayError, match=r"t\.jsonl:1: field 'replay_trace': missing header"):
        list(load_trace(p, "replay"))


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("azure_llm_2023_code_sample.csv", "azure"),
        ("burstgpt_1_first3rows_quoted.csv", "burstgpt"),
        ("mooncake_fast25_synthetic_sample.jsonl", "mooncake"),
        ("servegen_offline_trace_d_sample.jsonl", "servegen-offline"),
        ("splitwise_sim_test_trace.csv", "splitwise"),
        ("vidur_splitwise_conv_processed_sample.csv", "vidur"),
    ],
)
def test_detection(name, fmt):
    assert detect_format(SAMPLES / name) == fmt


def test_format_override_and_unknown_format():
    # Forcing Vidur onto an Azure file fails on the header, naming the missing column.
    with pytest.raises(ReplayError, match=r":1: field 'num_prefill_tokens': missing column"):
        list(load_trace(SAMPLES / "azure_llm_2023_code_sample.csv", "vidur"))
    with pytest.raises(ReplayError, match="unknown trace format 'nope'"):
        load_trace(SAMPLES / "azure_llm_2023_code_sample.csv", "nope")
    assert set(FORMATS) >= {"azure", "burstgpt", "mooncake", "bailian", "sharegpt", "replay"}


# --- malformed rows ---------------------------------------------------------------------------

AZ_HEAD = "TIMESTAMP,ContextTokens,GeneratedTokens\r\n"
AZ_OK = "2023-11-16 18:17:03.9799600,4808,10\r\n"


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, newline="")
    return p


def test_truncated_csv_line_names_file_line_field(tmp_path):
    p = _write(tmp_path, "a.csv", AZ_HEAD + AZ_OK + "2023-11-16 18:17:04.0319600,3180\r\n")
    with pytest.raises(ReplayError) as e:
        list(load_trace(p))
    assert str(e.value) == f"{p}:3: field 'GeneratedTokens': missing (row has 2 of 3 columns)"


def test_non_numeric_field(tmp_path):
    p = _write(tmp_path, "a.csv", AZ_HEAD + AZ_OK + "2023-11-16 18:17:04.0319600,abc,8\r\n")
    with pytest.raises(ReplayError, match=rf"^{p}:3: field 'ContextTokens': not an integer: 'abc'$"):
        list(load_trace(p))


def test_bad_timestamp(tmp_path):
    p = _write(tmp_path, "a.csv", AZ_HEAD + AZ_OK + "2023-13-16 18:17:04,1,8\r\n")
    with pytest.raises(ReplayError, match=rf"^{p}:3: field 'TIMESTAMP': bad date"):
        list(load_trace(p))


def test_missing_column(tmp_path):
    p = _write(tmp_path, "a.csv", "TIMESTAMP,ContextTokens\r\n2023-11-16 18:17:03.9,1\r\n")
    with pytest.raises(ReplayError, match=rf"^{p}:1: field 'GeneratedTokens': missing column"):
        load_trace(p, "azure").__iter__().__next__()


def test_jsonl_truncated_line_and_bad_field(tmp_path):
    good = '{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [0]}\n'
    p = _write(tmp_path, "m.jsonl", good + '{"timestamp": 10, "input_len\n')
    with pytest.raises(ReplayError, match=rf"^{p}:2: field 'record': invalid JSON"):
        list(load_trace(p))
    p = _write(tmp_path, "m.jsonl", good + '{"timestamp": 10, "input_length": "ten", "output_length": 2}\n')
    with pytest.raises(ReplayError, match=rf"^{p}:2: field 'input_length': not an integer: 'ten'$"):
        list(load_trace(p))


def test_skip_bad_rows_counts_instead(tmp_path):
    text = (
        AZ_HEAD
        + AZ_OK
        + "2023-11-16 18:17:04.0319600,3180\r\n"  # truncated
        + "2023-11-16 18:17:04.1,x,1\r\n"  # non-numeric
        + "2023-11-16 18:17:03.5,5,1\r\n"  # earlier than its predecessor
        + "2023-11-16 18:17:05.9799600,7,2\r\n"
    )
    p = _write(tmp_path, "a.csv", text)
    with pytest.raises(ReplayError, match=r":3: field 'GeneratedTokens'"):
        list(load_trace(p))  # strict: the first bad row stops the load
    tf = load_trace(p, skip_bad_rows=True)
    recs = list(tf)
    assert [(r.arrival_s, r.input_tokens) for r in recs] == [(0.0, 4808), (pytest.approx(2.0), 7)]
    assert tf.stats.bad_rows == 3 and tf.stats.unsorted_rows == 1 and tf.stats.rows == 5
    assert [m.split(": field")[0] for m in tf.stats.bad_examples] == [f"{p}:{n}" for n in (3, 4, 5)]


def test_unsorted_rows_are_errors_unless_allowed(tmp_path):
    p = _write(tmp_path, "a.csv", AZ_HEAD + AZ_OK + "2023-11-16 18:17:03.5,5,1\r\n")
    with pytest.raises(
        ReplayError, match=rf"^{p}:3: field 'TIMESTAMP': arrives 0.47996 s before the previous row"
    ):
        list(load_trace(p))
    got = [r.arrival_s for r in load_trace(p, allow_unsorted=True)]
    assert got == pytest.approx([0.0, -0.47996])  # `convert --sort` re-bases after sorting


def test_streaming_reads_lazily(tmp_path):
    """A bad row deep in the file is not met until iteration reaches it."""
    p = _write(tmp_path, "a.csv", AZ_HEAD + AZ_OK * 3 + "garbage,1,1\r\n")
    it = iter(load_trace(p))
    assert next(it).input_tokens == 4808
    with pytest.raises(ReplayError, match=":5: field 'TIMESTAMP'"):
        list(it)


def test_trace_file_is_reiterable():
    tf = load_trace(SAMPLES / "mooncake_fast25_conversation_sample.jsonl")
    assert list(tf) == list(tf)
