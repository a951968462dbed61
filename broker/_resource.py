"""The shape of every resource: an async context manager whose ``aclose()`` is idempotent."""

from __future__ import annotations

import abc
import asyncio
from types import TracebackType
from typing import Any

__all__ = ["AsyncResource", "cancel_all", "cancel_and_wait"]


class AsyncResource(abc.ABC):
    """``async with resource:`` closes it on exit, whatever happened (see trio's AsyncResource)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release everything; safe to call twice, releases even when it fails midway."""

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it is done, cancelling again if a cancel got lost.

    On Python 3.11 a cancel that races with a finished ``asyncio.wait_for`` inside redis-py
    (every command with a socket timeout goes through one) is dropped; repeating it ends a
    blocking read within milliseconds instead of after the read's own timeout.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=0.02)


async def cancel_all(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until every one is done.

    A cancel of the caller arriving meanwhile is deferred, not swallowed: it is raised once the
    tasks are done, so a cleanup interrupted by repeated cancels (see :func:`cancel_and_wait`)
    still leaves no task behind.

    A task that had already ended with an error keeps it for a caller that asks
    (``t.exception()``), but it counts as retrieved: when the caller is itself being cancelled
    (a subscription closed while its reader failed), asyncio would otherwise print "Task
    exception was never retrieved" for an error nobody is left to handle.
    """
    cancelled = False
    pending = [t for t in tasks if not t.done()]
    while pending:
        for t in pending:
            t.cancel()
        try:
            await asyncio.wait(pending, timeout=0.02)
        except asyncio.CancelledError:
            cancelled = True
        pending = [t for t in pending if not t.done()]
    for t in tasks:
        if not t.cancelled():
            t.exception()  # retrieved: see above
    if cancelled:
        raise asyncio.CancelledError
