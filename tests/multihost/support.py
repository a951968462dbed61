"""Bounded waiting and reporting for the multi-host tests (every loop has a time bound)."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence

import pytest

from tests.multihost.netns import HostProcess


def report(procs: Sequence[HostProcess]) -> str:
    return "\n".join(hp.describe() for hp in procs)


async def until(
    check: Callable[[], bool | Awaitable[bool]],
    *,
    bound: float,
    what: str,
    watch: Sequence[HostProcess] = (),
    every: float = 0.02,
) -> float:
    """Poll ``check`` until true; fail after ``bound`` s or when a watched process exits.

    Returns the seconds it took.
    """
    t0 = time.monotonic()
    while True:
        ok = check()
        if inspect.isawaitable(ok):
            ok = await ok
        if ok:
            return time.monotonic() - t0
        for hp in watch:
            if hp.poll() is not None:
                pytest.fail(f"{hp.tag} exited while waiting for {what}:\n{report(watch)}")
        if time.monotonic() - t0 > bound:
            pytest.fail(f"no {what} after {bound}s:\n{report(watch)}")
        await asyncio.sleep(every)


async def exit_code(hp: HostProcess, bound: float) -> int:
    """Wait (in a thread, at most ``bound`` s) for ``hp`` to exit."""
    try:
        return await asyncio.to_thread(hp.proc.wait, bound)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{hp.tag} did not exit within {bound}s:\n{hp.describe()}")
