"""The one interface the engine sees. A target knows how to send; it knows nothing of
statistics, schedules or other targets.

Lifecycle: `await start()` once (load a model, launch or attach to a server, warm up),
`await send(request, record)` many times concurrently, `await close()` once, also after
failures. `send` fills the record's timing and token fields with `time.perf_counter()`
stamps and sets `status`/`error`; it must not raise for request-level failures (map them
to an error kind from `replay.core.errors`), only `ReplayError` for a target that cannot work at all.

Optional: `prepare(request) -> bytes`, the request's wire form (an HTTP body). The engine's
look-ahead calls it before the request's send time and stores the result in `request.prepared`,
which `send` then uses as is, so a burst of large prompts costs the send only its write.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from replay.core.request import Request, RequestRecord


@runtime_checkable
class Target(Protocol):
    name: str

    async def start(self) -> None: ...

    async def send(self, request: Request, record: RequestRecord) -> None: ...

    async def close(self) -> None: ...

    def describe(self) -> dict[str, Any]:
        """Config and versions for summary.json (no secrets)."""
        ...
