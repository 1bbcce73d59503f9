"""Run a command on a pseudo-terminal and keep what a user would see: the raw byte stream, the
frames drawn over time, and the final screen (pyte, a VT100 emulator, replays the escape codes).

A "screenshot" is the screen's text at a moment: `frames` holds one per read from the terminal,
so a test can look at what was shown mid-run, not only at what stayed on screen at the end.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import subprocess
import termios
import time
from dataclasses import dataclass, field

import pyte

COLS, ROWS = 140, 60


@dataclass
class Capture:
    returncode: int
    raw: bytes
    screen: list[str]  # the final screen, one string per row (trailing blanks stripped)
    frames: list[str] = field(default_factory=list)  # the whole screen after each read, joined
    cells: list[list[tuple[str, str, bool]]] = field(default_factory=list)  # final (char, fg, bold)

    def colours(self, word: str) -> list[tuple[str, bool]]:
        """(foreground colour, bold) of the first letter of each place `word` is on the final screen."""
        out = []
        for y, row in enumerate(self.screen):
            x = row.find(word)
            while x >= 0:
                _, fg, bold = self.cells[y][x]
                out.append((fg, bold))
                x = row.find(word, x + 1)
        return out

    @property
    def text(self) -> str:
        return "\n".join(self.screen).rstrip()

    def shown(self, needle: str) -> bool:
        """Was `needle` on screen at any moment (a live line later redrawn counts)?"""
        return any(needle in f for f in self.frames)


def run_in_pty(argv: list[str], env: dict[str, str], timeout_s: float = 120.0) -> Capture:
    """`argv` with stdin, stdout and stderr on one pseudo-terminal of COLS x ROWS."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
    env = {**env, "TERM": "xterm-256color", "COLUMNS": str(COLS), "LINES": str(ROWS)}
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    screen = pyte.Screen(COLS, ROWS)
    stream = pyte.ByteStream(screen)
    raw = bytearray()
    frames: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.send_signal(signal.SIGKILL)
                shown = raw.decode(errors="replace")
                raise TimeoutError(f"{argv[:4]} still running after {timeout_s:g} s:\n{shown}")
            ready, _, _ = select.select([master], [], [], min(left, 0.5))
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            raw += chunk
            stream.feed(chunk)
            frames.append("\n".join(screen.display))
        proc.wait(timeout=30)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    buf = screen.buffer
    cells = [[(buf[y][x].data, buf[y][x].fg, buf[y][x].bold) for x in range(COLS)] for y in range(ROWS)]
    return Capture(proc.returncode, bytes(raw), [row.rstrip() for row in screen.display], frames, cells)
