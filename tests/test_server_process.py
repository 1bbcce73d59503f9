"""ServerProcess lifecycle against small real processes: a fake HTTP server that forks a child
(like vLLM's engine), commands that never become healthy or die early, and a parent that is
itself killed. The truth is the OS process table (psutil), not our own bookkeeping."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import aiohttp
import psutil
import pytest

from replay.core.errors import ReplayError
from replay.targets.server_process import ORPHAN_GRACE_S, ServerProcess, free_port, port_in_use

pytestmark = pytest.mark.timeout(60)

# A /health server that forks a grandchild; with IGNORE_TERM both ignore SIGTERM (forces SIGKILL);
# with ESCAPE the grandchild moves to its own session (leaves the process group).
FAKE_SERVER = textwrap.dedent(
    """
    import http.server, os, signal, subprocess, sys
    port = int(sys.argv[1]); mode = sys.argv[2] if len(sys.argv) > 2 else ""
    if mode == "IGNORE_TERM":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pre = "import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); " if mode == "IGNORE_TERM" else ""
    child = subprocess.Popen([sys.executable, "-c", pre + "import time; time.sleep(300)"],
                             start_new_session=(mode == "ESCAPE"))
    print("child", child.pid, flush=True)
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
        def log_message(self, *a):
            pass
    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
    """
)


def _fake(tmp_path: Path, mode: str = "") -> ServerProcess:
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    return ServerProcess(
        lambda port: [sys.executable, str(script), str(port), mode],
        tmp_path / "server.log",
        startup_timeout_s=20,
        grace_s=1.0,
        name="fake",
    )


def _gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


async def test_start_health_stop_kills_whole_tree(tmp_path: Path) -> None:
    sp = _fake(tmp_path)
    await sp.start()
    try:
        assert sp.alive and sp.returncode is None
        assert sp.port > 0 and port_in_use("127.0.0.1", sp.port)
        async with aiohttp.ClientSession() as http, http.get(sp.url + "/health") as r:
            assert r.status == 200
        for _ in range(50):  # the fork happens right after start-up; wait for it to show
            pids = sp.pids()
            if len(pids) >= 2:
                break
            await asyncio.sleep(0.1)
        assert len(pids) == 2 and pids[0] == sp.pid
    finally:
        t0 = time.monotonic()
        rc = await sp.stop()
    assert time.monotonic() - t0 < 1.0  # SIGTERM was enough: no wait for the grace period
    assert rc == -signal.SIGTERM
    assert _gone(pids) and not sp.alive
    assert await sp.stop() == rc  # idempotent
    assert "stopped, exit code" in (tmp_path / "server.log").read_text()


async def test_server_has_its_own_group_in_our_session(tmp_path: Path) -> None:
    """Own process group (stopped as one, no terminal Ctrl-C), but our session: a session of its
    own is a scheduling group of its own under Linux autogroup, and vLLM's busy-polling engine then
    kept our event loop off the CPU for whole generations (issue 10; see server_process)."""
    sp = _fake(tmp_path)
    await sp.start()
    try:
        assert sp.pid is not None
        assert os.getpgid(sp.pid) == sp.pid != os.getpgid(0)
        assert os.getsid(sp.pid) == os.getsid(0)
    finally:
        await sp.stop()


async def test_sigterm_ignored_escalates_to_sigkill(tmp_path: Path) -> None:
    sp = _fake(tmp_path, "IGNORE_TERM")
    await sp.start()
    for _ in range(50):
        if len(sp.pids()) >= 2:
            break
        await asyncio.sleep(0.1)
    pids = sp.pids()
    assert len(pids) == 2
    t0 = time.monotonic()
    rc = await sp.stop()
    took = time.monotonic() - t0
    assert rc == -signal.SIGKILL
    assert 0.9 <= took < 5.0  # waited the 1 s grace, then killed
    assert _gone(pids)


async def test_crashed_leader_orphans_get_short_grace(tmp_path: Path) -> None:
    sp = _fake(tmp_path, "IGNORE_TERM")
    sp.grace_s = 10.0
    await sp.start()
    for _ in range(50):
        if len(sp.pids()) >= 2:
            break
        await asyncio.sleep(0.1)
    pids = sp.pids()
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)  # the leader crashes; its child lives on, ignoring SIGTERM
    await asyncio.sleep(0.2)
    assert not sp.alive and sp.returncode == -signal.SIGKILL
    t0 = time.monotonic()
    await sp.stop()
    took = time.monotonic() - t0
    assert ORPHAN_GRACE_S - 0.1 <= took < ORPHAN_GRACE_S + 3 and _gone(pids)


async def test_descendant_that_left_the_group_is_killed_too(tmp_path: Path) -> None:
    sp = _fake(tmp_path, "ESCAPE")
    await sp.start()
    for _ in range(50):
        if len(sp.pids()) >= 2:
            break
        await asyncio.sleep(0.1)
    pids = sp.pids()
    assert len(pids) == 2 and os.getpgid(pids[1]) != os.getpgid(pids[0])
    await sp.stop()
    assert _gone(pids)


async def test_given_port_in_use_refuses_and_starts_nothing(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        marker = tmp_path / "never_written"
        sp = ServerProcess(
            [sys.executable, "-c", f"open({str(marker)!r}, 'w')"], tmp_path / "x.log", port=port
        )
        with pytest.raises(ReplayError, match=rf"port {port} on 127.0.0.1 is already in use"):
            await sp.start()
    assert sp.pid is None and sp.pids() == [] and not sp.alive
    await asyncio.sleep(0.3)
    assert not marker.exists()


async def test_startup_timeout_names_log_and_leaves_no_orphan(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "print('loading weights...', flush=True); import time; time.sleep(60)"]
    sp = ServerProcess(cmd, tmp_path / "slow.log", startup_timeout_s=1.5, grace_s=1.0, name="slowsrv")
    t0 = time.monotonic()
    with pytest.raises(ReplayError) as ei:
        await sp.start()
    took = time.monotonic() - t0
    msg = str(ei.value)
    assert "slowsrv not healthy" in msg and "within 1.5 s" in msg
    assert str(tmp_path / "slow.log") in msg and "loading weights..." in msg
    assert 1.5 <= took < 6.0
    assert sp.pid is not None and _gone([sp.pid])
    assert sp.returncode == -signal.SIGTERM


async def test_early_exit_reports_code_and_last_lines(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import sys; print('ValueError: bad model'); sys.exit(3)"]
    sp = ServerProcess(cmd, tmp_path / "crash.log", startup_timeout_s=30)
    t0 = time.monotonic()
    with pytest.raises(ReplayError, match=r"exited with code 3 before .*/health answered") as ei:
        await sp.start()
    assert time.monotonic() - t0 < 10  # did not wait for the 30 s deadline
    assert "ValueError: bad model" in str(ei.value) and "crash.log" in str(ei.value)


async def test_missing_executable_is_a_replay_error(tmp_path: Path) -> None:
    sp = ServerProcess(["/nonexistent/vllm-binary"], tmp_path / "m.log")
    with pytest.raises(ReplayError, match="cannot run '/nonexistent/vllm-binary'"):
        await sp.start()


async def test_context_manager_stops_on_exception(tmp_path: Path) -> None:
    sp = _fake(tmp_path)
    with pytest.raises(RuntimeError, match="run failed"):
        async with sp:
            pid = sp.pid
            raise RuntimeError("run failed")
    assert pid is not None and _gone([pid])


# The parent process itself is stopped: by SIGTERM (handler installed by ServerProcess) or by
# SIGKILL (PR_SET_PDEATHSIG takes the leader down). Either way, no server is left behind.
PARENT = textwrap.dedent(
    """
    import asyncio, sys, time
    from pathlib import Path
    from replay.targets.server_process import ServerProcess
    async def main():
        cmd = lambda port: [sys.executable, sys.argv[1], str(port)]
        sp = ServerProcess(cmd, Path(sys.argv[2]), startup_timeout_s=20)
        await sp.start()
        print(sp.pid, flush=True)
        await asyncio.sleep(120)
    asyncio.run(main())
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_parent_killed_leaves_no_server(tmp_path: Path, sig: int) -> None:
    (tmp_path / "fake_server.py").write_text(FAKE_SERVER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path / "fake_server.py"), str(tmp_path / "p.log")],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert parent.stdout is not None
        leader = int(parent.stdout.readline())
        assert psutil.pid_exists(leader)
        parent.send_signal(sig)
        parent.wait(timeout=20)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not _gone([leader]):
            time.sleep(0.1)
        assert _gone([leader])
        if sig == signal.SIGTERM:  # our handler stopped the whole group, grandchild included
            assert _gone([p.pid for p in psutil.process_iter() if _pgid(p.pid) == leader])
    finally:
        parent.kill()
        parent.wait()
        with contextlib.suppress(OSError):  # after SIGKILL the grandchild is left to us (see module doc)
            os.killpg(leader, signal.SIGKILL)


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def test_free_port_is_bindable() -> None:
    p = free_port()
    assert 0 < p < 65536 and not port_in_use("127.0.0.1", p)


STARTING = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from replay.targets.server_process import ServerProcess
    async def main():
        cmd = [sys.executable, "-c", "import time; time.sleep(120)"]
        sp = ServerProcess(cmd, Path(sys.argv[1]), startup_timeout_s=100, grace_s=2)
        task = asyncio.create_task(sp.start())
        while sp.pid is None:
            await asyncio.sleep(0.01)
        print(sp.pid, flush=True)
        await task
    asyncio.run(main())
    """
)


def test_ctrl_c_during_startup_stops_the_server(tmp_path: Path) -> None:
    """Ctrl-C while the server loads (vLLM: a minute): asyncio.run cancels start(), which stops it."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    parent = subprocess.Popen(
        [sys.executable, "-c", STARTING, str(tmp_path / "s.log")], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert parent.stdout is not None
        leader = int(parent.stdout.readline())
        time.sleep(0.3)
        parent.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        parent.wait(timeout=20)
        assert time.monotonic() - t0 < 5  # no wait for the 100 s deadline
        assert parent.returncode != 0
        assert _gone([leader])
    finally:
        parent.kill()
        parent.wait()
        with contextlib.suppress(OSError):
            os.killpg(leader, signal.SIGKILL)
