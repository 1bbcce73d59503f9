"""Target for any OpenAI-compatible HTTP server (vLLM, SGLang, llama.cpp, the stub), streaming.

Timing: `sent_s` just before the POST is issued, `first_byte_s` when the response headers are in,
one chunk per SSE event stamped when the bytes that completed it were read (events that arrive
in one read share its stamp: they did arrive together), `end_s` when [DONE] (or EOF) arrives.
The generation POSTs go through `http_stream` (a lean HTTP/1.1 client that frames the stream as
it is read; see openai_stream.py for what is taken from each event); the probes (GET /v1/models,
/version) use aiohttp.

Deadlines (first token, stall, total) share one lazily re-armed timer per request: a chunk only
stores its time, and when the timer fires it re-checks the real deadline and re-arms if that is
still ahead, so streaming costs no timer operations per chunk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
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
from replay.targets.http_failures import Watchdog as _Watchdog
from replay.targets.http_failures import map_exception
from replay.targets.http_pool import Pool
from replay.targets.http_stream import Conn
from replay.targets.openai_stream import OpenAIStream

__all__ = ["ENDPOINTS", "HTTPTargetConfig", "OpenAIHTTPTarget", "map_exception"]

log = logging.getLogger(__name__)

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
        self._session: aiohttp.ClientSession | None = None  # the probes
        self._pool: Pool | None = None  # the generation requests
        self._head = b""  # request line and headers up to Content-Length's value
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
        url = urlsplit(self._url)
        https = url.scheme == "https"
        port = url.port or (443 if https else 80)
        tls = ssl.create_default_context() if https else None
        self._pool = Pool(url.hostname or "", port, self.cfg.pool_size, self.cfg.connect_timeout_s, tls)
        lines = [f"POST {url.path}{'?' + url.query if url.query else ''} HTTP/1.1",
                 f"Host: {url.netloc.rpartition('@')[2]}", "User-Agent: replay", "Accept: text/event-stream",
                 "Content-Type: application/json", *(f"{k}: {v}" for k, v in headers.items()),
                 "Content-Length: "]  # fmt: skip
        self._head = "\r\n".join(lines).encode("latin-1")
        try:
            await self._probe()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
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
        missing = [m for m in self.cfg.also_models if m not in ids]
        if missing:
            served = ", ".join(ids)
            raise ReplayError(f"--classes: model {missing[0]!r} not served by {self.base_url} ({served})")
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
        body: dict[str, Any] = {"model": request.model or self.model, "max_tokens": n, "stream": True}
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
        pool = self._pool
        if pool is None:
            raise ReplayError(f"{self.name}: send() before start()")
        body = request.prepared if request.prepared is not None else self._body(request)
        task = asyncio.current_task()
        assert task is not None
        if record.sent_s is None:
            record.sent_s = time.perf_counter()
        wd = _Watchdog(asyncio.get_running_loop(), task, record.sent_s, self.cfg)
        conn: Conn | None = None
        ok = False
        try:
            conn = await pool.acquire()
            stream = OpenAIStream(record, wd, self._chat, bool(self.vllm_extensions))
            await conn.request(self._head + b"%d\r\n\r\n" % len(body), body, stream)
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
            if conn is not None:
                pool.release(conn, ok)  # kept only when its response ended cleanly
        record.finish_tokens()


def _fail(record: RequestRecord, kind: str, detail: str) -> None:
    record.status = ERROR
    record.error = kind
    record.error_detail = detail[:_DETAIL_MAX]
    if record.end_s is None:
        record.end_s = time.perf_counter()
