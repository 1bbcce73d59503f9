"""Shared test set-up. A skipped test is never counted as a pass: skips fail the session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if skipped and os.environ.get("REPLAY_ALLOW_SKIPS") != "1":
        reporter.write_line(
            f"{skipped} test(s) skipped: a skip is not a pass (set REPLAY_ALLOW_SKIPS=1 locally)"
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
