"""Helpers for the CLI tests: the app in-process (CliRunner) and as a real subprocess.

CliRunner runs in a worker thread: each command calls ``asyncio.run``, which cannot run inside
the test's own event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pathlib
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from click.testing import CliRunner, Result

from broker.cli.main import cli

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIMEOUT = 20  # seconds, for every subprocess
ENV = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}

Invoke = Callable[..., Awaitable[Result]]


@pytest.fixture
def invoke(redis_url: str, namespace: str) -> Invoke:
    """``await invoke("tail", name, input=...)`` runs ``broker --url ... --namespace ...``."""

    async def call(*args: str, input: str | bytes | None = None, url: str | None = None) -> Result:
        argv = ["--url", url or redis_url, "--namespace", namespace, *args]
        return await asyncio.to_thread(CliRunner().invoke, cli, argv, input=input)

    return call


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@dataclasses.dataclass
class Done:
    code: int
    out: str
    err: str


def argv(url: str, namespace: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "broker.cli.main", "--url", url, "--namespace", namespace, *args]


async def spawn(*argv: str, stdin: int = asyncio.subprocess.DEVNULL) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=ENV,
    )


async def finish(proc: asyncio.subprocess.Process, input: bytes | None = None) -> Done:
    try:
        out, err = await asyncio.wait_for(proc.communicate(input), TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


async def interrupt(proc: asyncio.subprocess.Process) -> Done:
    """Ctrl-C, as a terminal would send it."""
    proc.send_signal(signal.SIGINT)
    return await finish(proc)


@pytest.fixture
def sh(redis_url: str, namespace: str) -> Callable[..., Awaitable[Done]]:
    """``await sh("tail", name, input=b"...")``: ``python -m broker.cli.main`` as a real process."""

    async def call(*args: str, input: bytes | None = None, url: str | None = None) -> Done:
        stdin = asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL
        proc = await spawn(*argv(url or redis_url, namespace, *args), stdin=stdin)
        return await finish(proc, input)

    return call


def assert_clean(err: str) -> None:
    """No traceback and no shutdown noise on stderr."""
    for noise in ("Traceback", "Exception ignored", "BrokenPipeError", "Task was destroyed"):
        assert noise not in err, err
