"""How a streamed OpenAI request fails: library exceptions mapped to error kinds, and the
first-token / stall / total deadlines of one request on one lazily re-armed timer.
Used by `openai_http.py`; split from it to keep each module short.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson

from replay.core import errors
from replay.targets.http_config import HTTPTargetConfig


class Failure(Exception):
    """A request-level failure already classified (HTTP status, bad stream, timeout)."""

    def __init__(self, kind: str, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.status = status


def map_exception(exc: BaseException) -> tuple[str, str]:
    """The one place where library exceptions become error kinds: (kind, short detail)."""
    if isinstance(exc, Failure):
        return exc.kind, exc.detail
    if isinstance(exc, aiohttp.ServerTimeoutError):  # only sock_connect is set, so this is the connect
        return errors.CONNECT_TIMEOUT, f"connect timed out: {exc}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, TimeoutError):
            return errors.CONNECT_TIMEOUT, str(exc)
        return errors.CONNECT_REFUSED, str(exc)
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | aiohttp.ClientOSError
                  | ConnectionError):  # fmt: skip
        return errors.CONNECTION_RESET, f"{type(exc).__name__}: {exc}"
    if isinstance(exc, orjson.JSONDecodeError | UnicodeDecodeError | aiohttp.ClientResponseError):
        return errors.MALFORMED, f"{type(exc).__name__}: {exc}"
    if isinstance(exc, aiohttp.ClientError):
        return errors.CONNECTION_RESET, f"{type(exc).__name__}: {exc}"
    return errors.TARGET_ERROR, f"{type(exc).__name__}: {exc}"


class Watchdog:
    """First-token, stall and total deadlines for one request, on one lazily re-armed timer."""

    __slots__ = ("loop", "task", "t0", "first_s", "stall_s", "total_s", "last", "handle", "kind", "detail")

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any], t0: float,
                 cfg: HTTPTargetConfig) -> None:  # fmt: skip
        self.loop = loop
        self.task = task
        self.t0 = t0
        self.first_s = cfg.first_token_timeout_s
        self.stall_s = cfg.stall_timeout_s
        self.total_s = cfg.total_timeout_s
        self.last: float | None = None  # time of the latest token; None before the first
        self.kind: str | None = None  # set when it fired
        self.detail = ""
        self.handle = loop.call_later(self._deadline() - time.perf_counter(), self._fire)

    def _deadline(self) -> float:
        d = self.t0 + self.first_s if self.last is None else self.last + self.stall_s
        return min(d, self.t0 + self.total_s)

    def _fire(self) -> None:
        now = time.perf_counter()
        deadline = self._deadline()
        if now < deadline:
            self.handle = self.loop.call_later(deadline - now, self._fire)
            return
        if now >= self.t0 + self.total_s:
            self.kind, self.detail = errors.TOTAL_TIMEOUT, f"request not finished within {self.total_s:g} s"
        elif self.last is None:
            self.kind, self.detail = errors.FIRST_TOKEN_TIMEOUT, f"no first token within {self.first_s:g} s"
        else:
            self.kind, self.detail = errors.STALL, f"no token for {self.stall_s:g} s"
        self.task.cancel()

    def first_token(self, t: float) -> None:
        """From here the stall deadline applies; re-arm if it falls before the first-token one."""
        self.last = t
        if t + self.stall_s < self.t0 + min(self.first_s, self.total_s):
            self.handle.cancel()
            self.handle = self.loop.call_later(t + self.stall_s - time.perf_counter(), self._fire)

    def cancel(self) -> None:
        self.handle.cancel()
