"""Reconnect policy: exponential backoff with full jitter, bounded by a deadline."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ._errors import AuthenticationError, ConnectionLostError, map_redis_errors

__all__ = ["Backoff", "retrying"]

log = logging.getLogger("broker.connection")

R = TypeVar("R")


class Backoff:
    """Tracks one outage: how long to sleep next and whether the deadline has passed."""

    def __init__(self, deadline: float, base: float = 0.05, cap: float = 2.0) -> None:
        self.deadline = deadline
        self.base = base
        self.cap = cap
        self.attempt = 0
        self.since: float | None = None

    def reset(self) -> None:
        self.attempt = 0
        self.since = None

    async def wait(self, exc: ConnectionLostError) -> None:
        """Sleep before the next attempt, or raise once the outage outlasted the deadline."""
        if isinstance(exc, AuthenticationError):
            raise exc
        now = time.monotonic()
        if self.since is None:
            self.since = now
            log.warning("connection lost (%s); reconnecting for up to %gs", exc, self.deadline)
        elapsed = now - self.since
        if elapsed >= self.deadline:
            raise ConnectionLostError(
                f"server unreachable for {elapsed:.1f}s (reconnect deadline "
                f"{self.deadline:g}s): {exc}"
            ) from exc
        delay = random.uniform(0, min(self.cap, self.base * 2**self.attempt))
        self.attempt += 1
        await asyncio.sleep(min(delay, self.deadline - elapsed))


async def retrying(
    call: Callable[[], Awaitable[R]],
    deadline: float,
    channel: str | None = None,
    key: str | None = None,
) -> R:
    """Run ``call`` until it succeeds, retrying lost connections until ``deadline`` seconds."""
    backoff = Backoff(deadline)
    while True:
        try:
            with map_redis_errors(channel, key):
                return await call()
        except ConnectionLostError as exc:
            await backoff.wait(exc)
