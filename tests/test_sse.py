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


def reference(stream: bytes) -> list[bytes]:
    """The spec's line-by-line algorithm, written plainly, as the truth for the decoder's fast path."""
    if stream.startswith(b"\xef\xbb\xbf"):
        stream = stream[3:]
    lines = stream.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    lines.pop()  # after the last line end: unterminated, dropped
    out: list[bytes] = []
    data: list[bytes] | None = None
    for line in lines:
        if line == b"":
            if data is not None:
                out.append(b"\n".join(data))
            data = None
            continue
        name, colon, value = line.partition(b":")
        if name == b"data":
            data = (data or []) + [value[1:] if value.startswith(b" ") else value]
    if data is not None:
        out.append(b"\n".join(data))  # flush: the event missing only its blank line
    return out


def test_bytes_api_against_the_plain_algorithm() -> None:
    """Events of every shape (one line, several data lines, `data:` without its space, bare `data`,
    comments and other fields between, runs of blank lines), every line ending, random splits: the
    bytes the fast path returns are exactly what the line-by-line algorithm gives."""
    rng = random.Random(23)
    shapes = [
        lambda p: [b"data: " + p],
        lambda p: [b"data: " + p, b"data: " + p[::-1]],
        lambda p: [b"data:" + p],
        lambda p: [b"data"],
        lambda p: [b": ping", b"data: " + p],
        lambda p: [b"event: x", b"data: " + p, b"id: 3"],
        lambda p: [b"retry: 5"],  # no data: dispatches nothing
    ]
    for _ in range(400):
        eol = rng.choice([b"\n", b"\r\n", b"\r"])
        parts = []
        for _ in range(rng.randint(1, 8)):
            p = bytes(rng.choice(b"ab {}:\xc3\xa9") for _ in range(rng.randint(0, 12)))
            parts.append(eol.join(rng.choice(shapes)(p)) + eol * rng.randint(2, 4))
        stream = b"".join(parts)
        if rng.random() < 0.3:
            stream = stream[: rng.randint(1, len(stream))]  # cut anywhere
        want = reference(stream)
        for pieces in ([stream], random_splits(stream, rng) if len(stream) > 1 else [stream]):
            d = SSEDecoder()
            got = [e for p in pieces for e in d.events(p)] + d.flush_events()
            assert got == want, (stream, pieces)
            assert all(isinstance(e, bytes) for e in got)
            # The same pieces handed over a few at a time (as one socket read's HTTP chunks are).
            d = SSEDecoder()
            got = []
            for i in range(0, len(pieces), 3):
                got += d.events_of(pieces[i : i + 3])
            assert got + d.flush_events() == want, (stream, pieces)


def test_one_event_per_piece_fast_path_keeps_order_and_state() -> None:
    """Token streams arrive one event per HTTP chunk; pieces that are not exactly one event (a split
    event, a comment, CRLF, a multi-line event) go the slow way, and the order of events holds."""
    ev = [b"data: %d\n\n" % i for i in range(6)]
    pieces = [b"\xef\xbb\xbf" + ev[0], ev[1], b"data: 2", b"\n\n", ev[3], b": ping\n\n", b"data: 4\r\n\r\n",
              b"data: x\ndata: y\n\n", ev[5], b"data: 6\n"]  # fmt: skip
    d = SSEDecoder()
    got = d.events_of(pieces[:4]) + d.events_of(pieces[4:]) + d.flush_events()
    assert got == [b"0", b"1", b"2", b"3", b"4", b"x\ny", b"5", b"6"]
    assert d.events_of([b"data: [DONE]\n\n"]) == [b"[DONE]"]


def test_many_pieces_at_once_against_the_plain_algorithm() -> None:
    """A read of many pieces first tries them as one run of plain `data: X` events (C-level scans);
    mostly plain streams with an odd line here and there, cut anywhere, handed over 8-40 pieces at a
    time: exactly what the line-by-line algorithm gives."""
    rng = random.Random(29)
    odd = [b": ping\n\n", b"data: a\ndata: b\n\n", b"data: c\r\n\r\n", b"data:d\n\n", b"event: e\n\n",
           b"data: f\n\n\n", b"\n", b"data: \n\n", b"data: g\rdata: h\r\r"]  # fmt: skip
    for _ in range(300):
        parts = []
        for i in range(rng.randint(5, 60)):
            if rng.random() < 0.05:
                parts.append(rng.choice(odd))
            else:
                text = bytes(rng.choice(b"ab :{}") for _ in range(5))
                parts.append(b'data: {"n":%d,"t":"%s"}\n\n' % (i, text))
        if rng.random() < 0.2:
            parts[0] = b"\xef\xbb\xbf" + parts[0]  # a BOM, which the stream's first bytes may carry
        stream = b"".join(parts)
        # Half the time one event per piece, as servers write them; else cut anywhere.
        pieces = parts if rng.random() < 0.5 else random_splits(stream, rng)
        want = reference(stream)
        d = SSEDecoder()
        got: list[bytes] = []
        i = 0
        while i < len(pieces):
            k = rng.randint(8, 40)
            got += d.events_of(pieces[i : i + k])
            i += k
        assert got + d.flush_events() == want, (stream, pieces)
