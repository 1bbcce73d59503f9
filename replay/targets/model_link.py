"""The client's end of the model process: start it, talk to it, stop it, and notice when it dies.

Why apart from the target: the target is about requests (checking prompts, filling records); this
is about a child process and a socket, which must be right on every path. The process is started
from the event-loop thread (PR_SET_PDEATHSIG fires when the *forking thread* exits) in a session
of its own, so a terminal's Ctrl-C reaches only us (our drain, then close, stops it). It also exits
by itself when its socket closes. `close()` sends STOP, then SIGTERM, then SIGKILL, and reaps it;
an atexit hook kills any still running if close() never ran.

Why a session of its own (unlike a started vLLM, replay.targets.server_process): with autogroup
scheduling each session is one CPU-scheduling group, and a group's weight is split over the cores
in proportion to where its load is. In our session, the always-busy model process would hold
nearly all of our group's weight on its core, leaving the generator's core a sliver: on this
2-core machine under other load, 20 s at 12 req/s saw 207 and 347 loop stalls over 5 ms (max 79
and 195 ms) with the model in our session, 17 and 11 (max 48 and 13 ms) in its own; on one
shared core (taskset -c 0, 6 req/s) dispatch lag p99 was 0.65-1.7 s in our session, 12-39 ms in
its own.

Reading never blocks the loop: the socket is an asyncio protocol fed whatever bytes arrived, and
only complete frames are decoded (replay.targets.model_wire).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

from replay.core.errors import ReplayError
from replay.targets import model_wire as w
from replay.targets.server_process import _pdeathsig_preexec, tail

STOP_GRACE_S = 10.0
KILL_GRACE_S = 5.0
RPC_TIMEOUT_S = 30.0

_LIVE: weakref.WeakSet[ModelLink] = weakref.WeakSet()


@atexit.register
def _kill_live() -> None:
    for link in list(_LIVE):
        with contextlib.suppress(Exception):
            link.kill()


def model_cores(configured: tuple[int, ...] | list[int] | None) -> list[int]:
    """The cores the model process gets: all but the lowest available one (the generator's) when
    there are several, else the one there is. 2 cores: core 1; 16 cores: 15; 1 core: shared."""
    if configured:
        return sorted(configured)
    avail = sorted(os.sched_getaffinity(0))
    return avail[1:] if len(avail) > 1 else avail


class _Protocol(asyncio.Protocol):
    def __init__(self, link: ModelLink) -> None:
        self.link = link
        self.reader = w.FrameReader()

    def data_received(self, data: bytes) -> None:
        for msg in self.reader.feed(data):
            self.link._on_message(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self.link._on_lost()


class ModelLink:
    """`on_out(entries)` gets each OUT frame's entries; `on_down(kind, detail)` is called once
    when the process can no longer serve (`"fatal"`: its generation loop died; `"died"`: the
    process exited or closed its socket while we did not ask it to)."""

    def __init__(
        self,
        name: str,
        on_out: Callable[[list[list[Any]]], None],
        on_down: Callable[[str, str], None],
        log_path: Path | None = None,
    ) -> None:
        self.name = name
        self.on_out = on_out
        self.on_down = on_down
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.transport: asyncio.Transport | None = None
        self.info: dict[str, Any] = {}
        self.down: str | None = None
        self._ready: asyncio.Future[dict[str, Any]] | None = None
        self._waiters: dict[int, asyncio.Future[Any]] = {}
        self._token = 0
        self._closing = False
        self._temp_log = False  # a log we made up (no run directory): removed after a clean exit

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def start(self, config: dict[str, Any], threads: int, timeout_s: float) -> dict[str, Any]:
        """Launch, send the configuration, wait for READY (the model loaded and warmed up)."""
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        }
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="replay-model-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
            self._temp_log = True
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "replay.targets.model_process", "--fd", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # see the module docstring: its own autogroup, and no Ctrl-C
                preexec_fn=_pdeathsig_preexec(),
            )
        theirs.close()
        _LIVE.add(self)
        self._ready = loop.create_future()
        self.transport, _ = await loop.create_unix_connection(lambda: _Protocol(self), sock=ours)
        self.write([w.CONFIG, config])
        try:
            self.info = await asyncio.wait_for(self._ready, timeout_s)
        except TimeoutError:
            raise ReplayError(self.failure(f"not ready within {timeout_s:g} s")) from None
        return self.info

    def failure(self, what: str) -> str:
        lines = tail(self.log_path) if self.log_path else []
        last = "".join(f"\n  | {ln}" for ln in lines[-6:])
        return f"{self.name}: model process {what}; log: {self.log_path}{':' + last if last else ''}"

    def write(self, msg: list[Any]) -> bool:
        """Queue one frame (never blocks); False when the socket is gone."""
        t = self.transport
        if t is None or t.is_closing():
            return False
        t.write(w.encode(msg))
        return True

    async def rpc(self, kind: str, *args: Any) -> Any:
        """PING or STATS: one answer, matched by token."""
        if self.down or self.transport is None:
            raise ReplayError(f"{self.name}: model process is not running")
        self._token += 1
        token = self._token
        fut = asyncio.get_running_loop().create_future()
        self._waiters[token] = fut
        self.write([kind, token, *args])
        try:
            return await asyncio.wait_for(fut, RPC_TIMEOUT_S)
        finally:
            self._waiters.pop(token, None)

    async def check_clock(self, tries: int = 5) -> dict[str, float]:
        """The model process reads perf_counter between two reads of ours (the tightest of a few
        pings): one host-wide clock, or refuse to measure with stamps we cannot compare."""
        best: tuple[float, float, float] | None = None
        for _ in range(tries):
            a = time.perf_counter()
            t = await self.rpc(w.PING)
            b = time.perf_counter()
            if best is None or b - a < best[2] - best[0]:
                best = (a, t, b)
        assert best is not None
        a, t, b = best
        if not a <= t <= b:
            raise ReplayError(
                f"{self.name}: the model process's clock is not ours (its perf_counter {t:.6f} outside "
                f"[{a:.6f}, {b:.6f}]): token times could not be compared with send times"
            )
        return {"bracket_ms": round((b - a) * 1000, 3), "offset_ms": round((t - (a + b) / 2) * 1000, 3)}

    def _on_message(self, msg: list[Any]) -> None:
        kind = msg[0]
        if kind == w.OUT:
            self.on_out(msg[1])
        elif kind in (w.PONG, w.STATS):
            fut = self._waiters.get(msg[1])
            if fut is not None and not fut.done():
                fut.set_result(msg[2])
        elif kind == w.READY:
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(msg[1])
        elif kind == w.FATAL:
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(ReplayError(msg[1]))
            elif self.down is None:
                self.down = "fatal"
                self.on_down("fatal", msg[1])

    def _on_lost(self) -> None:
        if self._closing:
            return
        proc = self.proc
        code = proc.poll() if proc is not None else None
        if code is None:
            how = "closed its socket"
        elif code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
        else:
            how = f"exited with code {code}"
        detail = f"model process (pid {self.pid}) {how}"
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(ReplayError(self.failure(f"{how} before it was ready")))
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(ReplayError(f"{self.name}: {detail}"))
        self.down = "died"
        self.on_down("died", detail)

    async def close(self) -> None:
        """STOP, then SIGTERM, then SIGKILL, each after a grace period; reap; idempotent."""
        proc = self.proc
        if proc is None or self._closing:
            return
        self._closing = True
        self.write([w.STOP])
        for sig, grace in (
            (None, STOP_GRACE_S),
            (signal.SIGTERM, KILL_GRACE_S),
            (signal.SIGKILL, KILL_GRACE_S),
        ):
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
            deadline = time.monotonic() + grace
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if proc.poll() is not None:
                break
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        if self._ready is not None and not self._ready.done():
            self._ready.cancel()
        _LIVE.discard(self)
        if self._temp_log and proc.returncode == 0 and self.down is None and self.log_path is not None:
            self.log_path.unlink(missing_ok=True)

    def kill(self) -> None:
        """Interpreter exit with the process still up (close() never ran): end it now."""
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=KILL_GRACE_S)
