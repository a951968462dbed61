"""Throughput of the library against the hand-written redis-py loop, on one server, one run.

``broker bench`` and ``python -m tests.benchmarks.bench_throughput`` both call :func:`run`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Any

import msgpack

import broker

__all__ = ["Row", "run", "table"]


@dataclasses.dataclass(frozen=True)
class Row:
    operation: str
    baseline: float  # messages per second, hand-written redis-py loop
    library: float  # messages per second, broker

    @property
    def ratio(self) -> float:
        return self.library / self.baseline


async def _baseline_publish(r: Any, key: str, n: int, tasks: int) -> float:
    async def one(k: int) -> None:
        for i in range(n // tasks):
            await r.xadd(key, {"d": msgpack.packb({"i": i, "k": k})})

    t0 = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(tasks)))
    return (n // tasks * tasks) / (time.perf_counter() - t0)


async def _publish(ch: broker.Channel[Any], n: int, tasks: int) -> float:
    async def one(k: int) -> None:
        for i in range(n // tasks):
            await ch.publish({"i": i, "k": k})

    t0 = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(tasks)))
    return (n // tasks * tasks) / (time.perf_counter() - t0)


async def _baseline_consume(r: Any, key: str, n: int) -> float:
    await r.xgroup_create(key, "base", id="0")
    got = 0
    t0 = time.perf_counter()
    while got < n:
        reply = await r.xreadgroup("base", "c", {key: ">"}, count=64, block=1000)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                msgpack.unpackb(fields[b"d"])
                await r.xack(key, "base", entry_id)  # the usual loop: one XACK per message
                got += 1
    return n / (time.perf_counter() - t0)


async def _consume(ch: broker.Channel[Any], n: int) -> float:
    got = 0
    t0 = time.perf_counter()
    async with ch.subscribe(group="bench", start="all", prefetch=64) as messages:
        async for msg in messages:
            msg.ack()
            got += 1
            if got == n:
                break
    return n / (time.perf_counter() - t0)


async def run(url: str | None, n: int = 20_000, tasks: int = 100) -> list[Row]:
    """Measure in a fresh namespace on ``url`` and delete what was written."""
    ns = f"bench-{uuid.uuid4().hex[:8]}"
    rows: list[Row] = []
    async with broker.connect(url, namespace=ns) as b:
        r: Any = b.redis
        base_key = f"{ns}:baseline"
        ch = b.channel("bench")
        try:
            seq_base = await _baseline_publish(r, base_key + "-1", n, 1)
            rows.append(
                Row("publish, 1 task awaiting each publish", seq_base, await _publish(ch, n, 1))
            )
            conc_base = await _baseline_publish(r, base_key, n, tasks)
            conc = await _publish(ch, n, tasks)
            rows.append(Row(f"publish, {tasks} concurrent tasks", conc_base, conc))
            total = n // tasks * tasks
            rows.append(
                Row(
                    "consume + ack, prefetch 64",
                    await _baseline_consume(r, base_key, total),
                    await _consume(ch, total),
                )
            )
            t0 = time.perf_counter()
            await ch.publish_many(({"i": i} for i in range(n)), batch=1000)
            rows.append(
                Row("publish_many (pipelines of 1000)", seq_base, n / (time.perf_counter() - t0))
            )
        finally:
            await r.delete(base_key, base_key + "-1", ch.key)
    return rows


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| operation | hand-written redis-py loop (msg/s) | broker (msg/s) | ratio |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r.operation} | {r.baseline:,.0f} | {r.library:,.0f} | {r.ratio:.1f}x |" for r in rows
    ]
    return "\n".join(lines)
