"""FastStream's Redis Streams broker doing the same work, through its public API.

Only used when ``faststream`` is importable (``pip install 'broker[bench]'``). Its per-message
logging is off (``logger=None``) so that it is measured, not a log handler; handlers ack after
they return (its default policy for a stream with a group). FastStream writes its own envelope
(field ``__data__``), so its consumers read a backlog written by its own publisher.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
from typing import Any

from .common import BATCH, Run, optional, payload, stopwatch

__all__ = ["available", "consume", "consume_batch", "fill", "publish", "publish_pipelined"]


def available() -> str | None:
    """FastStream's version, or None when it (or its Redis extra) is not installed."""
    if optional("faststream.redis") is None:
        return None
    try:
        return importlib.metadata.version("faststream")
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _redis() -> Any:
    # imported by name: the bench extra is optional, and mypy must pass without it
    return importlib.import_module("faststream.redis")


def _broker(url: str, **options: Any) -> Any:
    return _redis().RedisBroker(url, logger=None, **options)


async def publish(url: str, key: str, n: int, tasks: int) -> Run:
    """``await broker.publish(data, stream=key)`` from ``tasks`` concurrent tasks. FastStream
    sends each on a pooled connection of its own (no coalescing), so the pool must allow one
    per task (``max_connections``; redis-py's default of 100 fails with 1000 tasks)."""
    fb = _broker(url, max_connections=max(tasks, 100))
    await fb.connect()
    try:

        async def one(k: int) -> None:
            for i in range(k, n, tasks):
                await fb.publish(payload(i), stream=key)

        with stopwatch() as w:
            async with asyncio.TaskGroup() as tg:
                for k in range(tasks):
                    tg.create_task(one(k))
    finally:
        await fb.stop()
    return w.run(n)


async def _pipelined(fb: Any, key: str, n: int) -> None:
    client = await fb.connect()
    for start in range(0, n, BATCH):
        async with client.pipeline(transaction=False) as pipe:
            for i in range(start, min(n, start + BATCH)):
                await fb.publish(payload(i), stream=key, pipeline=pipe)
            await pipe.execute()


async def publish_pipelined(url: str, key: str, n: int) -> Run:
    """Its batch publishing for streams: ``publish(..., pipeline=pipe)`` for 1000 messages,
    then ``pipe.execute()`` (``publish_batch`` exists for lists only)."""
    fb = _broker(url)
    await fb.connect()
    try:
        with stopwatch() as w:
            await _pipelined(fb, key, n)
    finally:
        await fb.stop()
    return w.run(n)


async def fill(url: str, key: str, n: int) -> None:
    fb = _broker(url)
    try:
        await _pipelined(fb, key, n)
    finally:
        await fb.stop()


async def _subscribe_and_wait(url: str, key: str, group: str, n: int, *, batch: bool) -> Run:
    fb = _broker(url)
    done = asyncio.Event()
    got = 0
    sub = _redis().StreamSub(key, group=group, consumer="bench", batch=batch, max_records=BATCH)
    if batch:

        async def handle_batch(body: list[Any]) -> None:
            nonlocal got
            got += len(body)
            if got >= n:
                done.set()

        fb.subscriber(stream=sub)(handle_batch)
    else:

        async def handle(body: Any) -> None:
            nonlocal got
            got += 1
            if got >= n:
                done.set()

        fb.subscriber(stream=sub)(handle)
    await fb.connect()
    try:
        with stopwatch() as w:
            await fb.start()
            await done.wait()
    finally:
        await fb.stop()
    return w.run(got)


async def consume(url: str, key: str, group: str, n: int) -> Run:
    """Its per-message stream subscriber in a consumer group (``StreamSub(key, group=...,
    consumer=..., max_records=1000)``): one handler call and one ``XACK`` per message."""
    return await _subscribe_and_wait(url, key, group, n, batch=False)


async def consume_batch(url: str, key: str, group: str, n: int) -> Run:
    """Its batch subscriber (``StreamSub(..., batch=True, max_records=1000)``): one handler
    call and one multi-id ``XACK`` per batch."""
    return await _subscribe_and_wait(url, key, group, n, batch=True)
