"""A consumer process of the benchmark: ``python -m broker.cli._bench.child MODE ...``.

``memory``: consume a backlog with a slow handler for some seconds, sampling the resident set
size; prints one JSON line (idle and peak RSS, most messages held at once).
``drain``: print ``ready``, wait for ``go`` on stdin, then ``async for msg: msg.ack()`` until
stdin closes; prints one JSON line (messages, CPU seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from typing import Any

import broker

from .common import use_uvloop

__all__ = ["main", "rss_kb"]


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _maxrss_kb() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


def rss_kb() -> int:
    """This process's resident set size now (KiB); the peak so far where /proc is missing."""
    now = _status_kb("VmRSS")
    return now if now is not None else _maxrss_kb()


def _held(sub: broker.Subscription[Any]) -> int:
    """Messages in this process's memory: buffered, in a handler, or waiting for a retry (an
    ack on its way is only an id)."""
    s = sub.statistics()
    return s.buffered + s.in_flight + s.retrying


async def memory(args: argparse.Namespace) -> dict[str, Any]:
    async with broker.connect(args.url, namespace=args.namespace) as b:
        ch = b.channel(args.channel)
        await asyncio.sleep(0.2)
        idle = rss_kb()
        peak_sampled = idle
        held = 0
        consumed = 0
        pause = args.sleep_ms / 1000
        options: dict[str, Any] = {} if args.prefetch is None else {"prefetch": args.prefetch}
        async with ch.subscribe(group=args.group, consumer=args.consumer, **options) as sub:
            deadline = time.monotonic() + args.seconds
            next_sample = 0.0
            async for msg in sub:
                await asyncio.sleep(pause)
                msg.ack()
                consumed += 1
                now = time.monotonic()
                if now >= next_sample:
                    next_sample = now + 0.05
                    peak_sampled = max(peak_sampled, rss_kb())
                    held = max(held, _held(sub))
                if now >= deadline:
                    break
            prefetch = sub.prefetch
        peak = max(peak_sampled, _status_kb("VmHWM") or 0)
    return {
        "idle_kb": idle,
        "peak_kb": peak,
        "consumed": consumed,
        "max_held": held,
        "prefetch": prefetch,
    }


async def drain(args: argparse.Namespace) -> dict[str, Any]:
    async with broker.connect(args.url, namespace=args.namespace) as b:
        ch = b.channel(args.channel)
        print("ready", flush=True)
        go = await asyncio.to_thread(sys.stdin.readline)
        if go.strip() != "go":
            return {"messages": 0, "cpu": 0.0}
        c0 = time.process_time()
        got = 0
        async with ch.subscribe(
            group=args.group, consumer=args.consumer, prefetch=args.prefetch or 1000
        ) as sub:

            async def stop_at_eof() -> None:
                await asyncio.to_thread(sys.stdin.readline)
                sub.stop()

            async with asyncio.TaskGroup() as tg:
                watcher = tg.create_task(stop_at_eof())
                async for msg in sub:
                    msg.ack()
                    got += 1
                watcher.cancel()
        return {"messages": got, "cpu": time.process_time() - c0}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m broker.cli._bench.child")
    parser.add_argument("mode", choices=["memory", "drain"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--channel", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--consumer", default="bench")
    parser.add_argument("--prefetch", type=int, default=None)
    parser.add_argument("--sleep-ms", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args(argv)
    use_uvloop(args.uvloop)
    run = memory if args.mode == "memory" else drain
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
