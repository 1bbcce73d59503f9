"""SSE framing, fed without sockets: whole, byte by byte and at random split points."""

from __future__ import annotations

import random

import pytest

from replay.targets.sse import SSEDecoder


def decode_all(pieces: list[bytes]) -> tuple[list[str], bool]:
    d = SSEDecoder()
    out: list[str] = []
    for p in pieces:
        out.extend(d.feed(p))
    out.extend(d.flush())
    return out, d.partial_tail


def byte_by_byte(stream: bytes) -> list[bytes]:
    return [stream[i : i + 1] for i in range(len(stream))]


def random_splits(stream: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.sample(range(1, len(stream)), k=min(len(stream) - 1, rng.randint(1, 12))))
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]


OPENAI_STREAM = (
    b'data: {"choices":[{"text":" a"}]}\n\n'
    b": keep-alive comment\n\n"
    b'data: {"choices":[{"text":" b\xc3\xa9"}]}\n\n'
    b"data: [DONE]\n\n"
)
OPENAI_EXPECTED = ['{"choices":[{"text":" a"}]}', '{"choices":[{"text":" b\u00e9"}]}', "[DONE]"]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_line_endings_whole_bytewise_random(eol: bytes) -> None:
    stream = OPENAI_STREAM.replace(b"\n", eol)
    assert decode_all([stream]) == (OPENAI_EXPECTED, False)
    assert decode_all(byte_by_byte(stream)) == (OPENAI_EXPECTED, False)
    rng = random.Random(7)
    for _ in range(300):
        assert decode_all(random_splits(stream, rng)) == (OPENAI_EXPECTED, False)


def test_crlf_split_between_feeds_is_one_line_end() -> None:
    d = SSEDecoder()
    assert d.feed(b"data: x\r") == []
    # The LF completes the CRLF of line one; it must not count as a blank line (which would dispatch).
    assert d.feed(b"\ndata: y\r") == []
    assert d.feed(b"\n\r") == []
    assert d.feed(b"\n") == ["x\ny"]


def test_events_are_returned_as_soon_as_complete() -> None:
    d = SSEDecoder()
    assert d.feed(b"data: 1\n") == []
    assert d.feed(b"\n") == ["1"]
    assert d.feed(b"data: 2\n\ndata: 3\n\ndata: 4") == ["2", "3"]
    assert d.feed(b"\n\n") == ["4"]


def test_multiline_data_comments_and_other_fields() -> None:
    stream = (
        b": comment\n"
        b"event: message\n"
        b"id: 7\n"
        b"retry: 100\n"
        b"data: first\n"
        b"data:second-no-space\n"
        b"data:  two-spaces\n"
        b"data\n"
        b"unknown: x\n"
        b"\n"
        b"event: only-event-no-data\n"
        b"\n"
    )
    expected = ["first\nsecond-no-space\n two-spaces\n"]
    assert decode_all([stream]) == (expected, False)
    assert decode_all(byte_by_byte(stream)) == (expected, False)


def test_bom_is_dropped_even_when_split() -> None:
    stream = b"\xef\xbb\xbfdata: a\n\n"
    assert decode_all(byte_by_byte(stream)) == (["a"], False)
    assert decode_all([stream[:2], stream[2:]]) == (["a"], False)


def test_flush_dispatches_event_missing_blank_line_but_drops_unterminated_line() -> None:
    assert decode_all([b"data: [DONE]\n"]) == (["[DONE]"], False)
    assert decode_all([b"data: [DONE]\r"]) == (["[DONE]"], False)
    # Truncated mid-line: the half line is not data.
    assert decode_all([b'data: {"a":1}\n\ndata: {"b"']) == (['{"a":1}'], True)


def test_random_events_against_reference() -> None:
    """Random payloads, separators and splits: the decoder returns exactly the payloads written."""
    rng = random.Random(11)
    for _ in range(200):
        alphabet = "ab {}:\u00e9\u4e2d"
        payloads = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20))) for _ in range(5)]
        eol = rng.choice([b"\n", b"\r\n", b"\r"])
        parts = []
        for p in payloads:
            if rng.random() < 0.3:
                parts.append(b": ping" + eol)
            parts.append(b"data: " + p.encode() + eol + eol)
        stream = b"".join(parts)
        assert decode_all(random_splits(stream, rng))[0] == payloads
