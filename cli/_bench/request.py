"""Request round trip: ``python -m broker.cli._bench.request [--url URL] [-n N]``.

Sequential requests (one in flight, so each figure is one whole round trip) through a responder
in another process, p50/p99/mean in ms; the sides take turns, one request each, so a busy
moment of the machine falls on all of them:

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

__all__ = ["TARGET", "lines", "main", "measure"]

#: issue 15: the round trip p50 within this many times raw's, and ahead of FastStream's
TARGET = 1.5

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


def _figures(n: int, samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    return {
        "requests": n,
        "p50_ms": round(samples[len(samples) // 2], 3),
        "p99_ms": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))], 3),
        "mean_ms": round(statistics.fmean(samples), 3),
    }


async def _responder(stack: contextlib.AsyncExitStack, *args: str) -> None:
    proc = await _spawn(*args)

    async def stop() -> None:
        proc.kill()
        await proc.wait()

    stack.push_async_callback(stop)


async def measure(url: str, n: int, namespace: str = "bench-request") -> dict[str, Any]:
    """Every side on ``url``, their requests interleaved (one of each in turn, so that each
    side meets the same moments of a busy machine); figures keyed ``lib``, ``raw`` and, when
    installed, ``faststream``."""
    ns = f"{namespace}-{uuid.uuid4().hex[:8]}"
    sides: dict[str, Callable[[int], Awaitable[None]]] = {}
    async with contextlib.AsyncExitStack() as stack:
        # the library: ch.request() answered by consume() in another process
        await _responder(stack, "respond-lib", url, ns, "rq")
        b = await stack.enter_async_context(broker.connect(url, namespace=ns))
        ch = b.channel("rq")
        stack.push_async_callback(ch.delete)  # the stream, its companions, its record

        async def lib(i: int) -> None:
            assert await ch.request(i, timeout=10) == i

        sides["lib"] = lib

        # raw redis-py: the same exchange by hand
        key, inbox = f"{ns}:raw", f"{ns}:raw-inbox"
        await _responder(stack, "respond-raw", url, key)
        r: Any = aioredis.Redis.from_url(url)
        reader: Any = aioredis.Redis.from_url(url)  # the inbox's own connection, as the lib's
        stack.push_async_callback(r.aclose)
        stack.push_async_callback(reader.aclose)
        stack.push_async_callback(r.delete, key, inbox)
        last = "0-0"

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

        sides["raw"] = raw

        from .faststream import _redis, available

        if available() is not None:
            stream = f"{ns}:fs"
            await _responder(stack, "respond-faststream", url, stream)
            app = _redis().RedisBroker(url, logger=None)
            await stack.enter_async_context(app)
            await app.connect()
            stack.push_async_callback(r.delete, stream)

            async def faststream(i: int) -> None:
                answer = await app.request(i, stream=stream, timeout=10)
                assert await answer.decode() == i

            sides["faststream"] = faststream

        for one in sides.values():  # warm up: connections, scripts, the inboxes
            for i in range(min(100, n)):
                await one(-1 - i)
        samples: dict[str, list[float]] = {side: [] for side in sides}
        for i in range(n):
            for side, one in sides.items():
                started = time.perf_counter()
                await one(i)
                samples[side].append((time.perf_counter() - started) * 1000)
        return {side: _figures(n, got) for side, got in samples.items()}


def lines(result: dict[str, Any]) -> list[str]:
    """The Markdown section of ``broker bench --only request``, with the targets."""
    n = result["lib"]["requests"]
    out = [
        "",
        f"### Request round trip through a responder process ({n:,} sequential requests a side)",
        "",
        "| path | p50 ms | p99 ms | mean ms | p50 x raw | p99 x raw |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    raw = result["raw"]
    labels = (
        ("raw", "raw redis-py: `XADD`, `XREADGROUP`, `XADD` answer, blocking `XREAD`"),
        ("lib", "broker: `ch.request()` answered by `consume()`"),
        ("faststream", "FastStream: `broker.request(stream=...)`"),
    )
    for side, label in labels:
        f = result.get(side)
        if f is None:
            continue
        out.append(
            f"| {label} | {f['p50_ms']:.3f} | {f['p99_ms']:.3f} | {f['mean_ms']:.3f} | "
            f"{f['p50_ms'] / raw['p50_ms']:.2f}x | {f['p99_ms'] / raw['p99_ms']:.2f}x |"
        )
    ratio = result["lib"]["p50_ms"] / raw["p50_ms"]
    verdict = "met" if ratio <= TARGET else "**missed**"
    out += ["", f"Target (issue 15): request p50 ≤ {TARGET} x raw: {ratio:.2f}x, {verdict}."]
    fs = result.get("faststream")
    if fs is None:
        out.append("FastStream is not installed (`pip install 'broker[bench]'`): not compared.")
    else:
        ahead = fs["p50_ms"] / result["lib"]["p50_ms"]
        verdict = "met" if ahead > 1 else "**missed**"
        out.append(f"Ahead of FastStream's request(): its p50 is {ahead:.2f}x ours, {verdict}.")
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
    print("\n".join(lines(result)))
    print(json.dumps({"request": result}))


if __name__ == "__main__":
    main()
