"""Handlers loaded by worker tests through 'tests.helpers.handlers:NAME'."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

import broker

recorded: list[str] = []
started: list[str] = []
#: opened by tests to let `gated` handlers finish
gate = asyncio.Event()
_redis: aioredis.Redis | None = None


def reset() -> None:
    global gate
    recorded.clear()
    started.clear()
    gate = asyncio.Event()


async def record(msg: broker.Message[Any]) -> None:
    recorded.append(msg.id)


async def hang(msg: broker.Message[Any]) -> None:
    recorded.append(msg.id)
    await asyncio.sleep(3600)


async def hang_on_stuck(msg: broker.Message[Any]) -> None:
    """Finishes at once, except on the payload "stuck", where it hangs."""
    started.append(msg.id)
    if msg.data == "stuck":
        await asyncio.sleep(3600)
    recorded.append(msg.id)


async def gated(msg: broker.Message[Any]) -> None:
    """Waits for the test to open ``gate``."""
    started.append(msg.id)
    await gate.wait()
    recorded.append(msg.id)


async def fail_odd(msg: broker.Message[Any]) -> None:
    """Raises on odd payloads, records the even ones."""
    if msg.data % 2:
        raise ValueError(f"odd payload {msg.data}")
    recorded.append(msg.id)


def _client() -> aioredis.Redis:
    global _redis
    if _redis is None:
        _redis = aioredis.Redis.from_url(os.environ["TEST_REDIS_URL"])
    return _redis


async def record_redis(msg: broker.Message[Any]) -> None:
    """Slow-ish: after 50 ms, pushes "<pid> <id> <deliveries>" to ``$TEST_DONE_KEY``."""
    await asyncio.sleep(0.05)
    await _client().rpush(os.environ["TEST_DONE_KEY"], f"{os.getpid()} {msg.id} {msg.deliveries}")


async def crash_on_poison(msg: broker.Message[Any]) -> None:
    """Kills its whole process on the payload "poison"; records the others in Redis."""
    if msg.data == "poison":
        os._exit(1)
    await _client().rpush(os.environ["TEST_DONE_KEY"], msg.id)


# -- producers and shapes for the kind detection ---------------------------------------------


async def numbers() -> AsyncIterator[int]:
    """Yields 0..9, then finishes."""
    for n in range(10):
        yield n


async def forever() -> AsyncIterator[int]:
    n = 0
    while True:
        yield n
        n += 1
        await asyncio.sleep(0.01)


async def ticker(channel: broker.Channel[Any], stop: broker.StopToken) -> None:
    n = 0
    while not stop.stopped:
        await channel.publish(n)
        n += 1
        try:
            await asyncio.wait_for(stop.wait(), 0.01)
        except TimeoutError:
            pass


async def generator_with_args(count: int) -> AsyncIterator[int]:
    yield count


def not_async(msg: broker.Message[Any]) -> None:
    pass


async def no_args() -> None:
    pass


async def three_args(a: Any, b: Any, c: Any) -> None:
    pass


async def with_default(msg: broker.Message[Any], retries: int = 3) -> None:
    pass


class Callable:
    async def __call__(self, msg: broker.Message[Any]) -> None:
        pass


callable_object = Callable()


# -- handlers for retirement, fatal errors and blocked loops ----------------------------------

_hoard: list[bytes] = []


async def leak(msg: broker.Message[Any]) -> None:
    """Keeps ``$LEAK_MB`` MiB (written, so resident) per message; records like record_redis."""
    _hoard.append(b"x" * (int(os.environ.get("LEAK_MB", "8")) << 20))
    await _client().rpush(os.environ["TEST_DONE_KEY"], f"{os.getpid()} {msg.id} {msg.deliveries}")


async def out_of_memory_on_boom(msg: broker.Message[Any]) -> None:
    """Raises MemoryError on the payload "boom"; records the others in Redis."""
    if msg.data == "boom":
        raise MemoryError("simulated: the process is out of memory")
    await _client().rpush(os.environ["TEST_DONE_KEY"], f"{os.getpid()} {msg.id} {msg.deliveries}")


async def block_loop(msg: broker.Message[Any]) -> None:
    """Blocks the whole event loop for ``$BLOCK_SECONDS`` (a sync call in an async handler)."""
    time.sleep(float(os.environ.get("BLOCK_SECONDS", "5")))  # noqa: ASYNC251 - on purpose
    recorded.append(msg.id)


async def answer(msg: broker.Message[Any]) -> Any:
    """Answers a request ``{"n": N}`` with ``{"n": 2N}``; raises ZeroDivisionError on 0."""
    n = msg.data["n"]
    return {"n": 2 * n + 0 // n}
