"""Request round trip: ``python -m broker.cli._bench.request [--url URL] [-n N]``.

Sequential requests (one in flight, so each figure is one whole round trip) through a responder
in another process, p50/p99/mean in ms:

- ``lib``: ``await ch.request(i)`` answered by ``b.consume(...)`` (the handler returns the data);
- ``raw``: the same exchange written in plain redis-py: ``XADD`` of the request with its inbox,
  the responder's ``XREADGROUP BLOCK``, its ``XADD`` of the answer then ``XACK``, and the
  requester's blocking ``XREAD`` of its inbox;
- ``faststream`` (when ``faststream[redis]`` is installed): ``await broker.request(i,
  stream=...)`` answered by a FastStream stream subscriber with a group, which returns the data.

Without ``--url`` it starts a private redis-server. Kept apart from the ``broker bench``
harness (its own entry point): prints a Markdown table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

import broker

__all__ = ["main", "measure"]

ROOT = Path(__file__).resolve().parents[2]


async def _respond_lib(url: str, namespace: str, channel: str) -> None:
    async with broker.connect(url, namespace=namespace) as b:

        async def echo(msg: broker.Message[Any]) -> Any:
            return msg.data

        async with b.subscribe(channel, group="bench", start="all") as sub:
            print("ready", flush=True)
            await sub.consume(echo, concurrency=1)


async def _respond_raw(url: str, key: str) -> None:
    r: Any = aioredis.Redis.from_url(url)  # Any: redis-py's annotations miss asyncio replies
    try:
        with contextlib.suppress(Exception):
            await r.xgroup_create(key, "bench", id="0", mkstream=True)
        print("ready", flush=True)
        while True:
            reply = await r.xreadgroup("bench", "c", {key: ">"}, count=1, block=1000)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    await r.xadd(fields[b"r"], {b"d": fields[b"d"]}, maxlen=1000)
                    await r.xack(key, "bench", entry_id)
    finally:
        await r.aclose()


async def _respond_faststream(url: str, stream: str) -> None:
    from .faststream import _redis

    fs = _redis()
    app = fs.RedisBroker(url, logger=None)

    async def echo(data: Any) -> Any:
        return data

    app.subscriber(stream=fs.StreamSub(stream, group="bench", consumer="c"))(echo)
    async with app:
        await app.start()
        print("ready", flush=True)
        await asyncio.Event().wait()


async def _request_faststream(url: str, stream: str, n: int) -> dict[str, float]:
    from .faststream import _redis

    app = _redis().RedisBroker(url, logger=None)
    async with app:
        await app.connect()

        async def one(i: int) -> None:
            answer = await app.request(i, stream=stream, timeout=10)
            assert await answer.decode() == i

        return await _timed(n, one)


async def _spawn(*args: str) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker.cli._bench.request",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,  # killed at the end: no traceback on the terminal
        cwd=ROOT,
    )
    assert proc.stdout is not None
    async with asyncio.timeout(30):
        line = await proc.stdout.readline()
    if line.strip() != b"ready":
        proc.kill()
        await proc.wait()
        raise RuntimeError("the responder process did not start")
    return proc


async def _timed(n: int, one: Callable[[int], Awaitable[None]]) -> dict[str, float]:
    for i in range(min(100, n)):  # warm up: connections, scripts, the inbox
        await one(-1 - i)
    samples = []
    for i in range(n):
        started = time.perf_counter()
        await one(i)
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return {
        "requests": n,
        "p50_ms": round(samples[len(samples) // 2], 3),
        "p99_ms": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))], 3),
        "mean_ms": round(statistics.fmean(samples), 3),
    }


async def measure(url: str, n: int, namespace: str = "bench-request") -> dict[str, Any]:
    """Both scenarios on ``url``; their figures, keyed ``lib`` and ``raw``."""
    ns = f"{namespace}-{uuid.uuid4().hex[:8]}"
    out: dict[str, Any] = {}
    proc = await _spawn("respond-lib", url, ns, "rq")
    try:
        async with broker.connect(url, namespace=ns) as b:
            ch = b.channel("rq")

            async def lib(i: int) -> None:
                assert await ch.request(i, timeout=10) == i

            out["lib"] = await _timed(n, lib)
            await b.redis.delete(ch.key)
    finally:
        proc.kill()
        await proc.wait()

    key, inbox = f"{ns}:raw", f"{ns}:raw-inbox"
    proc = await _spawn("respond-raw", url, key)
    r: Any = aioredis.Redis.from_url(url)
    reader: Any = aioredis.Redis.from_url(url)  # the inbox's own connection, as the library's
    last = "0-0"
    try:

        async def raw(i: int) -> None:
            nonlocal last
            await r.xadd(key, {b"d": str(i).encode(), b"r": inbox.encode()})
            while True:
                reply = await reader.xread({inbox: last}, count=1, block=10_000)
                for _, entries in reply or []:
                    for entry_id, fields in entries:
                        last = entry_id
                        if fields[b"d"] == str(i).encode():
                            return

        out["raw"] = await _timed(n, raw)
        await r.delete(key, inbox)
    finally:
        proc.kill()
        await proc.wait()
        await r.aclose()
        await reader.aclose()

    from .faststream import available

    if available() is not None:
        stream = f"{ns}:fs"
        proc = await _spawn("respond-faststream", url, stream)
        try:
            out["faststream"] = await _request_faststream(url, stream, n)
        finally:
            proc.kill()
            await proc.wait()
            r = aioredis.Redis.from_url(url)
            await r.delete(stream)
            await r.aclose()
    return out


@contextlib.contextmanager
def _server(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    with broker.EmbeddedServer() as server:
        yield server.url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m broker.cli._bench.request")
    parser.add_argument("mode", nargs="?", default="measure", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--url", help="the server (default: a private redis-server)")
    parser.add_argument("-n", "--requests", type=int, default=2000, help="requests per side")
    args = parser.parse_args(argv)
    if args.mode == "respond-lib":
        asyncio.run(_respond_lib(*args.rest))
        return
    if args.mode == "respond-raw":
        asyncio.run(_respond_raw(*args.rest))
        return
    if args.mode == "respond-faststream":
        asyncio.run(_respond_faststream(*args.rest))
        return
    with _server(args.url) as url:
        result = asyncio.run(measure(url, args.requests))
    print("| request round trip (sequential) | p50 ms | p99 ms | mean ms |")
    print("|---|---|---|---|")
    sides = (("raw", "raw redis-py"), ("lib", "broker request()"), ("faststream", "FastStream"))
    for side, label in sides:
        if side not in result:
            continue
        f = result[side]
        print(f"| {label} | {f['p50_ms']} | {f['p99_ms']} | {f['mean_ms']} |")
    print(json.dumps({"request": result}))


if __name__ == "__main__":
    main()
