"""Events that arrive in one read are checked in bulk (OpenAIStream._bulk) instead of parsed one by one:
the record must be what parsing each one gives (tokens, ITL samples, finish, usage, failures), for every
shape, whether the events come in one read or one per read.

Truth: the events each test writes itself (token counts and shapes known by construction)."""

from __future__ import annotations

import orjson
import pytest

from replay.core import errors
from replay.core.request import RequestRecord
from replay.targets.http_failures import Failure
from replay.targets.openai_stream import OpenAIStream

HEAD = '{"id":"cmpl-1","object":"text_completion","created":1,"model":"m","choices":['


class WD:
    kind = None
    last: float | None = None
    first: float | None = None

    def first_token(self, t: float) -> None:
        self.first = t

    def cancel(self) -> None:
        pass


def cmpl(text: str, done: int | None, finish: str | None = None, chat: bool = False) -> bytes:
    choice = {"index": 0, "logprobs": None, "finish_reason": finish}
    if chat:
        choice["delta"] = {"content": text}
    else:
        choice["text"] = text
    ev = {**orjson.loads(HEAD + "]}"), "choices": [choice]}
    if done is not None:
        ev["usage"] = {"prompt_tokens": 4, "total_tokens": 4 + done, "completion_tokens": done}
    return orjson.dumps(ev)


def stream_of(n: int, chat: bool, continuous: bool, tokens_per_event: int = 1) -> list[bytes]:
    out = []
    if chat:
        out.append(
            orjson.dumps(
                {
                    **orjson.loads(HEAD + "]}"),
                    "choices": [
                        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    ],
                }
            )
        )
    for i in range(1, n + 1):
        done = i * tokens_per_event if continuous else None
        out.append(cmpl(" tok" * tokens_per_event, done, "length" if i == n else None, chat))
    out.append(orjson.dumps({**orjson.loads(HEAD + "]}"), "choices": [],
                             "usage": {"prompt_tokens": 4, "total_tokens": 4 + n * tokens_per_event,
                                       "completion_tokens": n * tokens_per_event}}))  # fmt: skip
    out.append(b"[DONE]")
    return out


def feed(payloads: list[list[bytes]], chat: bool, continuous: bool) -> RequestRecord:
    """Each inner list is one read (SSE-framed), at t = 1, 2, 3, ... s."""
    rec = RequestRecord(id=1, intended_s=0.0, sent_s=0.5)
    s = OpenAIStream(rec, WD(), chat, continuous)  # type: ignore[arg-type]
    s.head(200, b"text/event-stream", 0.9)
    for i, read in enumerate(payloads):
        s.body([b"data: " + p + b"\n\n" for p in read], float(i + 1))
    s.end(float(len(payloads)))
    rec.finish_tokens()
    return rec


def samples(rec: RequestRecord) -> list[float]:
    return sorted(rec.itls().tolist())


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("continuous", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_one_read_equals_one_event_per_read(chat: bool, continuous: bool, k: int) -> None:
    if k > 1 and not continuous:
        return  # without usage an event counts one token, whatever its text: k is moot
    evs = stream_of(64, chat, continuous, k)
    prelude = [evs[0]] if not chat else evs[:2]  # a first read, so the burst has a gap before it
    rest = evs[len(prelude) :]
    burst = feed([prelude, rest], chat, continuous)
    single = feed([prelude] + [[p] for p in rest], chat, continuous)
    assert burst.output_tokens == single.output_tokens == 64 * k
    assert burst.streamed_tokens() == single.streamed_tokens() == 64 * k
    assert burst.events == 64 and single.events == 64
    # The burst: the first token(s) at 1 s, then 63 events at 2 s: one gap of 1 s (split over that
    # event's k tokens), the rest 0; one read per event: gaps of 1 s.
    assert samples(burst) == sorted([0.0] * (63 * k - 1) + [1.0 / k] * k)
    assert burst.first_token_s == 1.0 and burst.end_s == 2.0


@pytest.mark.parametrize(
    "odd",
    [
        cmpl(" tok", None, "stop"),  # a finish in the middle
        cmpl("", None),  # an empty text (a partial UTF-8 character held back)
        b'{"error":{"message":"boom","code":500}}',  # vLLM's mid-stream error event
        orjson.dumps({"id": "other", "choices": [{"index": 0, "text": " tok", "finish_reason": None}]}),
        HEAD.encode() + b'{"index":0,"text": broken',  # not JSON
        # The stream's own shape, one token, and an error beside it: the error wins.
        HEAD.encode()
        + b'{"index":0,"text":" tok","finish_reason":null}],"error":{"message":"x","code":500}}',
    ],
)
def test_an_odd_event_in_a_burst_is_parsed_as_one_by_one(odd: bytes) -> None:
    evs = stream_of(20, False, False)
    burst_reads = [evs[:1], evs[1:10] + [odd] + evs[10:]]
    single_reads = [evs[:1]] + [[p] for p in evs[1:10] + [odd] + evs[10:]]
    outcomes = []
    for reads in (burst_reads, single_reads):
        try:
            rec = feed(reads, False, False)
            outcomes.append(("ok", rec.output_tokens, rec.streamed_tokens(), rec.events))
        except Failure as f:
            outcomes.append(("failed", f.kind))
        except orjson.JSONDecodeError:
            outcomes.append(("failed", "not JSON"))  # the HTTP target counts it malformed
    assert outcomes[0] == outcomes[1]
    if b'"error":' in odd:
        assert outcomes[0] == ("failed", errors.http_status_kind(500))
    if odd.endswith(b"broken"):
        assert outcomes[0] == ("failed", "not JSON")
    if b'"text":""' in odd:
        assert outcomes[0][2] == 20  # the empty event carried no token


def test_watchdog_sees_a_first_token_that_came_in_bulk() -> None:
    """A chat stream whose first read is the role event alone: its tokens all come in the burst."""
    evs = stream_of(30, True, False)
    rec = RequestRecord(id=1, intended_s=0.0, sent_s=0.5)
    wd = WD()
    s = OpenAIStream(rec, wd, True, False)  # type: ignore[arg-type]
    s.head(200, b"text/event-stream", 0.9)
    s.body([b"data: " + p + b"\n\n" for p in evs[:1]], 1.0)
    s.body([b"data: " + p + b"\n\n" for p in evs[1:]], 2.0)
    assert wd.first == 2.0 and wd.last == 2.0 and rec.first_token_s == 2.0


@pytest.mark.parametrize("chat", [False, True])
def test_continuous_usage_asked_but_only_sent_at_the_end_counts_each_event(chat: bool) -> None:
    """A server that ignores continuous_usage_stats (usage only in its last event, as the stub and
    OpenAI do): every content event is one token, one per read or all in one."""
    evs = stream_of(40, chat, False)
    prelude = [evs[0]] if not chat else evs[:2]
    rest = evs[len(prelude) :]
    for reads in ([prelude, rest], [prelude] + [[p] for p in rest]):
        rec = feed(reads, chat, True)
        assert rec.output_tokens == rec.streamed_tokens() == rec.events == 40
        assert rec.usage_output_tokens == 40
