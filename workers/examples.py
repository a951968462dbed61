"""Example handlers for ``broker worker`` and compose.yaml."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import broker


async def print_message(msg: broker.Message[Any]) -> None:
    """A consumer: print each message."""
    print(f"{msg.channel} {msg.id} (delivery {msg.deliveries}): {msg.data!r}", flush=True)


async def tick(channel: broker.Channel[Any], stop: broker.StopToken) -> None:
    """A producer: publish a counter every 0.2 s until stopped."""
    for n in itertools.count(1):
        if stop.stopped:
            return
        await channel.publish({"tick": n})
        try:
            await asyncio.wait_for(stop.wait(), 0.2)
        except TimeoutError:
            pass
