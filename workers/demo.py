"""The demo: one producer and three consumers of one group, on a real server.

``broker demo`` (or ``python -m workers.demo``) uses ``$BROKER_URL`` when set, otherwise it starts
a private ``redis-server`` for the duration of the demo and stops it afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import broker
from broker import EmbeddedServer

COLORS = ["\033[36m", "\033[35m", "\033[33m"]
RESET = "\033[0m"


def _paint(text: str, color: str) -> str:
    return f"{color}{text}{RESET}" if sys.stdout.isatty() else text


@contextlib.contextmanager
def server_url(url: str | None) -> Iterator[str]:
    """``url`` (or ``$BROKER_URL``) if given, else a private embedded server's URL."""
    url = url or os.environ.get("BROKER_URL")
    if url:
        yield url
        return
    with EmbeddedServer() as server:
        print(f"started a private redis-server ({server.binary}) on {server.url}")
        yield server.url
    print("stopped the private redis-server")


async def run(url: str, messages: int = 30, consumers: int = 3) -> int:
    """Publish ``messages`` orders and consume them with ``consumers`` group members."""
    namespace = f"demo-{uuid.uuid4().hex[:6]}"
    received: dict[str, str] = {}
    async with broker.connect(url, namespace=namespace) as b:
        orders = b.channel("orders")
        done = asyncio.Event()
        streams: list[broker.Subscription[Any]] = []

        async def consumer(n: int) -> None:
            color = COLORS[n % len(COLORS)]
            async with orders.subscribe(
                group="billing", consumer=f"consumer-{n}", start="all", prefetch=2
            ) as stream:
                streams.append(stream)
                async for msg in stream:
                    await asyncio.sleep(random.uniform(0.05, 0.25))  # "work"
                    if msg.id in received:
                        print(f"  duplicate {msg.id}")
                    received[msg.id] = f"consumer-{n}"
                    msg.ack()
                    print(
                        _paint(
                            f"  consumer-{n} <- order #{msg.data['order']} "
                            f"({msg.data['item']}) id={msg.id}",
                            color,
                        )
                    )
                    if len(received) >= messages:
                        done.set()

        async with asyncio.TaskGroup() as tg:
            for n in range(consumers):
                tg.create_task(consumer(n))
            items = ["coffee", "tea", "cake", "bagel", "juice"]
            for i in range(1, messages + 1):
                mid = await orders.publish({"order": i, "item": random.choice(items)})
                print(f"producer -> order #{i} id={mid}")
                await asyncio.sleep(0.03)
            async with asyncio.timeout(60):
                await done.wait()
            for stream in streams:
                stream.stop()  # ends each consumer's loop between messages
        info = await orders.info()
    per = {c: list(received.values()).count(c) for c in sorted(set(received.values()))}
    pending = sum(g.pending for g in info.groups)
    print(
        f"\n{len(received)}/{messages} orders delivered, split {per}; pending after acks: {pending}"
    )
    return 0 if len(received) == messages and pending == 0 else 1


def main(url: str | None = None) -> int:
    with server_url(url) as resolved:
        return asyncio.run(run(resolved))


if __name__ == "__main__":
    raise SystemExit(main())
