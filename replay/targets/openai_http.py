"""Target for any OpenAI-compatible HTTP server (vLLM, SGLang, llama.cpp, the stub), streaming.

Timing: `sent_s` just before the POST is issued, `first_byte_s` when the response headers are in,
one chunk per SSE event stamped when the bytes that completed it were read (events that arrive
in one read share its stamp: they did arrive together), `end_s` when [DONE] (or EOF) arrives.
The body is parsed incrementally (SSEDecoder + orjson), never buffered whole.

Tokens per chunk: with vLLM's continuous usage stats, the increase of usage.completion_tokens
(a chunk carrying several tokens counts as several); otherwise one per chunk with non-empty text.

Deadlines (first token, stall, total) share one lazily re-armed timer per request: a chunk only
stores its time, and when the timer fires it re-checks the real deadline and re-arms if that is
still ahead, so streaming costs no timer operations per chunk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from replay.core import errors
from replay.core.errors import ReplayError
from replay.core.prompt import TokenIds
from replay.core.request import ERROR, OK, Request, RequestRecord
from replay.targets.http_config import ENDPOINTS, HTTPTargetConfig
from replay.targets.http_failures import Failure as _Failure
from replay.targets.http_failures import Watchdog as _Watchdog
from replay.targets.http_failures import map_exception
from replay.targets.sse import SSEDecoder

__all__ = ["ENDPOINTS", "HTTPTargetConfig", "OpenAIHTTPTarget", "map_exception"]

log = logging.getLogger(__name__)

_JSON = {"Content-Type": "application/json"}
_DETAIL_MAX = 200


class OpenAIHTTPTarget:
    def __init__(self, cfg: HTTPTargetConfig) -> None:
        problems = cfg.problems()
        if problems:
            raise ReplayError(f"{cfg.name}: " + "; ".join(problems))
        self.cfg = cfg
        self.name = cfg.name
        self.base_url = cfg.base_url.rstrip("/")
        root = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        self.root_url = root
        self.metrics_url = root + "/metrics"
        self.model: str | None = cfg.model
        self.vllm_extensions: bool | None = cfg.vllm_extensions
        self.server_version: str | None = None
        self.notes: list[str] = []
        self._chat = cfg.endpoint == "chat"
        self._url = self.base_url + ("/chat/completions" if self._chat else "/completions")
        self._session: aiohttp.ClientSession | None = None
        self._noted_ids_as_words = False

    # ---- lifecycle -----------------------------------------------------------------------------------------

    async def start(self) -> None:
        headers: dict[str, str] = {}
        var = self.cfg.api_key_env
        if var:
            key = os.environ.get(var)
            if key:
                headers["Authorization"] = f"Bearer {key}"
            else:
                # Local servers mostly need no key; one that does answers 401 below, naming the variable.
                self._note(f"api_key_env: ${var} is not set; no API key sent")
        connector = aiohttp.TCPConnector(limit=self.cfg.pool_size, limit_per_host=0, keepalive_timeout=75.0)
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.connect_timeout_s),
        )
        try:
            await self._probe()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def describe(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "kind": "openai_http",
            "name": self.name,
            "base_url": self.base_url,
            "model": self.model,
            "endpoint": c.endpoint,
            "vllm_extensions": self.vllm_extensions,
            "server_version": self.server_version,
            "api_key_env": c.api_key_env,  # the variable's name only, never its value
            "pool_size": c.pool_size,
            "timeouts_s": {
                "connect": c.connect_timeout_s,
                "first_token": c.first_token_timeout_s,
                "stall": c.stall_timeout_s,
                "total": c.total_timeout_s,
            },
            "notes": list(self.notes),
        }

    async def _probe(self) -> None:
        """Reachable, OpenAI-shaped, serving the model; then detect vLLM's extensions."""
        path = urlsplit(self.base_url).path + "/models"
        status, ctype, body = await self._get(self.base_url + "/models")
        not_openai = f"{self.base_url} is not an OpenAI-compatible server: GET {path} returned"
        if status in (401, 403):
            var = self.cfg.api_key_env
            if not var:
                hint = "set api_key_env"
            else:
                hint = f"check ${var}" if os.environ.get(var) else f"${var} is not set"
            raise ReplayError(f"{self.base_url} refused GET {path}: HTTP {status} ({hint})")
        if status != 200:
            raise ReplayError(f"{not_openai} HTTP {status}")
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ReplayError(f"{not_openai} non-JSON ({ctype or 'no content type'})") from None
        data = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(data, list) or not all(isinstance(m, dict) and isinstance(m.get("id"), str)
                                                 for m in data):  # fmt: skip
            raise ReplayError(f"{not_openai} JSON that is not a model list")
        ids = [m["id"] for m in data]
        if not ids:
            raise ReplayError(f"{self.base_url} serves no models (GET {path} returned an empty list)")
        if self.model is None:
            self.model = ids[0]
        elif self.model not in ids:
            served = ", ".join(ids)
            raise ReplayError(f"{self.name}: model: {self.model!r} not served by {self.base_url} ({served})")
        vllm_owned = any(m.get("owned_by") == "vllm" for m in data)
        status, _, body = await self._get(self.root_url + "/version", quiet=True)
        if status == 200:
            try:
                v = orjson.loads(body)
                self.server_version = str(v["version"]) if isinstance(v, dict) and "version" in v else None
            except orjson.JSONDecodeError:
                pass
        if self.vllm_extensions is None:
            self.vllm_extensions = vllm_owned or self.server_version is not None

    async def _get(self, url: str, quiet: bool = False) -> tuple[int, str, bytes]:
        assert self._session is not None
        wait = self.cfg.connect_timeout_s + 30.0
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=wait)) as resp:
                return resp.status, resp.content_type, await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if quiet:
                return 0, "", b""
            os_error = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else None
            if isinstance(os_error, ConnectionRefusedError):
                why = "connection refused"
            elif isinstance(exc, TimeoutError):
                why = f"no answer within {wait:g} s"
            else:
                why = f"{type(exc).__name__}: {exc}"
            raise ReplayError(f"cannot reach {self.base_url}: {why}") from None

    # ---- requests ------------------------------------------------------------------------------------------

    def prepare(self, request: Request) -> bytes:
        """The request's body, made ahead of its send time (the engine's look-ahead calls this)."""
        return self._body(request)

    def _body(self, request: Request) -> bytes:
        n = request.output_tokens
        body: dict[str, Any] = {"model": self.model, "max_tokens": n, "stream": True}
        ids = request.prompt_token_ids
        if self._chat:
            text = request.prompt_text
            if text is None:
                text = self._words(request)
            body["messages"] = [{"role": "user", "content": text}]
        elif isinstance(ids, TokenIds):
            pass  # the ids' cached JSON fragments are joined straight into the body, below
        elif ids is not None:
            body["prompt"] = ids
        else:
            body["prompt"] = request.prompt_text if request.prompt_text is not None else self._words(request)
        if self.vllm_extensions:
            body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
            # Force the output length: a load test must not depend on when the model says EOS.
            body["ignore_eos"] = True
            body["min_tokens"] = n
        else:
            body["stream_options"] = {"include_usage": True}
        if not self._chat and isinstance(ids, TokenIds):
            return ids.json(orjson.dumps(body)[:-1] + b',"prompt":[', b"]}")
        return orjson.dumps(body)

    def _words(self, request: Request) -> str:
        """Chat takes text, not ids: stand in a text of as many words as the prompt has tokens."""
        n = len(request.prompt_token_ids) if request.prompt_token_ids is not None else request.input_tokens
        if not self._noted_ids_as_words:
            self._noted_ids_as_words = True
            self._note(f"{self.cfg.endpoint} endpoint: prompts without text were sent as 'hi hi ...', one "
                       "word per prompt token; the server's own prompt token count may differ")  # fmt: skip
        return ("hi " * n)[:-1]

    def _note(self, note: str) -> None:
        """Something the results should say about how requests were made (goes into describe())."""
        self.notes.append(note)
        log.warning(note)

    async def send(self, request: Request, record: RequestRecord) -> None:
        """Stream one request into `record`. Request-level failures become error kinds; cancellation is
        recorded and re-raised."""
        session = self._session
        if session is None:
            raise ReplayError(f"{self.name}: send() before start()")
        body = request.prepared if request.prepared is not None else self._body(request)
        task = asyncio.current_task()
        assert task is not None
        if record.sent_s is None:
            record.sent_s = time.perf_counter()
        wd = _Watchdog(asyncio.get_running_loop(), task, record.sent_s, self.cfg)
        resp: aiohttp.ClientResponse | None = None
        ok = False
        try:
            resp = await session.post(self._url, data=body, headers=_JSON)
            record.first_byte_s = time.perf_counter()
            record.http_status = resp.status
            if resp.status != 200:
                raise _Failure(errors.http_status_kind(resp.status), await _error_detail(resp), resp.status)
            if resp.content_type != "text/event-stream":
                got = resp.content_type or "no content type"
                raise _Failure(errors.MALFORMED, f"expected text/event-stream, got {got}")
            await self._read_stream(resp, record, wd)
            record.status = OK
            ok = True
        except asyncio.CancelledError:
            if wd.kind is not None and task.uncancel() == 0:
                _fail(record, wd.kind, wd.detail)  # our own deadline, not a cancellation from outside
            else:
                _fail(record, errors.CANCELLED, "request cancelled by the client")
                raise
        except Exception as exc:
            kind, detail = map_exception(exc)
            _fail(record, kind, detail)
        finally:
            wd.cancel()
            if resp is not None:
                if ok:
                    resp.release()  # read to EOF: the connection goes back to the pool
                else:
                    resp.close()  # mid-stream: the connection cannot be reused
        record.finish_tokens()

    async def _read_stream(self, resp: aiohttp.ClientResponse, record: RequestRecord, wd: _Watchdog) -> None:
        decoder = SSEDecoder()
        content = resp.content
        chat = self._chat
        continuous = bool(self.vllm_extensions)
        loads = orjson.loads
        perf = time.perf_counter
        done = finished = False
        prev_completion = 0
        payload = ""
        try:
            while True:
                data = await content.readany()
                t = perf()
                for payload in decoder.feed(data) if data else decoder.flush():
                    if done:
                        continue  # nothing counts after [DONE]
                    if payload == "[DONE]":
                        done = True
                        record.end_s = t
                        continue
                    obj = loads(payload)
                    err = obj.get("error")
                    if err is not None:
                        raise _stream_error(err)
                    usage = obj.get("usage")
                    choices = obj.get("choices")
                    tokens = 0
                    if choices:
                        c = choices[0]
                        if chat:
                            delta = c.get("delta") or {}
                            text = delta.get("content") or delta.get("reasoning_content")
                        else:
                            text = c.get("text")
                        if continuous and usage:
                            n = usage["completion_tokens"]
                            tokens = n - prev_completion
                            prev_completion = n
                        elif text:
                            tokens = 1
                        if c.get("finish_reason") is not None:
                            finished = True
                    if usage:
                        record.usage_output_tokens = usage.get("completion_tokens")
                        record.usage_input_tokens = usage.get("prompt_tokens")
                    if tokens > 0:
                        if wd.last is None:
                            wd.first_token(t)
                        else:
                            wd.last = t
                        record.add_chunk(t, tokens)
                if not data:
                    break
        except (AttributeError, TypeError, KeyError, IndexError) as exc:
            # Valid JSON of the wrong shape (e.g. choices not a list of objects).
            raise _Failure(errors.MALFORMED, f"unexpected event shape ({exc}): {payload[:80]!r}") from None
        if record.end_s is None:
            record.end_s = perf()
        if not done and not finished:
            tail = " (mid-line)" if decoder.partial_tail else ""
            raise _Failure(errors.TRUNCATED, f"stream ended without [DONE] or finish_reason{tail}")


def _stream_error(err: Any) -> _Failure:
    """vLLM reports a failure mid-stream as an event `{"error": {...}}` with an HTTP-like code."""
    msg = err.get("message") if isinstance(err, dict) else err
    code = err.get("code") if isinstance(err, dict) else None
    kind = errors.http_status_kind(code) if isinstance(code, int) and 400 <= code <= 599 else errors.MALFORMED
    return _Failure(kind, f"error event in stream: {str(msg)[:150]}", code if isinstance(code, int) else None)


async def _error_detail(resp: aiohttp.ClientResponse) -> str:
    """A short message from an error body: OpenAI/vLLM `message`, FastAPI `detail`, else the text."""
    raw = b""
    while len(raw) < 4096:
        part = await resp.content.read(4096 - len(raw))
        if not part:
            break
        raw += part
    text = raw.decode("utf-8", "replace")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict):
        inner = doc.get("error") if isinstance(doc.get("error"), dict) else doc
        msg = inner.get("message") or inner.get("detail")
        if msg:
            text = str(msg)
    return f"HTTP {resp.status}: " + " ".join(text.split())


def _fail(record: RequestRecord, kind: str, detail: str) -> None:
    record.status = ERROR
    record.error = kind
    record.error_detail = detail[:_DETAIL_MAX]
    if record.end_s is None:
        record.end_s = time.perf_counter()
