"""Watched values across processes (issue 15): set → seen latency, beside raw PUBLISH → receive.

The writer is the bench process: at a fixed rate (``RATE`` values/s, an absolute schedule), a
warm-up then ``seconds`` measured, it sends a 5-field payload whose ``ts`` is
``time.monotonic_ns()`` taken just before the send starts. The reader is another process
(``python -m broker.cli._bench.watch``, started before the writer begins): it takes
``time.monotonic_ns()`` when the value is in its hands, decoded, and subtracts ``ts``.
CLOCK_MONOTONIC is one clock for the whole host on Linux, so the two are comparable.

- raw: redis-py ``PUBLISH`` on one connection; the reader is a redis-py ``PubSub`` (``listen()``,
  the payload unpacked with msgpack).
- watch: ``await w.set(value)`` (one Lua script: write, version, ``PUBLISH``); the reader is
  ``async with w.subscribe() as values: async for v in values``.

Only values the reader saw count. A watch reader skips to the newest value by design; at a
modest fixed rate it should see every one, and the report says how many it saw. Both readers
of a repetition start together (their imports overlap), the sides run one after the other,
in alternating order; medians over repetitions.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack

import broker

from .common import payload, percentile, redis_client, use_uvloop

__all__ = ["RATE", "TARGET", "Side", "WatchBench", "main", "run"]

#: values per second the writer sets (or publishes)
RATE = 200
#: the target of issue 15: watch p50 within this factor of raw PUBLISH → receive
TARGET = 1.5
#: the id of the last value: the reader stops when it sees it (the newest value always arrives)
STOP = -1
ROOT = Path(__file__).resolve().parents[2]
SIDES = ("raw", "watch")

Note = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Side:
    """One path, milliseconds; medians over repetitions (``sent`` and ``seen`` are sums)."""

    #: measured values sent (the warm-up not counted), and how many of them the reader saw
    sent: int
    seen: int
    p50: float
    p99: float
    max: float
    #: the writer's ``await`` of one send (``PUBLISH`` or ``set``), p50
    send_p50: float
    #: watch only: change messages the readers received, and their re-reads of the server
    messages: int | None = None
    rereads: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            k: round(v, 3) if isinstance(v, float) else v
            for k, v in dataclasses.asdict(self).items()
        }


@dataclasses.dataclass(frozen=True)
class WatchBench:
    rate: int
    seconds: float
    warm_seconds: float
    repeat: int
    raw: Side
    watch: Side

    @property
    def p50_ratio(self) -> float:
        return self.watch.p50 / self.raw.p50 if self.raw.p50 > 0 else float("nan")

    @property
    def p99_ratio(self) -> float:
        return self.watch.p99 / self.raw.p99 if self.raw.p99 > 0 else float("nan")

    @property
    def met(self) -> bool:
        return self.p50_ratio <= TARGET

    def to_json(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "seconds": self.seconds,
            "warm_seconds": self.warm_seconds,
            "repeat": self.repeat,
            "raw": self.raw.to_json(),
            "watch": self.watch.to_json(),
            "p50_ratio": round(self.p50_ratio, 3),
            "p99_ratio": round(self.p99_ratio, 3),
            "target": f"watch p50 ≤ {TARGET} x raw PUBLISH → receive",
            "met": self.met,
        }

    def lines(self) -> list[str]:
        """The Markdown section of ``broker bench``."""
        runs = f"median{'s' if self.repeat > 1 else ''} of {self.repeat}"
        w, r = self.watch, self.raw
        rows = [
            ("raw redis-py: `PUBLISH` → `PubSub.listen()`", r, "", ""),
            (
                "broker: `watch.set()` → `async for` over `subscribe()`",
                w,
                f"{self.p50_ratio:.2f}x",
                f"{self.p99_ratio:.2f}x",
            ),
        ]
        out = [
            "",
            f"### Watched values: set → seen in another process ({self.rate} values/s, "
            f"{self.seconds:g} s after a {self.warm_seconds:g} s warm-up, {runs})",
            "",
            "| path | sent | seen | p50 ms | p99 ms | max ms | p50 x raw | p99 x raw | "
            "writer's await p50 ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        out += [
            f"| {name} | {s.sent:,} | {s.seen:,} | {s.p50:.2f} | {s.p99:.2f} | {s.max:.2f} | "
            f"{p50} | {p99} | {s.send_p50:.2f} |"
            for name, s, p50, p99 in rows
        ]
        verdict = "met" if self.met else "**missed**"
        out += [
            "",
            f"Target (issue 15): watch p50 ≤ {TARGET} x raw: {self.p50_ratio:.2f}x, {verdict}. "
            f"The watch readers received {w.messages:,} change messages and read the value "
            f"from the server {w.rereads:,} time(s) (once per reader, at its start).",
        ]
        return out


# -- the writer (this process) ---------------------------------------------------------------


async def _paced(
    total: int, rate: int, send: Callable[[int], Awaitable[Any]], first: int
) -> list[int]:
    """``send(i)`` for i < total, value i not before ``t0 + i / rate``; one at a time (a watch
    has one writer), and a late send does not shift the ones after it. Returns how long each
    ``send(i)`` took for i >= first, ns."""
    took: list[int] = []
    t0 = time.perf_counter()
    for i in range(total):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        started = time.perf_counter_ns()
        await send(i)
        if i >= first:
            took.append(time.perf_counter_ns() - started)
    return took


def _value(i: int) -> dict[str, Any]:
    value = payload(i)
    value["ts"] = time.monotonic_ns()
    return value


async def _spawn(argv: list[str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,  # a checkout run without installing finds ``cli`` there
        limit=2**24,  # the result is one long line
    )


async def _line(proc: asyncio.subprocess.Process, within: float) -> bytes:
    assert proc.stdout is not None
    async with asyncio.timeout(within):
        line = await proc.stdout.readline()
    if not line:
        assert proc.stderr is not None
        err = await proc.stderr.read()
        await proc.wait()
        raise RuntimeError(f"watch bench reader failed ({proc.returncode}): {err.decode()[-2000:]}")
    return line


async def _finish(
    proc: asyncio.subprocess.Process, stop: Callable[[], Awaitable[Any]]
) -> dict[str, Any]:
    """Send the stop value (again every 2 s: raw pub/sub is at-most-once) until the reader
    prints its result."""
    for _ in range(10):
        await stop()
        try:
            line = await _line(proc, 2.0)
        except TimeoutError:
            continue
        await proc.wait()
        result: dict[str, Any] = json.loads(line)
        return result
    raise RuntimeError(f"watch bench reader {proc.pid} did not stop")


async def _measure(
    proc: asyncio.subprocess.Process,
    send: Callable[[int], Awaitable[Any]],
    rate: int,
    warm: int,
    measured: int,
) -> tuple[list[int], dict[str, Any]]:
    """Latencies (ns) of the measured values the reader saw, and the reader's result (with
    ``sends``: how long the writer's sends took, ns)."""
    sends = await _paced(warm + measured, rate, send, warm)
    # the stop value after a pause: right behind the last one, a watch reader could skip that
    await asyncio.sleep(max(1 / rate, 0.05))
    result = await _finish(proc, lambda: send(STOP))
    seen = [int(ns) for seq, ns in result.pop("seen") if seq >= warm]
    result["sends"] = sends
    return seen, result


def _summary(runs: list[tuple[list[int], dict[str, Any]]], measured: int, watch: bool) -> Side:
    stats = []
    sends = []
    for samples, result in runs:
        took = sorted(result["sends"])
        sends.append(percentile(took, 0.50) / 1e6)
        ms = sorted(ns / 1e6 for ns in samples)
        stats.append((percentile(ms, 0.50), percentile(ms, 0.99), ms[-1] if ms else float("nan")))
    return Side(
        sent=measured * len(runs),
        seen=sum(len(samples) for samples, _ in runs),
        p50=statistics.median(s[0] for s in stats),
        p99=statistics.median(s[1] for s in stats),
        max=statistics.median(s[2] for s in stats),
        send_p50=statistics.median(sends),
        messages=sum(int(r["messages"]) for _, r in runs) if watch else None,
        rereads=sum(int(r["rereads"]) for _, r in runs) if watch else None,
    )


def _argv(side: str, url: str, namespace: str, name: str, uvloop: bool) -> list[str]:
    return [
        sys.executable,
        "-m",
        "broker.cli._bench.watch",
        side,
        "--url",
        url,
        "--namespace",
        namespace,
        "--name",
        name,
        "--uvloop" if uvloop else "--no-uvloop",
    ]


async def _repetition(
    r: Any,
    b: broker.Broker,
    url: str,
    rep: int,
    order: tuple[str, ...],
    rate: int,
    warm: int,
    measured: int,
    uvloop: bool,
) -> dict[str, tuple[list[int], dict[str, Any]]]:
    """Both readers started (together), then each side measured in ``order``."""
    w = b.watch(f"watchbench-{rep}")
    channel = f"{b.namespace}:watchbench-raw-{rep}"

    async def publish(i: int) -> None:
        await r.publish(channel, msgpack.packb(_value(i)))

    async def set_value(i: int) -> None:
        await w.set(_value(i))

    senders = {"raw": publish, "watch": set_value}
    procs = {
        "raw": await _spawn(_argv("raw", url, b.namespace, channel, uvloop)),
        "watch": await _spawn(_argv("watch", url, b.namespace, w.name, uvloop)),
    }
    try:
        for side, proc in procs.items():
            if (await _line(proc, 60.0)).strip() != b"ready":
                raise RuntimeError(f"watch bench reader ({side}) did not start")
        return {
            side: await _measure(procs[side], senders[side], rate, warm, measured) for side in order
        }
    finally:
        for proc in procs.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        await r.unlink(w.key, w.version_key)


async def run(
    r: Any,
    b: broker.Broker,
    url: str,
    *,
    repeat: int,
    seconds: float,
    uvloop: bool,
    note: Note,
    rate: int = RATE,
) -> WatchBench:
    """``repeat`` repetitions of both sides: the writer is ``r`` (raw) and ``b`` (watch), each
    reader another process connected to ``url`` in ``b``'s namespace. Keys are deleted after
    each repetition."""
    warm_seconds = min(1.0, seconds)
    warm, measured = max(1, round(rate * warm_seconds)), max(1, round(rate * seconds))
    per: dict[str, list[tuple[list[int], dict[str, Any]]]] = {side: [] for side in SIDES}
    for rep in range(repeat):
        order = SIDES if rep % 2 == 0 else SIDES[::-1]
        got = await _repetition(r, b, url, rep, order, rate, warm, measured, uvloop)
        for side in SIDES:
            per[side].append(got[side])
        raw_ms, watch_ms = (sorted(got[s][0]) for s in SIDES)
        note(
            f"watch {rep + 1}/{repeat}: raw p50 {percentile(raw_ms, 0.5) / 1e6:.2f} ms, "
            f"watch p50 {percentile(watch_ms, 0.5) / 1e6:.2f} ms; seen "
            f"{len(raw_ms)}/{measured} and {len(watch_ms)}/{measured}"
        )
    return WatchBench(
        rate=rate,
        seconds=seconds,
        warm_seconds=warm_seconds,
        repeat=repeat,
        raw=_summary(per["raw"], measured, watch=False),
        watch=_summary(per["watch"], measured, watch=True),
    )


# -- the reader (a child process) ------------------------------------------------------------


async def _read_raw(url: str, channel: str) -> dict[str, Any]:
    seen: list[tuple[int, int]] = []
    unpackb = msgpack.unpackb
    r = redis_client(url)
    try:
        ps = r.pubsub()
        await ps.subscribe(channel)
        async for message in ps.listen():
            if message["type"] == "subscribe":
                print("ready", flush=True)
                continue
            if message["type"] != "message":
                continue
            value = unpackb(message["data"])
            now = time.monotonic_ns()
            if value["id"] == STOP:
                break
            seen.append((value["id"], now - value["ts"]))
        await ps.aclose()
    finally:
        await r.aclose()
    return {"seen": seen}


async def _read_watch(url: str, namespace: str, name: str) -> dict[str, Any]:
    seen: list[tuple[int, int]] = []
    async with broker.connect(url, namespace=namespace) as b:
        async with b.watch(name).subscribe() as values:
            print("ready", flush=True)
            async for v in values:
                now = time.monotonic_ns()
                if v.value["id"] == STOP:
                    break
                seen.append((v.value["id"], now - v.value["ts"]))
            s = values.statistics()
    return {"seen": seen, "messages": s.messages, "rereads": s.rereads, "yielded": s.yielded}


def main(argv: list[str] | None = None) -> None:
    """``python -m broker.cli._bench.watch raw|watch --url URL --namespace NS --name NAME``:
    print ``ready`` once subscribed, record until the stop value, print one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m broker.cli._bench.watch")
    parser.add_argument("side", choices=SIDES)
    parser.add_argument("--url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--name", required=True, help="the raw channel or the watch's name")
    parser.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args(argv)
    use_uvloop(args.uvloop)
    if args.side == "raw":
        result = asyncio.run(_read_raw(args.url, args.name))
    else:
        result = asyncio.run(_read_watch(args.url, args.namespace, args.name))
    print(json.dumps(result, separators=(",", ":")), flush=True)


if __name__ == "__main__":
    main()
