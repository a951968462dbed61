"""The built wheel installs one top-level package, ``broker``: the CLI and the worker runtime
live under it (``broker.cli``, ``broker.workers``), so that an application's own ``cli/`` or
``workers/`` folder (which ``broker worker`` imports handlers from) cannot shadow them."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (path,) = out.glob("broker-*.whl")
    return zipfile.ZipFile(path)


def test_one_top_level_package(wheel: zipfile.ZipFile) -> None:
    tops = {n.split("/")[0] for n in wheel.namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"broker"}, tops
    info = next(n for n in wheel.namelist() if n.endswith(".dist-info/top_level.txt"))
    assert wheel.read(info).decode().split() == ["broker"]


def test_applications_are_inside(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for module in (
        "broker/cli/main.py",
        "broker/workers/__init__.py",
        "broker/workers/child.py",
        "broker/cli/_bench/__init__.py",
        "broker/py.typed",
    ):
        assert module in names, module
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "broker = broker.cli.main:main" in wheel.read(entry).decode()
