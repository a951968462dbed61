"""``.ci/setup`` (sourced by ``.ci/test`` and ``.ci/demo``) puts its virtual environment first on
PATH, wherever ``BROKER_VENV`` points: an absolute path (the compose ``tests`` service uses
``/tmp/venv``) once gave ``$PWD//tmp/venv/bin`` and ``No module named pytest``.

The environment here is a stand-in whose ``python`` accepts the ``pip install`` and does nothing,
so the script runs in milliseconds and touches no network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _fake_venv(path: Path) -> Path:
    bin_dir = path / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python"
    python.write_text("#!/bin/sh\nexit 0\n")  # `python -m pip install ...`: nothing to do
    python.chmod(0o755)
    return bin_dir


def _setup_path(venv: str, cwd: Path) -> str:
    """PATH after ``source .ci/setup ""`` with ``BROKER_VENV=venv``, run from ``cwd``."""
    env = {k: v for k, v in os.environ.items() if k not in ("BROKER_VENV", "VIRTUAL_ENV")}
    env.update(BROKER_VENV=venv, PYTHON=sys.executable, BROKER_TEST_URL="redis://unused:1/0")
    done = subprocess.run(
        ["bash", "-c", f'source "{ROOT}/.ci/setup" "" && printf %s "$PATH"'],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_an_absolute_broker_venv_comes_first_on_path(tmp_path: Path) -> None:
    bin_dir = _fake_venv(tmp_path / "venv")
    path = _setup_path(str(tmp_path / "venv"), cwd=tmp_path)
    assert path.split(":")[0] == str(bin_dir), path.split(":")[:3]


@pytest.mark.parametrize("venv", ["build/test-venv-rel", "./build/test-venv-rel"])
def test_a_relative_broker_venv_is_under_the_repository(venv: str, tmp_path: Path) -> None:
    target = ROOT / "build" / "test-venv-rel"
    if target.exists():
        pytest.fail(f"{target} exists: remove it (left by an interrupted run)")
    try:
        _fake_venv(target)
        # run from elsewhere: the script works from the repository root all the same
        first = Path(_setup_path(venv, cwd=tmp_path).split(":")[0])
        assert first.resolve() == (target / "bin").resolve(), first
        assert first.is_absolute(), first
    finally:
        shutil.rmtree(target, ignore_errors=True)
