"""End-to-end latency at a fixed rate: publish on an absolute schedule, measure at receive.

Producer and consumer run in this process on separate connections; each payload carries
``time.perf_counter()`` taken when its send starts, and the consumer subtracts it from the
clock when the message is in its hands. The schedule is absolute (message ``i`` is due at
``t0 + i / rate``): a late send does not shift the ones after it, and sends do not wait for the
previous reply, so the rate holds (``achieved`` in the results says whether it did).
"""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import msgpack

import broker

from .common import BATCH, payload, percentile

__all__ = ["Latency", "combine", "library", "raw", "side_by_side"]


@dataclasses.dataclass(frozen=True)
class Latency:
    """Milliseconds, from one run (or medians over runs, see :func:`combine`)."""

    rate: int
    messages: int
    p50: float
    p99: float
    max: float
    #: messages per second actually sent (the schedule held if close to ``rate``)
    achieved: float

    def to_json(self) -> dict[str, Any]:
        return {
            k: round(v, 3) if isinstance(v, float) else v
            for k, v in dataclasses.asdict(self).items()
        }


def _summary(rate: int, samples: list[float], sent_in: float) -> Latency:
    samples.sort()
    ms = [s * 1000 for s in samples]
    return Latency(
        rate=rate,
        messages=len(ms),
        p50=percentile(ms, 0.50),
        p99=percentile(ms, 0.99),
        max=ms[-1] if ms else float("nan"),
        achieved=len(ms) / sent_in if sent_in > 0 else 0.0,
    )


def combine(runs: Sequence[Latency]) -> Latency:
    """Medians over repetitions, each statistic on its own."""
    return Latency(
        rate=runs[0].rate,
        messages=sum(r.messages for r in runs),
        p50=statistics.median(r.p50 for r in runs),
        p99=statistics.median(r.p99 for r in runs),
        max=statistics.median(r.max for r in runs),
        achieved=statistics.median(r.achieved for r in runs),
    )


#: sends in flight at most: a reply slower than the schedule holds a slot, not the schedule
IN_FLIGHT = 32
#: seconds the consumer waits for stragglers after the last send
GRACE = 10.0


async def _paced(total: int, rate: int, send: Callable[[int], Coroutine[Any, Any, Any]]) -> float:
    """Start ``send(i)`` for i < total, message i at ``t0 + i / rate`` (not earlier), each in its
    own task (at most ``IN_FLIGHT`` at once) so that a slow reply does not hold back the next
    send; returns the seconds the schedule took."""
    slots = asyncio.Semaphore(IN_FLIGHT)

    async def one(i: int) -> None:
        try:
            await send(i)
        finally:
            slots.release()

    async with asyncio.TaskGroup() as tg:
        t0 = time.perf_counter()
        for i in range(total):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await slots.acquire()
            tg.create_task(one(i))
        sent = time.perf_counter() - t0
    return sent


async def raw(r: Any, key: str, rate: int, seconds: float, samples: list[float]) -> float:
    """``XADD`` each message at the rate; the consumer loops on ``XREADGROUP BLOCK`` (COUNT
    1000) and acks each batch with one ``XACK``. Latencies (s) are appended to ``samples``;
    returns the seconds the schedule took."""
    total = max(1, int(rate * seconds))
    await r.xgroup_create(key, "lat", id="$", mkstream=True)
    start = len(samples)
    unpackb = msgpack.unpackb
    packb = msgpack.packb
    deadline = float("inf")

    async def consumer() -> None:
        # ends by itself (all received, or the grace period is over): cancelling a blocking
        # redis-py read is not reliable on Python 3.11
        while len(samples) - start < total and time.monotonic() < deadline:
            reply = await r.xreadgroup("lat", "raw", {key: ">"}, count=BATCH, block=100)
            for _, entries in reply or ():
                ids = []
                for entry_id, fields in entries:
                    samples.append(time.perf_counter() - unpackb(fields[b"d"])["ts"])
                    ids.append(entry_id)
                if ids:
                    await r.xack(key, "lat", *ids)

    async def send(i: int) -> None:
        await r.xadd(key, {b"d": packb(payload(i))})

    async with asyncio.TaskGroup() as tg:
        tg.create_task(consumer())
        await asyncio.sleep(0.05)  # the first XREADGROUP is blocking on the server
        sent_in = await _paced(total, rate, send)
        deadline = time.monotonic() + GRACE
    return sent_in


async def library(
    ch: broker.Channel[Any], rate: int, seconds: float, samples: list[float]
) -> float:
    """``await ch.publish(data)`` at the rate; ``async for msg in subscription`` (default
    options) with ``msg.ack()``. As :func:`raw` for ``samples`` and the result."""
    total = max(1, int(rate * seconds))
    start = len(samples)
    ready = asyncio.Event()
    subscription: list[broker.Subscription[Any]] = []

    async def consumer() -> None:
        async with ch.subscribe(group="lat", consumer="bench", start="new") as messages:
            subscription.append(messages)
            ready.set()
            async for msg in messages:
                samples.append(time.perf_counter() - msg.data["ts"])
                msg.ack()
                if len(samples) - start >= total:
                    break

    async def send(i: int) -> None:
        await ch.publish(payload(i))

    async with asyncio.TaskGroup() as tg:
        tg.create_task(consumer())
        await ready.wait()
        await asyncio.sleep(0.05)
        sent_in = await _paced(total, rate, send)
        # stragglers: the stream ends (between messages) after the grace period
        timer = asyncio.get_running_loop().call_later(GRACE, subscription[0].stop)
    timer.cancel()
    return sent_in


#: slices of each side in :func:`side_by_side`, in this order (each side first half the time)
ORDER = ("raw", "lib", "lib", "raw", "lib", "raw", "raw", "lib")


async def side_by_side(
    r: Any,
    b: broker.Broker,
    prefix: str,
    rate: int,
    seconds: float,
    unlink: Callable[[str], Coroutine[Any, Any, Any]],
) -> tuple[Latency, Latency]:
    """Raw and library latency at ``rate``, ``seconds`` each, measured in interleaved slices
    (raw, lib, lib, raw, lib, raw, raw, lib), each side's samples pooled: a drift of the
    machine during the run (another process, the VM's neighbours) hits both sides alike, and
    neither always runs first. Streams are named ``prefix-...`` in the broker's namespace;
    ``unlink`` deletes one."""
    per = seconds / (len(ORDER) // 2)
    samples: dict[str, list[float]] = {"raw": [], "lib": []}
    sent: dict[str, float] = {"raw": 0.0, "lib": 0.0}
    for i, side in enumerate(ORDER):
        ch = b.channel(f"{prefix}-{side}-{i}")
        try:
            if side == "raw":
                sent[side] += await raw(r, ch.key, rate, per, samples[side])
            else:
                sent[side] += await library(ch, rate, per, samples[side])
        finally:
            await unlink(ch.key)
    return (
        _summary(rate, samples["raw"], sent["raw"]),
        _summary(rate, samples["lib"], sent["lib"]),
    )
