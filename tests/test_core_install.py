"""The core install (`pip install .`, no extras) in a fresh virtualenv: no torch, transformers or
tokenizers, yet `replay run` against an HTTP server works, its counts agree with the server's own
record, `replay report` renders, and asking for the in-process target names the extra to install.

The stub runs from the development venv in its own process: the truth comes from outside the
install under test. `.[local]` itself is exercised by the development venv, which `make install`
builds with every extra (tests/test_transformers_local.py runs the in-process target there).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from replay.stub.server import StubProcess

REPO = Path(__file__).resolve().parents[1]
LOCAL_ONLY = ("torch", "transformers", "tokenizers")


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory) -> Path:
    """A fresh venv with `pip install <copy of this checkout>` (a copy: pip builds in the source tree)."""
    root = tmp_path_factory.mktemp("core")
    src = root / "src"
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    shutil.copytree(REPO / "replay", src / "replay", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    pip_env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run(
        [str(env / "bin" / "python"), "-m", "pip", "install", "-q", str(src)],
        env=pip_env, capture_output=True, text=True, timeout=480,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return env


def _bin(env: Path, name: str) -> str:
    return str(env / "bin" / name)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_core_install_has_no_torch(core_venv):
    for module in LOCAL_ONLY:
        r = subprocess.run(
            [_bin(core_venv, "python"), "-c", f"import {module}"], capture_output=True, text=True
        )
        assert r.returncode != 0 and "No module named" in r.stderr, (module, r.stderr[-500:])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_core_install_runs_against_a_stub_and_reports(core_venv, tmp_path):
    out = tmp_path / "run"
    with StubProcess(["--ttft-ms", "20", "--itl-ms", "5"]) as stub:
        r = subprocess.run(
            [_bin(core_venv, "replay"), "run", "--target", stub.base_url, "--rate", "20", "--duration", "2",
             "--output-tokens", "8", "--out", str(out)],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        with urllib.request.urlopen(f"http://127.0.0.1:{stub.port}/stub/truth", timeout=10) as resp:
            truth = json.loads(resp.read())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    summary = json.loads((out / "summary.json").read_bytes())
    counts = summary["counts"]
    assert counts["scheduled"] >= 20  # Poisson draw around 40 over 2 s at 20 req/s
    assert counts["ok"] == counts["scheduled"] == truth["served"]
    assert summary["tokens"]["output"] == truth["tokens"] == 8 * truth["served"]
    rep = subprocess.run([_bin(core_venv, "replay"), "report", str(out)], capture_output=True, text=True)
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert (out / "report.html").stat().st_size > 100_000  # plotly.js inlined: the core renders it


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_core_install_names_the_extra_for_the_in_process_target(core_venv, tmp_path):
    r = subprocess.run(
        [_bin(core_venv, "replay"), "run", "--target", "transformers", "--rate", "1", "--duration", "1",
         "--out", str(tmp_path / "run")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'replay[local]'" in lines[0], r.stderr[-2000:]
