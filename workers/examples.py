"""Example workers, for the README demo and compose.yaml::

    broker worker broker.workers.examples:orders --channel orders
    broker worker broker.workers.examples:process_order --channel orders --group billing -p 2 -c 4

Configured by environment variables (read when the worker starts):

- ``ORDERS_COUNT``: orders each producer process emits, then it finishes (default 100; 0:
  until stopped);
- ``ORDERS_RATE``: orders per second per process (default 10; 0: as fast as it can publish);
- ``PROCESS_MS``: milliseconds of "work" per order (default 50);
- ``PROCESS_FAIL_RATE``: fraction of deliveries that fail, to see retries and dead letters
  (default 0).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import broker

__all__ = ["orders", "print_message", "process_order", "tick"]

ITEMS = ("coffee", "tea", "cake", "bagel", "juice")


def say(line: str) -> None:
    """Write ``line`` and its newline in one call: slots share one pipe, and under
    ``PYTHONUNBUFFERED=1`` ``print(..., flush=True)`` writes the text and the newline separately,
    so another slot's line can land in between (two lines merged, one lost to a reader)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0:
        raise broker.ConfigurationError(f"{name} must be a number >= 0, got {raw!r}")
    return value


async def orders() -> AsyncIterator[dict[str, Any]]:
    """A producer: ``ORDERS_COUNT`` orders at ``ORDERS_RATE`` per second, then it finishes.

    Each order has a unique ``order_id`` (``<run>-<n>``, the run being random per process).
    """
    count = int(_env("ORDERS_COUNT", 100))
    rate = _env("ORDERS_RATE", 10)
    run = uuid.uuid4().hex[:8]
    t0 = time.monotonic()
    for n in itertools.count(1):
        if count and n > count:
            return
        if rate > 0:
            wait = t0 + (n - 1) / rate - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        yield {
            "order_id": f"{run}-{n}",
            "n": n,
            "item": random.choice(ITEMS),
            "quantity": random.randint(1, 5),
        }


async def process_order(msg: broker.Message[Any]) -> None:
    """A consumer: ``PROCESS_MS`` of work per order, then one line on stdout."""
    fail_rate = _env("PROCESS_FAIL_RATE", 0)
    await asyncio.sleep(_env("PROCESS_MS", 50) / 1000)
    order = msg.data if isinstance(msg.data, dict) else {}
    if fail_rate and random.random() < fail_rate:
        raise RuntimeError(f"simulated failure of order {order.get('order_id')}")
    say(
        f"processed order {order.get('order_id', '?')} ({order.get('item', '?')} "
        f"x{order.get('quantity', '?')}) {msg.channel} {msg.id} delivery {msg.deliveries}"
    )


async def print_message(msg: broker.Message[Any]) -> None:
    """A consumer: print each message."""
    say(f"{msg.channel} {msg.id} (delivery {msg.deliveries}): {msg.data!r}")


async def tick(channel: broker.Channel[Any], stop: broker.StopToken) -> None:
    """A producer given the channel: publish a counter every 0.2 s until stopped."""
    for n in itertools.count(1):
        if stop.stopped:
            return
        await channel.publish({"tick": n})
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except TimeoutError:
            pass
