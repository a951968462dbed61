"""This project through its public API: ``publish`` from many tasks, ``publish_many``,
``async for`` + ``msg.ack()``, ``chunks`` + batch ack, ``consume(handler, concurrency=32)``."""

from __future__ import annotations

import asyncio
from typing import Any

import broker

from .common import BATCH, Run, payload, stopwatch

__all__ = ["chunks", "consume", "iterate", "publish", "publish_many"]


async def publish(ch: broker.Channel[Any], n: int, tasks: int) -> Run:
    """``n`` awaited ``publish()`` calls spread over ``tasks`` concurrent tasks (the library
    coalesces them into pipelines)."""

    async def one(k: int) -> None:
        for i in range(k, n, tasks):
            await ch.publish(payload(i))

    with stopwatch() as w:
        async with asyncio.TaskGroup() as tg:
            for k in range(tasks):
                tg.create_task(one(k))
    return w.run(n)


async def publish_many(ch: broker.Channel[Any], n: int) -> Run:
    with stopwatch() as w:
        await ch.publish_many((payload(i) for i in range(n)), batch=BATCH)
    return w.run(n)


async def iterate(ch: broker.Channel[Any], group: str, n: int, prefetch: int) -> Run:
    """``async for msg in subscription: msg.ack()`` over a backlog of ``n``; the timing
    includes entering (group creation) and leaving (acks flushed)."""
    got = 0
    with stopwatch() as w:
        async with ch.subscribe(
            group=group, consumer="bench", start="all", prefetch=prefetch
        ) as messages:
            async for msg in messages:
                msg.ack()
                got += 1
                if got >= n:
                    break
    return w.run(got)


async def chunks(ch: broker.Channel[Any], group: str, n: int, size: int, prefetch: int) -> Run:
    """``async for batch in subscription.chunks(size)``: ``subscription.ack(batch)``."""
    got = 0
    with stopwatch() as w:
        async with ch.subscribe(
            group=group, consumer="bench", start="all", prefetch=prefetch
        ) as messages:
            async for batch in messages.chunks(size, timeout=0.05):
                messages.ack(batch)
                got += len(batch)
                if got >= n:
                    break
    return w.run(got)


async def consume(b: broker.Broker, ch: broker.Channel[Any], group: str, n: int, c: int) -> Run:
    """``b.consume(channel, handler, concurrency=c)`` with a trivial handler, stopped by a
    local stop token once ``n`` handlers returned (acks are flushed before it returns)."""
    source = broker.StopSource()
    got = 0

    async def handler(msg: broker.Message[Any]) -> None:
        nonlocal got
        got += 1
        if got >= n:
            source.stop("done")

    with stopwatch() as w:
        await b.consume(
            ch,
            handler,
            group=group,
            consumer="bench",
            concurrency=c,
            start="all",
            stop=source.token,
        )
    return w.run(got)
