"""A consumer handler that leaves a receipt per message, and the reading side for tests.

Run by the real worker CLI in the multi-host and compose tests::

    broker worker tests.helpers.receipts:record --channel orders --group g

Each handled message appends one line to the Redis list ``$RECEIPTS_KEY`` (default
``receipts``)::

    <message id> <host> <pid> <deliveries> <time.time()>

``<host>`` is ``$RECEIPTS_HOST``, else the host name. The receipt is written after the simulated
work (``$PROCESS_MS`` milliseconds, default 0) and before the handler returns, so a message
whose handler finished has a receipt even if its ack was lost; at-least-once delivery then shows
up as two receipts for one id, which is what the tests count.

The handler talks to Redis over its own connection (``$RECEIPTS_URL``, else ``$BROKER_URL``)
because a handler is given only the message. This module imports nothing from pytest, so the
worker image can load it (compose mounts ``tests/`` for that).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time
from collections import Counter
from typing import Any

import redis.asyncio as aioredis

import broker

__all__ = ["Receipt", "Receipts", "parse", "record"]

_client: aioredis.Redis | None = None


def _redis() -> aioredis.Redis:
    global _client
    if _client is None:
        url = os.environ.get("RECEIPTS_URL") or os.environ.get("BROKER_URL")
        if not url:
            raise RuntimeError("set RECEIPTS_URL or BROKER_URL for tests.helpers.receipts")
        # bounded waits: a handler stuck on a cut link is released once the link is back
        options: dict[str, Any] = {"socket_connect_timeout": 5, "socket_timeout": 30}
        if url.startswith("redis+cluster://"):
            from redis.asyncio.cluster import ClusterNode, RedisCluster

            hosts = url.split("://", 1)[1].split("/")[0].split(",")
            nodes = [ClusterNode(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1])) for h in hosts]
            _client = RedisCluster(startup_nodes=nodes, **options)  # type: ignore[assignment]
        else:
            _client = aioredis.Redis.from_url(url, **options)
    return _client


async def record(msg: broker.Message[Any]) -> None:
    """Sleep ``$PROCESS_MS`` ms, then append this message's receipt."""
    delay = float(os.environ.get("PROCESS_MS") or 0) / 1000
    if delay:
        await asyncio.sleep(delay)
    host = os.environ.get("RECEIPTS_HOST") or socket.gethostname()
    line = f"{msg.id} {host} {os.getpid()} {msg.deliveries} {time.time():.6f}"
    await _redis().rpush(os.environ.get("RECEIPTS_KEY") or "receipts", line)


# -- the reading side (tests) -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Receipt:
    id: str
    host: str
    pid: int
    deliveries: int
    at: float


def parse(lines: list[bytes] | list[str]) -> list[Receipt]:
    out = []
    for raw in lines:
        text = raw.decode() if isinstance(raw, bytes) else raw
        mid, host, pid, deliveries, at = text.split()
        out.append(Receipt(mid, host, int(pid), int(deliveries), float(at)))
    return out


@dataclasses.dataclass(frozen=True)
class Receipts:
    """Every receipt so far, with the counts the tests report."""

    items: list[Receipt]

    @classmethod
    async def fetch(cls, r: aioredis.Redis, key: str = "receipts") -> Receipts:
        return cls(parse(await r.lrange(key, 0, -1)))

    @property
    def ids(self) -> set[str]:
        return {x.id for x in self.items}

    def by_host(self) -> dict[str, set[str]]:
        hosts: dict[str, set[str]] = {}
        for x in self.items:
            hosts.setdefault(x.host, set()).add(x.id)
        return hosts

    def duplicated(self) -> dict[str, list[str]]:
        """Ids handled more than once, with the hosts that handled them (in order)."""
        counts = Counter(x.id for x in self.items)
        out: dict[str, list[str]] = {}
        for x in self.items:
            if counts[x.id] > 1:
                out.setdefault(x.id, []).append(x.host)
        return out

    @property
    def extra(self) -> int:
        """Receipts beyond one per id."""
        return len(self.items) - len(self.ids)

    def first_at(self, mid: str, host: str | None = None) -> float | None:
        """When ``mid`` was first handled (by ``host``, if given)."""
        times = [x.at for x in self.items if x.id == mid and (host is None or x.host == host)]
        return min(times) if times else None
