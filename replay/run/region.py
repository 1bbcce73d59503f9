"""A region of a terminal redrawn in place, for the live display: each redraw is one string of
escape codes, written with one `os.write`.

Why not rich's `Live`: a redraw runs on the display thread and holds the GIL while it runs, so the
event loop (which carries the measurement) waits for it. Live re-renders its renderable through the
console's whole pipeline (segments, line splitting and cropping, style stacks, control codes): 0.7-
1.5 ms of CPU per redraw mid-run here, and collections on the render thread from its allocations
(bench/results-live-render.md). This writes the same text and colours from prebuilt escape codes:
0.2-0.3 ms mid-run (the thread wakes to cold caches), 0.02 ms warm; the write runs without the GIL.
rich still decides the colour system and makes the codes (once per style, at start) and renders the
rare lines printed above the region (a capacity step's verdict).

How: the cursor is left on the line below the region; a redraw moves it up over the region, prints
any new lines above (they stay), then the region's lines (each erased first, cropped to the terminal
width so that none wraps and the line count stays true), and erases what is below (a region that
shrank). The cursor is hidden while the region lives.
"""

from __future__ import annotations

import contextlib
import io
import os
from typing import IO

from rich.cells import cell_len, set_cell_size
from rich.console import Console
from rich.text import Text

from replay.run.colour import console

UP, ERASE_LINE, ERASE_BELOW = "\x1b[{}A", "\x1b[2K", "\x1b[J"
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"


class Region:
    def __init__(self, stream: IO[str], styles: tuple[str, ...] = ()) -> None:
        """`styles`: those the region will use, their codes built now (a first redraw mid-run would
        otherwise pay ~0.5 ms of rich to build them)."""
        self.stream = stream
        try:
            self._fd: int | None = stream.fileno()
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
            self._fd = None
        real = console(stream)  # the colour system rich detects for this terminal (TERM, COLORTERM)
        self._ansi = Console(file=io.StringIO(), force_terminal=True, color_system=real.color_system,
                             highlight=False, soft_wrap=True, emoji=False, width=10_000)  # fmt: skip
        self._codes: dict[str, tuple[str, str]] = {"": ("", "")}
        for style in styles:
            self._code(style)
        self._height = 0  # lines of the region on screen, the cursor on the line below them
        self.shown = False  # drawn and not closed: the cursor is hidden

    def draw(self, above: list[Text], lines: list[list[tuple[str, str]]]) -> None:
        """Print `above` (kept) above the region, and redraw the region as `lines` of (text, style)."""
        cols, rows = self._size()
        out = [] if self.shown else [HIDE_CURSOR]
        self.shown = True
        if self._height:
            out.append(UP.format(self._height) + "\r")
        out += [ERASE_LINE + self._text(t) + "\n" for t in above]
        lines = lines[: max(1, rows - 1)]  # taller than the screen: cut, as rich's Live does
        for pieces in lines:
            out.append(ERASE_LINE)
            room = cols
            for text, style in pieces:
                if not text:
                    continue
                width = len(text) if text.isascii() else cell_len(text)
                if width > room:
                    text, width = (text[:room] if text.isascii() else set_cell_size(text, room)), room
                start, end = self._codes.get(style) or self._code(style)
                out.append(start + text + end)
                room -= width
                if room <= 0:
                    break
            out.append("\n")
        out.append(ERASE_BELOW)
        self._height = len(lines)
        self._write("".join(out))

    def close(self) -> None:
        if self.shown:
            self.shown = False
            self._write(SHOW_CURSOR)

    def _code(self, style: str) -> tuple[str, str]:
        """The escape codes rich writes before and after text in `style` on this terminal."""
        marked = self._text(Text("\0", style=style))
        start, _, end = marked.partition("\0")
        self._codes[style] = (start, end)
        return start, end

    def _text(self, text: Text) -> str:
        buf = self._ansi.file
        assert isinstance(buf, io.StringIO)
        buf.seek(0)
        buf.truncate()
        self._ansi.print(text, end="")
        return buf.getvalue()

    def _size(self) -> tuple[int, int]:
        """Columns and rows: COLUMNS / LINES when set (as rich reads them), else the terminal's."""
        size = None
        if self._fd is not None:
            with contextlib.suppress(OSError):
                size = os.get_terminal_size(self._fd)
        cols = os.environ.get("COLUMNS", "")
        rows = os.environ.get("LINES", "")
        c = int(cols) if cols.isdigit() else (size.columns if size else 0)
        r = int(rows) if rows.isdigit() else (size.lines if size else 0)
        return c or 80, r or 25

    def _write(self, data: str) -> None:
        if self._fd is None:
            self.stream.write(data)
            self.stream.flush()
            return
        self.stream.flush()  # whatever went through the stream before stays before this
        view = memoryview(data.encode(getattr(self.stream, "encoding", None) or "utf-8", "replace"))
        while view:
            view = view[os.write(self._fd, view) :]
