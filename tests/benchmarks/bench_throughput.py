"""Throughput against hand-written redis-py loops, measured in the same run on the same server.

usage: python -m tests.benchmarks.bench_throughput [N]   (starts a private redis-server)

Prints a Markdown table: messages per second and the ratio to the baseline. Not a pass/fail test.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid

import msgpack
import redis.asyncio as aioredis

import broker
from broker import EmbeddedServer


async def baseline_publish(r: aioredis.Redis, key: str, n: int, tasks: int) -> float:
    async def one(k: int) -> None:
        for i in range(n // tasks):
            await r.xadd(key, {"d": msgpack.packb({"i": i, "k": k})})

    t0 = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(tasks)))
    return n / (time.perf_counter() - t0)


async def broker_publish(b: broker.Broker, ch: broker.Channel, n: int, tasks: int) -> float:
    async def one(k: int) -> None:
        for i in range(n // tasks):
            await ch.publish({"i": i, "k": k})

    t0 = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(tasks)))
    return n / (time.perf_counter() - t0)


async def baseline_consume(r: aioredis.Redis, key: str, n: int) -> float:
    await r.xgroup_create(key, "base", id="0")
    got = 0
    t0 = time.perf_counter()
    while got < n:
        reply = await r.xreadgroup("base", "c", {key: ">"}, count=64, block=1000)
        for _, entries in reply:
            for entry_id, fields in entries:
                msgpack.unpackb(fields[b"d"])
                await r.xack(key, "base", entry_id)  # the usual loop: one XACK per message
                got += 1
    return n / (time.perf_counter() - t0)


async def broker_consume(ch: broker.Channel, n: int, prefetch: int) -> float:
    got = 0
    t0 = time.perf_counter()
    async with ch.subscribe(group=f"b{prefetch}", start="all", prefetch=prefetch) as messages:
        async for msg in messages:
            msg.ack()
            got += 1
            if got == n:
                break
    return n / (time.perf_counter() - t0)


async def main(n: int) -> None:
    with EmbeddedServer() as server:
        r = aioredis.Redis.from_url(server.url)
        async with broker.connect(server.url, namespace=f"bench{uuid.uuid4().hex[:6]}") as b:
            ch = b.channel("bench")
            rows = []
            for tasks in (1, 100):
                base = await baseline_publish(r, f"base-{tasks}", n, tasks)
                ours = await broker_publish(b, ch, n, tasks)
                rows.append((f"publish, {tasks} concurrent task(s)", base, ours))
            total = await r.xlen(ch.key)
            base = await baseline_consume(r, "base-100", n)
            ours = await broker_consume(ch, min(n, total), 64)
            rows.append(("consume + ack, prefetch 64", base, ours))
            batch_t0 = time.perf_counter()
            await ch.publish_many(({"i": i} for i in range(n)), batch=1000)
            rows.append(("publish_many (pipelined batches of 1000)", rows[0][1],
                         n / (time.perf_counter() - batch_t0)))
        await r.aclose()
    print(f"\n{n} messages each, redis-server {server.binary}\n")
    print("| operation | hand-written redis-py loop (msg/s) | broker (msg/s) | ratio |")
    print("|---|---:|---:|---:|")
    for label, base, ours in rows:
        print(f"| {label} | {base:,.0f} | {ours:,.0f} | {ours / base:.1f}x |")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000))
