"""Optional dependencies: a one-line error naming the pip extra, instead of an ImportError traceback.

The core install (`pip install replay`) drives HTTP targets, traces, capacity searches and reports;
torch, transformers and tokenizers come with `replay[local]` (pyproject.toml). Code that needs an
extra calls `require` before importing it, so a missing package reads as what to install.
"""

from __future__ import annotations

import importlib.util

from replay.core.errors import ReplayError

LOCAL = ("torch", "transformers", "tokenizers")


def missing(*modules: str) -> list[str]:
    """The top-level modules that cannot be imported here (looked up, not imported: cheap)."""
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require(extra: str, what: str, *modules: str) -> None:
    """Raise a ReplayError naming `extra` when any of `modules` is not installed."""
    absent = missing(*modules)
    if absent:
        raise ReplayError(
            f"{what} needs {', '.join(absent)}, which the core install leaves out: "
            f"pip install 'replay[{extra}]'"
        )
