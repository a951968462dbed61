"""One benchmark run: every selected scenario, side by side on one server, repeated; medians.

Everything is written under a fresh namespace and deleted at the end (and each scenario's keys
right after it ran).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import broker

from . import durable, latency, library, processes, raw, scale
from . import faststream as fs
from . import request as request_bench
from . import watch as watch_bench
from .common import (
    Run,
    Summary,
    fresh_name,
    loop_name,
    optional,
    payload_size,
    redis_client,
    summarize,
    unlink_namespace,
)
from .latency import Latency

__all__ = ["GROUPS", "Options", "Results", "run", "select"]

PUBLISH = ["raw.publish", "lib.publish", "lib.publish_many", "fs.publish", "fs.publish_pipelined"]
CONSUME = [
    "raw.consume",
    "lib.iterate",
    "lib.chunks",
    "lib.consume",
    "fs.consume",
    "fs.consume_batch",
]
THROUGHPUT = PUBLISH + CONSUME
GROUPS: dict[str, list[str]] = {
    "publish": PUBLISH,
    "consume": CONSUME,
    "latency": ["latency"],
    "memory": ["memory"],
    "processes": ["processes"],
    # scaling out (issue 13): a cluster against one server; many channels in a subscription
    "cluster": ["cluster"],
    "channels": ["channels"],
    # failover (issue 14): replicas=1 against the default
    "durable": durable.DURABLE,
    # watched values (issue 15): set -> seen in another process, against raw PUBLISH
    "watch": ["watch"],
    # request/reply (issue 15): round trip against raw redis-py and FastStream
    "request": ["request"],
}
#: measured only when named in ``--only``: two reader processes per repetition
OPT_IN = ["watch", "request"]
ALL = [*THROUGHPUT, "latency", "memory", "processes", "cluster", "channels", *durable.DURABLE]
ALL += OPT_IN


def select(only: str | None) -> list[str]:
    """Scenario ids from ``--only``: group names (publish, consume, latency, memory,
    processes, durable; watch only when named), scenario ids (``lib.iterate``) or their
    prefixes (``raw``, ``lib``, ``fs``).

    :raises ValueError: naming the valid words.
    """
    if not only:
        return [s for s in ALL if s not in OPT_IN]
    chosen: set[str] = set()
    for word in (w.strip() for w in only.split(",")):
        if not word:
            continue
        if word == "faststream":
            word = "fs"
        ids = GROUPS.get(word) or [s for s in ALL if s == word or s.startswith(word + ".")]
        if not ids:
            valid = ", ".join([*GROUPS, "raw", "lib", "fs", *THROUGHPUT])
            raise ValueError(f"unknown scenario {word!r} in --only; use any of: {valid}")
        chosen.update(ids)
    return [s for s in ALL if s in chosen]


@dataclasses.dataclass(frozen=True)
class Options:
    messages: int = 100_000
    #: FastStream's per-message paths are slow: fewer messages give the same rate
    fs_messages: int = 20_000
    tasks: int = 1000
    concurrency: int = 32
    prefetch: int = 1000
    chunk: int = 1000
    repeat: int = 3
    scenarios: tuple[str, ...] = tuple(ALL)
    faststream: bool = True
    rates: tuple[int, ...] = (1000, 5000)
    latency_seconds: float = 3.0
    #: latency: this many separate runs, each reported (0: medians of ``repeat``)
    latency_runs: int = 0
    backlog: int = 1_000_000
    memory_seconds: float = 5.0
    handler_ms: float = 1.0
    processes: tuple[int, ...] = (1, 2, 4)
    process_messages: int = 200_000
    uvloop: bool = False
    #: the cluster scenario: a cluster's URL (None: a private one is started)
    cluster_url: str | None = None
    cluster_messages: int = 50_000
    #: the many-channels scenario
    channel_counts: tuple[int, ...] = (1, 100, 1000)
    channel_messages: int = 2_000
    channel_rate: int = 1000
    #: the request scenario: sequential round trips per side
    request_count: int = 2_000

    @property
    def chunk_prefetch(self) -> int:
        """Room for the next chunk while one is being acked."""
        return max(self.prefetch, 2 * self.chunk)


@dataclasses.dataclass
class Results:
    options: Options
    machine: dict[str, Any]
    throughput: dict[str, Summary] = dataclasses.field(default_factory=dict)
    #: side ("raw" or "lib") -> rate -> medians
    latency: dict[str, dict[int, latency.Latency]] = dataclasses.field(default_factory=dict)
    #: with ``latency_runs``: each run's figures, side -> rate -> figures
    latency_runs: list[dict[str, dict[int, Latency]]] = dataclasses.field(default_factory=list)
    memory: list[processes.Memory] = dataclasses.field(default_factory=list)
    processes: dict[int, Summary] = dataclasses.field(default_factory=dict)
    #: replicas=1 against the default (on a master with a replica)
    durable: durable.Durable | None = None
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)
    cluster: scale.ClusterResult | None = None
    channels: list[scale.ChannelsResult] = dataclasses.field(default_factory=list)
    watch: watch_bench.WatchBench | None = None
    #: side ("raw", "lib", "faststream") -> round-trip figures
    request: dict[str, Any] | None = None
    seconds: float = 0.0


Note = Callable[[str], None]


class _Context:
    def __init__(self, url: str, namespace: str, r: Any, b: broker.Broker, opts: Options) -> None:
        self.url = url
        self.ns = namespace
        self.r = r
        self.b = b
        self.opts = opts

    def size(self, sid: str) -> int:
        n = self.opts.messages
        return min(n, self.opts.fs_messages) if sid in ("fs.publish", "fs.consume") else n

    async def warm_up(self, sid: str) -> None:
        """One small untimed run: imports, connections and code paths are warm for the first
        measured repetition."""
        await self.throughput(sid, -1, min(self.size(sid), 2_000))

    def key(self, tag: str) -> str:
        return f"{self.ns}:{tag}"

    async def unlink(self, *keys: str) -> None:
        await self.r.unlink(*keys)

    async def throughput(self, sid: str, rep: int, n: int | None = None) -> Run:
        n = self.size(sid) if n is None else n
        opts = self.opts
        tag = f"{sid}-{'warm' if rep < 0 else rep}"
        if sid.startswith("lib."):
            ch = self.b.channel(tag)
            keys = [ch.key, f"{ch.key}:dead"]
        else:
            key = self.key(tag)
            keys = [key]
        try:
            match sid:
                case "raw.publish":
                    return await raw.publish(self.r, key, n)
                case "raw.consume":
                    await raw.fill(self.r, key, n)
                    return await raw.consume(self.r, key, "g", n)
                case "lib.publish":
                    return await library.publish(ch, n, opts.tasks)
                case "lib.publish_many":
                    return await library.publish_many(ch, n)
                case "lib.iterate":
                    await raw.fill(self.r, ch.key, n)
                    return await library.iterate(ch, "g", n, opts.prefetch)
                case "lib.chunks":
                    await raw.fill(self.r, ch.key, n)
                    return await library.chunks(ch, "g", n, opts.chunk, opts.chunk_prefetch)
                case "lib.consume":
                    await raw.fill(self.r, ch.key, n)
                    return await library.consume(self.b, ch, "g", n, opts.concurrency)
                case "fs.publish":
                    return await fs.publish(self.url, key, n, opts.tasks)
                case "fs.publish_pipelined":
                    return await fs.publish_pipelined(self.url, key, n)
                case "fs.consume" | "fs.consume_batch":
                    await fs.fill(self.url, key, n)
                    await self.r.xgroup_create(key, "g", id="0")
                    consume = fs.consume if sid == "fs.consume" else fs.consume_batch
                    return await consume(self.url, key, "g", n)
            raise ValueError(f"unknown scenario {sid!r}")
        finally:
            await self.unlink(*keys)


async def _machine(r: Any, url: str, loop: str, fs_version: str | None) -> dict[str, Any]:
    info = await r.info("server")
    parts = urllib.parse.urlsplit(url)  # never the password
    hiredis = optional("hiredis")
    redis_py = optional("redis")
    return {
        "redis_server": info.get("redis_version"),
        "server": f"{parts.hostname or parts.path}:{parts.port or ''}".rstrip(":"),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "loop": loop,
        "redis_py": getattr(redis_py, "__version__", "?"),
        "hiredis": getattr(hiredis, "__version__", None),
        "faststream": fs_version,
        "broker": broker.__version__,
        "payload_bytes": payload_size(),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


async def _step(note: Note, label: str, fn: Callable[[], Awaitable[Any]]) -> Any:
    t0 = time.perf_counter()
    result = await fn()
    note(f"{label} ({time.perf_counter() - t0:.1f}s)")
    return result


async def run(url: str, opts: Options, note: Note, prefix: str = "broker") -> Results:
    """Run the selected scenarios against ``url`` in a fresh namespace ``<prefix>-bench-<hex>``
    (deleted at the end) and return the medians."""
    started = time.perf_counter()
    fs_version = fs.available()
    r = redis_client(url)
    ns = fresh_name(f"{prefix}-bench")
    try:
        results = Results(opts, await _machine(r, url, loop_name(), fs_version))
        wanted = list(opts.scenarios)
        if not opts.faststream or fs_version is None:
            reason = "disabled (--no-faststream)" if not opts.faststream else "not installed"
            for sid in [s for s in wanted if s.startswith("fs.")]:
                results.skipped[sid] = reason
                wanted.remove(sid)
        async with broker.connect(url, namespace=ns) as b:
            ctx = _Context(url, ns, r, b, opts)
            await _throughputs(ctx, [s for s in wanted if s in THROUGHPUT], results, note)
            if "latency" in wanted:
                await _latencies(ctx, results, note)
            if "memory" in wanted:
                await _memory(ctx, results, note)
            if "processes" in wanted:
                await _processes(ctx, results, note)
            if "watch" in wanted:
                results.watch = await watch_bench.run(
                    r,
                    b,
                    url,
                    repeat=opts.repeat,
                    seconds=opts.latency_seconds,
                    uvloop=opts.uvloop,
                    note=note,
                )
            if "request" in wanted:
                results.request = await _step(
                    note,
                    "request round trips",
                    lambda: request_bench.measure(url, opts.request_count, f"{ns}-request"),
                )
        if "cluster" in wanted:
            results.cluster = await _step(
                note,
                "cluster against one server",
                lambda: scale.run_cluster(
                    url, opts.cluster_url, opts.cluster_messages, opts.repeat, note
                ),
            )
        if "channels" in wanted:
            results.channels = await _step(
                note,
                "many channels in one subscription",
                lambda: scale.run_channels(
                    url,
                    opts.channel_counts,
                    opts.channel_messages,
                    opts.channel_rate,
                    max(1, min(opts.repeat, 3)),
                    note,
                    idle_seconds=3.0 if opts.channel_messages >= 1000 else 0.5,
                ),
            )
        chosen = [s for s in durable.DURABLE if s in wanted]
        if chosen:
            results.durable = await durable.run(
                url,
                prefix,
                chosen,
                messages=opts.messages,
                tasks=opts.tasks,
                repeat=opts.repeat,
                rate=opts.rates[0],
                seconds=opts.latency_seconds,
                note=note,
            )
        results.seconds = time.perf_counter() - started
        return results
    finally:
        try:
            await unlink_namespace(r, ns)
        finally:
            await r.aclose()


async def _throughputs(ctx: _Context, ids: list[str], results: Results, note: Note) -> None:
    runs: dict[str, list[Run]] = {sid: [] for sid in ids}
    for sid in ids:
        await ctx.warm_up(sid)
    for rep in range(ctx.opts.repeat):
        for sid in ids:  # interleaved, so drift on a shared machine hits every scenario alike
            result = await ctx.throughput(sid, rep)
            runs[sid].append(result)
            note(
                f"{sid} {rep + 1}/{ctx.opts.repeat}: {result.rate:,.0f} msg/s, "
                f"{result.cpu_us:.1f} µs CPU/msg"
            )
    results.throughput = {sid: summarize(rs) for sid, rs in runs.items()}


async def _latencies(ctx: _Context, results: Results, note: Note) -> None:
    opts = ctx.opts
    per: dict[str, dict[int, list[latency.Latency]]] = {"raw": {}, "lib": {}}
    reps = opts.latency_runs or opts.repeat
    for rep in range(reps):
        this: dict[str, dict[int, Latency]] = {"raw": {}, "lib": {}}
        for rate in opts.rates:
            got, lib = await latency.side_by_side(
                ctx.r, ctx.b, f"latency-{rate}-{rep}", rate, opts.latency_seconds, ctx.unlink
            )
            per["raw"].setdefault(rate, []).append(got)
            per["lib"].setdefault(rate, []).append(lib)
            this["raw"][rate], this["lib"][rate] = got, lib
            note(
                f"latency {rate}/s {rep + 1}/{reps}: raw p50 {got.p50:.2f} ms p99 "
                f"{got.p99:.2f} ms; broker p50 {lib.p50:.2f} ms p99 {lib.p99:.2f} ms"
            )
        if opts.latency_runs:
            results.latency_runs.append(this)
    results.latency = {
        side: {rate: latency.combine(runs) for rate, runs in rates.items()}
        for side, rates in per.items()
    }


async def _memory(ctx: _Context, results: Results, note: Note) -> None:
    opts = ctx.opts
    ch = ctx.b.channel("memory")
    try:
        await _step(
            note,
            f"memory: backlog of {opts.backlog:,} written",
            lambda: raw.fill(ctx.r, ch.key, opts.backlog),
        )
        for prefetch in _distinct([None, opts.prefetch]):
            groups = [f"mem-{prefetch or 'default'}-{rep}" for rep in range(opts.repeat)]
            for g in groups:
                await ctx.r.xgroup_create(ch.key, g, id="0")
            m = await processes.memory(
                ctx.url,
                ctx.ns,
                ch.name,
                groups,
                backlog=opts.backlog,
                prefetch=prefetch,
                seconds=opts.memory_seconds,
                sleep_ms=opts.handler_ms,
                uvloop=opts.uvloop,
            )
            results.memory.append(m)
            note(
                f"memory, prefetch {m.prefetch}: idle {m.idle_mb:.1f} MB, peak {m.peak_mb:.1f} MB, "
                f"at most {m.max_held} held"
            )
    finally:
        await ctx.unlink(ch.key)


async def _processes(ctx: _Context, results: Results, note: Note) -> None:
    opts = ctx.opts
    ch = ctx.b.channel("processes")
    n = opts.process_messages
    runs: dict[int, list[Run]] = {k: [] for k in opts.processes}
    try:
        await raw.fill(ctx.r, ch.key, n)
        for rep in range(opts.repeat):
            for k in opts.processes:
                got = await processes.drain(
                    ctx.r,
                    ctx.url,
                    ctx.ns,
                    ch.name,
                    ch.key,
                    f"p{k}-{rep}",
                    processes=k,
                    n=n,
                    prefetch=opts.prefetch,
                    uvloop=opts.uvloop,
                )
                runs[k].append(got)
                note(f"{k} consumer processes {rep + 1}/{opts.repeat}: {got.rate:,.0f} msg/s")
    finally:
        await ctx.unlink(ch.key)
    results.processes = {k: summarize(rs) for k, rs in runs.items()}


def _distinct(values: Iterable[int | None]) -> list[int | None]:
    out: list[int | None] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out
