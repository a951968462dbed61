"""A group-wide concurrency limit: a lease-based semaphore in Redis.

Permits are members of a sorted set scored by their expiry (server time, so host clocks do not
matter). Acquiring first drops expired leases, so a permit held by a process that died comes
back after at most one lease period; a holder renews its lease while its handler runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from ._errors import BrokerError
from ._resource import cancel_and_wait
from ._retry import retrying
from ._scripts import Script

if TYPE_CHECKING:
    from ._topology import Link

__all__ = ["GroupSemaphore"]

log = logging.getLogger("broker.semaphore")

#: KEYS: lease set. ARGV: limit, lease ms, lease id. Returns 1 when the lease was granted.
_ACQUIRE = Script(
    """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
  return 1
end
return 0
"""
)

#: KEYS: lease set. ARGV: lease ms, lease id. Returns 1 while the lease is still held.
_RENEW = Script(
    """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local score = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not score or tonumber(score) < now then return 0 end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return 1
"""
)

#: KEYS: lease set. Returns the number of leases not expired (by the server's clock).
_HOLDERS = Script(
    """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""
)


class GroupSemaphore:
    """At most ``limit`` holders at once across every process and host using ``key``."""

    def __init__(self, broker: Link, key: str, limit: int, *, lease: float = 30.0) -> None:
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"group_concurrency must be an int >= 1, got {limit!r}")
        if lease <= 0:
            raise ValueError(f"lease must be > 0 seconds, got {lease!r}")
        self.broker = broker
        self.key = key
        self.limit = limit
        self.lease_ms = max(1, int(lease * 1000))
        self.lost = 0  # leases that expired while their handler still ran

    async def _call(self, fn: Any) -> Any:
        topology = self.broker.topology
        refresh = topology.refresh if topology.single is None else None
        return await retrying(fn, self.broker.settings.retry, refresh=refresh)

    async def acquire(self) -> str:
        """Wait for a permit; returns the lease id."""
        lease_id = uuid.uuid4().hex
        pause = 0.005
        r = self.broker.redis
        while True:
            granted = await self._call(
                lambda: _ACQUIRE(r, [self.key], [self.limit, self.lease_ms, lease_id])
            )
            if granted:
                return lease_id
            await asyncio.sleep(pause * random.uniform(0.5, 1.5))
            pause = min(pause * 2, 0.1)

    async def release(self, lease_id: str) -> None:
        await self._call(lambda: self.broker.redis.zrem(self.key, lease_id))

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Hold a permit for the block, renewing its lease every third of the lease period."""
        lease_id = await self.acquire()
        # owned by this block: cancelled and awaited on the way out (a task group around the
        # yield would wrap the handler's own exception in an ExceptionGroup)
        renewer = asyncio.create_task(self._renew(lease_id), name=f"renew {lease_id}")
        try:
            yield
        finally:
            await cancel_and_wait(renewer)
            try:
                await asyncio.shield(self.release(lease_id))
            except BrokerError as exc:  # the lease expires by itself; the handler's result stands
                log.warning("could not release lease %s on %s: %s", lease_id, self.key, exc)

    async def _renew(self, lease_id: str) -> None:
        r = self.broker.redis
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            held = await self._call(lambda: _RENEW(r, [self.key], [self.lease_ms, lease_id]))
            if not held:
                self.lost += 1
                log.warning("lease %s on %s expired while its handler ran", lease_id, self.key)
                return

    async def holders(self) -> int:
        """Leases currently held (expired ones not counted)."""
        r = self.broker.redis
        # the server's clock of the key's own node (a cluster's nodes each have theirs)
        return int(await self._call(lambda: _HOLDERS(r, [self.key], [])))
