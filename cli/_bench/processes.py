"""Scenarios that run consumers as separate processes (``broker.cli._bench.child``): the memory of a
consumer facing a large backlog, and throughput with 1, 2, 4 consumer processes in one group."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import Run

__all__ = ["Memory", "child_argv", "drain", "memory"]

ROOT = Path(__file__).resolve().parents[2]


def child_argv(
    mode: str, url: str, namespace: str, channel: str, group: str, **opts: Any
) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "broker.cli._bench.child",
        mode,
        "--url",
        url,
        "--namespace",
        namespace,
    ]
    argv += ["--channel", channel, "--group", group]
    for name, value in opts.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        elif value is not None:
            argv += [flag, str(value)]
    return argv


async def _spawn(argv: list[str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,  # a checkout run without installing finds ``cli`` there
    )


async def _result(proc: asyncio.subprocess.Process, within: float) -> dict[str, Any]:
    try:
        async with asyncio.timeout(within):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RuntimeError(f"benchmark consumer {proc.pid} did not finish in {within}s") from None
    lines = out.decode().strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark consumer failed ({proc.returncode}): {err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


@dataclasses.dataclass(frozen=True)
class Memory:
    """Median over runs, MiB."""

    backlog: int
    prefetch: int
    idle_mb: float
    peak_mb: float
    max_held: int
    consumed: int
    seconds: float

    @property
    def over_idle_mb(self) -> float:
        return self.peak_mb - self.idle_mb

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["over_idle_mb"] = self.over_idle_mb
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in d.items()}


async def memory(
    url: str,
    namespace: str,
    channel: str,
    groups: Sequence[str],
    *,
    backlog: int,
    prefetch: int | None,
    seconds: float,
    sleep_ms: float,
    uvloop: bool,
) -> Memory:
    """One consumer process per group (each group starts at the beginning of the backlog):
    ``async for`` with a handler sleeping ``sleep_ms``, for ``seconds``."""
    runs = []
    for group in groups:
        argv = child_argv(
            "memory",
            url,
            namespace,
            channel,
            group,
            prefetch=prefetch,
            seconds=seconds,
            sleep_ms=sleep_ms,
            uvloop=uvloop,
        )
        proc = await _spawn(argv)
        runs.append(await _result(proc, seconds + 60))
    return Memory(
        backlog=backlog,
        prefetch=int(runs[0]["prefetch"]),
        idle_mb=statistics.median(r["idle_kb"] for r in runs) / 1024,
        peak_mb=statistics.median(r["peak_kb"] for r in runs) / 1024,
        max_held=max(int(r["max_held"]) for r in runs),
        consumed=int(statistics.median(r["consumed"] for r in runs)),
        seconds=seconds,
    )


async def _group_done(r: Any, key: str, group: str, n: int) -> bool:
    """Every one of the ``n`` entries delivered and acked: nothing pending, and the group's
    position at the stream's last entry (``entries-read`` can be unknown, so not that)."""
    last = (await r.xinfo_stream(key))["last-generated-id"]
    for g in await r.xinfo_groups(key):
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == group:
            return int(g["pending"]) == 0 and g["last-delivered-id"] == last
    return False


async def drain(
    r: Any,
    url: str,
    namespace: str,
    channel: str,
    key: str,
    group: str,
    *,
    processes: int,
    n: int,
    prefetch: int,
    uvloop: bool,
    within: float = 600.0,
) -> Run:
    """``processes`` consumers in one group drain a backlog of ``n``: timed from the moment all
    are connected and told to go until the group has read everything and nothing is pending.
    CPU is the sum over the consumer processes."""
    await r.xgroup_create(key, group, id="0")
    procs = [
        await _spawn(
            child_argv(
                "drain",
                url,
                namespace,
                channel,
                group,
                consumer=f"c{i}",
                prefetch=prefetch,
                uvloop=uvloop,
            )
        )
        for i in range(processes)
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            async with asyncio.timeout(60):
                line = await p.stdout.readline()
            if line.strip() != b"ready":
                raise RuntimeError(f"benchmark consumer {p.pid} did not start: {line!r}")
        t0 = time.perf_counter()
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(b"go\n")
            await p.stdin.drain()
        async with asyncio.timeout(within):
            # the consumers are other processes: the server is the only place to watch them
            while not await _group_done(r, key, group, n):  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        seconds = time.perf_counter() - t0
        for p in procs:
            assert p.stdin is not None
            p.stdin.close()
        results = [await _result(p, 60) for p in procs]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    got = sum(int(x["messages"]) for x in results)
    return Run(got, seconds, sum(float(x["cpu"]) for x in results))
