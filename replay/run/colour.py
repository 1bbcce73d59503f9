"""Colours for verdicts on a terminal: the end-of-run table, capacity step lines and answers.

Colour only: the words are exactly what a pipe or NO_COLOR gets (`plain_wanted`). Lines are matched
by how they start or by the verdict words in them, so a line nobody gave a rule stays plain.
"""

from __future__ import annotations

import os
import re
import sys
from typing import IO, Any

from rich.console import Console
from rich.text import Text

# Verdict words of capacity steps and probe levels (replay.capacity.search's log lines).
VERDICT_WORDS = {
    "PASS": "bold green",
    "FAIL": "bold red",
    "UNDECIDED": "bold yellow",
    "UNTRUSTED": "bold magenta",
    "SLO met": "green",
    "SLO missed": "red",
}
_WORDS_RE = re.compile("|".join(rf"\b{re.escape(w)}\b" for w in VERDICT_WORDS))
_ERRORS_RE = re.compile(r"errors (\d+)(?: \([^)]*\))?")
_NOT_SENT_RE = re.compile(r"(?:not sent|unfinished) (\d+)(?: \([^)]*\))?")


def plain_wanted(stream: Any) -> bool:
    """True unless `stream` is a terminal that may take escape codes (NO_COLOR, TERM=dumb: plain)."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return True
    isatty = getattr(stream, "isatty", None)
    try:
        return not (isatty is not None and isatty())
    except ValueError:  # a closed stream
        return True


def console(stream: IO[str]) -> Console:
    """A rich console on `stream` that never re-wraps or re-highlights our lines."""
    return Console(file=stream, highlight=False, soft_wrap=True, emoji=False)


def verdict_line(line: str) -> Text:
    """A capacity log line with its verdict words coloured."""
    t = Text(line)
    for m in _WORDS_RE.finditer(line):
        t.stylize(VERDICT_WORDS[m.group(0)], m.start(), m.end())
    return t


def _counts(t: Text, line: str) -> None:
    for m in _ERRORS_RE.finditer(line):
        t.stylize("bold red" if int(m.group(1)) else "green", m.start(), m.end())
    for m in _NOT_SENT_RE.finditer(line):
        if int(m.group(1)):
            t.stylize("yellow", m.start(), m.end())


def table_text(plain: str) -> Text:
    """The end-of-run table (replay.stats.summary.console_table) with its verdicts coloured."""
    out = Text()
    block = None  # style of the indented lines under a headline (its reasons)
    for line in plain.splitlines():
        t = Text(line)
        if line.startswith("self-check: ok"):
            t.stylize("bold green", 0, len("self-check: ok"))
            block = None
        elif line.startswith("self-check:"):
            t.stylize("bold red")
            block = "red"
        elif line.startswith("SERVER SATURATED"):
            t.stylize("bold red")
            block = "yellow"
        elif line.startswith("server kept up"):
            t.stylize("green", 0, len("server kept up"))
            block = None
        elif line.startswith(("PARTIAL RUN", "CHECK:")):
            t.stylize("bold yellow")
            block = None
        elif line.startswith("  ") and block:
            t.stylize(block)
        else:
            block = None
            if line.startswith("requests:"):
                _counts(t, line)
        out.append_text(t)
        out.append("\n")
    out.rstrip()
    return out


def show_table(plain: str, stream: IO[str] | None = None) -> None:
    """Print the end-of-run table: coloured on a terminal, the plain text anywhere else."""
    stream = stream or sys.stdout
    if plain_wanted(stream):
        print(plain, file=stream, flush=True)
    else:
        console(stream).print(table_text(plain))
