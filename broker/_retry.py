"""Reconnect policy: exponential backoff with full jitter, bounded by a deadline.

The deadline bounds the whole outage, stalls included: a stopped server still completes the TCP
connect, so an attempt fails only by waiting. Every attempt is therefore given at most what is
left of the deadline (never less than ``floor``, never more than ``stall``), and an outage is
dated from the start of the attempt that failed, not from when its failure was noticed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ._errors import AuthenticationError, ConnectionLostError, map_redis_errors

__all__ = ["Backoff", "RetryPolicy", "retrying", "retrying_bounded"]

log = logging.getLogger("broker.connection")

R = TypeVar("R")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How long an outage may last (``deadline``) and the bounds of one attempt (see
    :class:`Backoff`); built from the broker's settings."""

    deadline: float
    floor: float = 1.0
    stall: float = 15.0

    def backoff(self) -> Backoff:
        return Backoff(self.deadline, floor=self.floor, stall=self.stall)


class Backoff:
    """Tracks one outage: how long the next attempt may take, how long to sleep before it, and
    whether the deadline has passed.

    :param deadline: seconds an outage may last before :meth:`wait` raises.
    :param floor: the least time an attempt is given (so a deadline of 0 still tries once).
    :param stall: the most time an attempt is given: a server silent this long is lost.
    """

    def __init__(
        self,
        deadline: float,
        *,
        floor: float = 1.0,
        stall: float = 15.0,
        base: float = 0.05,
        cap: float = 2.0,
    ) -> None:
        self.deadline = deadline
        self.floor = floor
        self.stall = stall
        self.base = base
        self.cap = cap
        self.attempt = 0
        self.since: float | None = None

    def reset(self) -> None:
        self.attempt = 0
        self.since = None

    def limit(self) -> float:
        """Seconds the next attempt may take: what is left of the deadline (all of it when no
        outage is under way), within ``[floor, stall]``."""
        left = self.deadline
        if self.since is not None:
            left -= time.monotonic() - self.since
        return max(self.floor, min(self.stall, left))

    async def wait(self, exc: ConnectionLostError, started: float | None = None) -> None:
        """Sleep before the next attempt, or raise once the outage outlasted the deadline.

        ``started``: when the failed attempt began to wait for the server (the outage began no
        later than that); default now.
        """
        if isinstance(exc, AuthenticationError):
            raise exc
        now = time.monotonic()
        if self.since is None:
            self.since = min(now, started) if started is not None else now
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


def no_reply(limit: float) -> ConnectionLostError:
    return ConnectionLostError(f"no reply from the server within {limit:.1f}s (stalled?)")


async def retrying(
    call: Callable[[], Awaitable[R]],
    policy: RetryPolicy,
    channel: str | None = None,
    key: str | None = None,
    *,
    refresh: Callable[[str], Awaitable[None]] | None = None,
) -> R:
    """Run ``call`` until it succeeds, retrying lost connections until the policy's deadline;
    each attempt is bounded by what is left of the deadline (see :class:`Backoff`).

    ``refresh(reason)`` runs before each retry (a cluster re-reads its slot map: the node may
    have failed over, or the slot moved).
    """
    backoff = policy.backoff()
    while True:
        started = time.monotonic()
        limit = backoff.limit()
        try:
            with map_redis_errors(channel, key):
                try:
                    async with asyncio.timeout(limit):
                        return await call()
                except TimeoutError:
                    raise no_reply(limit) from None
        except ConnectionLostError as exc:
            await backoff.wait(exc, started)
            if refresh is not None:
                await _quietly(refresh, str(exc))


async def retrying_bounded(
    call: Callable[[float], Awaitable[R]],
    policy: RetryPolicy,
    channel: str | None = None,
    *,
    refresh: Callable[[str], Awaitable[None]] | None = None,
) -> R:
    """:func:`retrying` for calls that bound themselves: ``call(limit)`` must give up after
    ``limit`` seconds (the hot paths pass it to :meth:`Wire.execute`, which already keeps one
    deadline per exchange, instead of nesting a second timeout)."""
    backoff = policy.backoff()
    while True:
        started = time.monotonic()
        try:
            with map_redis_errors(channel):
                return await call(backoff.limit())
        except ConnectionLostError as exc:
            await backoff.wait(exc, started)
            if refresh is not None:
                await _quietly(refresh, str(exc))


async def _quietly(refresh: Callable[[str], Awaitable[None]], reason: str) -> None:
    """Refresh what can be refreshed; a failure here is the next attempt's to report."""
    try:
        with map_redis_errors():
            await refresh(reason)
    except ConnectionLostError as exc:
        log.debug("refresh failed (%s); retrying anyway", exc)
