"""Scaling out (issue 13): the library's paths on a Redis Cluster against one server, and a
merged subscription over many channels.

**Cluster.** The same paths on one server and on a cluster of 3 primaries (3 replicas),
started privately unless ``--cluster-url`` is given: ``publish_many`` and concurrent
``publish()`` with keys to a partitioned channel (12 partitions), and ``chunks`` + batch acks
reading it. Reported: msg/s and client CPU per message on each, their ratio (target: cluster
CPU per message at most 1.2x one server's), and how evenly the commands spread over the
primaries (``INFO commandstats`` per primary; target: each within 25 % of a third).

**Many channels.** A merged subscription over N channels (1, 100, 1000), one of which receives
2,000 messages at about 1,000 msg/s from a publisher in the same process (the method of the
table in issue 13): client CPU per message, client and server CPU while idle, server CPU over
the run, p50 and p99 from publish to the consumer's hands. Target at 1,000 channels:
CPU per message and p99 within 2x of one channel, idle CPU under 2 % (client and server).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import statistics
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import broker
from broker._server_cluster import EmbeddedCluster

from .common import Run, fresh_name, payload, percentile, stopwatch

__all__ = [
    "ChannelsResult",
    "ClusterResult",
    "channels_table",
    "cluster_table",
    "run_channels",
    "run_cluster",
]

Note = Callable[[str], None]
PARTITIONS = 12


# -- cluster against one server -----------------------------------------------------------------


@dataclasses.dataclass
class ClusterResult:
    #: path -> (one server, cluster)
    paths: dict[str, tuple[Run, Run]] = dataclasses.field(default_factory=dict)
    #: primary -> commands it ran during the partitioned run
    spread: dict[str, int] = dataclasses.field(default_factory=dict)
    primaries: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "paths": {
                path: {
                    "single": {"msg_per_s": round(a.rate), "cpu_us": round(a.cpu_us, 2)},
                    "cluster": {"msg_per_s": round(b.rate), "cpu_us": round(b.cpu_us, 2)},
                    "cpu_ratio": round(b.cpu_us / a.cpu_us, 3) if a.cpu_us else None,
                }
                for path, (a, b) in self.paths.items()
            },
            "spread": self.spread,
        }


async def _paths(url: str, messages: int, tasks: int) -> dict[str, Run]:
    out: dict[str, Run] = {}
    ns = fresh_name("bench-scale")
    async with broker.connect(url, namespace=ns) as b:
        try:
            ch = b.channel("orders", partitions=PARTITIONS)
            await ch.create_group("g", start="all")
            data = [payload(i) for i in range(messages)]
            with stopwatch() as w:
                await ch.publish_many(data, key=lambda d: d["id"])
            out["publish_many (keys)"] = w.run(messages)
            per_task = messages // tasks

            async def producer(k: int) -> None:
                for i in range(per_task):
                    await ch.publish(data[i], key=k * per_task + i)

            with stopwatch() as w:
                await asyncio.gather(*(producer(k) for k in range(tasks)))
            out["publish() from tasks (keys)"] = w.run(per_task * tasks)
            total = messages + per_task * tasks
            got = 0
            async with ch.subscribe(group="g", prefetch=2000) as messages_in:
                with stopwatch() as w:
                    async for batch in messages_in.chunks(1000, timeout=0.05):
                        messages_in.ack(batch)
                        got += len(batch)
                        if got >= total:
                            break
                    await messages_in.flush()
            out["chunks(1000) + ack(batch)"] = w.run(got)
        finally:
            await ch.delete()
            for k in [k async for k in b.redis.scan_iter(match=f"{ns}:*")]:
                await b.redis.delete(k)
    return out


def _cluster_client(url: str) -> Any:
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    hosts = url.split("://", 1)[1].split("/")[0].split(",")
    nodes = [ClusterNode(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1])) for h in hosts]
    return RedisCluster(startup_nodes=nodes)


async def _spread(url: str, messages: int) -> dict[str, int]:
    """Publish and consume a partitioned channel; the commands each primary ran."""
    r = _cluster_client(url)
    try:
        await r.initialize()
        primaries = r.get_primaries()
        await r.config_resetstat(target_nodes=primaries)
        await _paths(url, messages, 100)
        stats = await r.info("commandstats", target_nodes=primaries)
        out = {}
        for name, section in stats.items():
            out[name] = sum(
                int(v.get("calls", 0))
                for cmd, v in section.items()
                if isinstance(v, dict)
                and cmd.split("_", 1)[-1] in ("xadd", "xreadgroup", "xack", "spublish", "publish")
            )
        return out
    finally:
        await r.aclose()


@contextlib.asynccontextmanager
async def _a_cluster(url: str | None, note: Note) -> AsyncIterator[str]:
    if url:
        yield url
        return
    cluster = await asyncio.to_thread(EmbeddedCluster, masters=3, replicas=1)
    try:
        await asyncio.to_thread(cluster.start)
        note(f"private cluster of 3 primaries + 3 replicas ({cluster.nodes[0].binary})")
        yield cluster.url
    finally:
        await asyncio.to_thread(cluster.close)


async def run_cluster(
    single_url: str, cluster_url: str | None, messages: int, repeat: int, note: Note
) -> ClusterResult:
    result = ClusterResult()
    async with _a_cluster(cluster_url, note) as url:
        runs: dict[str, list[tuple[Run, Run]]] = {}
        for rep in range(repeat):
            one = await _paths(single_url, messages, 100)
            many = await _paths(url, messages, 100)
            for path in one:
                runs.setdefault(path, []).append((one[path], many[path]))
                note(
                    f"cluster {rep + 1}/{repeat} {path}: one server {one[path].cpu_us:.1f} µs/msg, "
                    f"cluster {many[path].cpu_us:.1f} µs/msg"
                )
        for path, pairs in runs.items():
            result.paths[path] = (
                _median_run([a for a, _ in pairs]),
                _median_run([b for _, b in pairs]),
            )
        result.spread = await _spread(url, messages)
        result.primaries = len(result.spread)
    return result


def _median_run(runs: list[Run]) -> Run:
    cpu_us = statistics.median(r.cpu_us for r in runs)
    rate = statistics.median(r.rate for r in runs)
    n = runs[0].messages
    return Run(n, n / rate if rate else 0.0, cpu_us * n / 1e6)


def cluster_table(res: ClusterResult) -> str:
    lines = [
        "| path | one server msg/s | cluster msg/s | one server CPU µs/msg | cluster CPU µs/msg "
        "| CPU ratio (target ≤ 1.2) | |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for path, (a, b) in res.paths.items():
        ratio = b.cpu_us / a.cpu_us if a.cpu_us else float("nan")
        lines.append(
            f"| {path} | {a.rate:,.0f} | {b.rate:,.0f} | {a.cpu_us:.1f} | {b.cpu_us:.1f} | "
            f"{ratio:.2f}x | {'met' if ratio <= 1.2 else 'missed'} |"
        )
    total = sum(res.spread.values())
    if total:
        lines += [
            "",
            "| primary | commands | share (target 33 % ± 25 % of it) | |",
            "|---|---:|---:|---|",
        ]
        third = total / max(1, res.primaries)
        for name, n in sorted(res.spread.items()):
            ok = abs(n - third) <= 0.25 * third
            lines.append(f"| {name} | {n:,} | {n / total:.1%} | {'met' if ok else 'missed'} |")
    return "\n".join(lines)


# -- many channels in one subscription ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChannelsResult:
    channels: int
    messages: int
    cpu_us: float
    idle_client: float
    idle_server: float
    server_run: float
    p50: float
    p99: float

    def to_json(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def _server_cpu(info: dict[str, Any]) -> float:
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def _channels_once(
    url: str, n: int, messages: int, rate: int, idle_seconds: float
) -> ChannelsResult:
    ns = fresh_name("bench-channels")
    async with broker.connect(url, namespace=ns) as b:
        r = b.redis
        try:
            chans = [b.channel(f"c{i}") for i in range(n)]
            for ch in chans:
                await ch.create_group("g")
            busy = chans[0]
            latencies: list[float] = []
            async with b.subscribe(chans, group="g", prefetch=64) as sub:
                await asyncio.sleep(1.0)  # settled: readers started, bells registered
                cpu0, wall0 = time.process_time(), time.perf_counter()
                srv0 = _server_cpu(await r.info("cpu"))
                await asyncio.sleep(idle_seconds)
                idle_client = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
                idle_server = (_server_cpu(await r.info("cpu")) - srv0) / idle_seconds
                done = asyncio.Event()

                async def consume() -> None:
                    async for msg in sub:
                        latencies.append(time.perf_counter() - msg.data["t"])
                        msg.ack()
                        if len(latencies) >= messages:
                            done.set()
                            return

                task = asyncio.create_task(consume())
                srv0 = _server_cpu(await r.info("cpu"))
                wall0 = time.perf_counter()
                with stopwatch() as w:
                    t0 = time.perf_counter()
                    for i in range(messages):
                        delay = t0 + i / rate - time.perf_counter()
                        if delay > 0:
                            await asyncio.sleep(delay)
                        await busy.publish({"i": i, "t": time.perf_counter()})
                    await asyncio.wait_for(done.wait(), 30)
                server_run = (_server_cpu(await r.info("cpu")) - srv0) / (
                    time.perf_counter() - wall0
                )
                await task
        finally:
            keys = [k async for k in r.scan_iter(match=f"{ns}:*", count=1000)]
            for i in range(0, len(keys), 500):
                await r.delete(*keys[i : i + 500])
    ms = sorted(x * 1000 for x in latencies)
    return ChannelsResult(
        channels=n,
        messages=messages,
        cpu_us=w.cpu / messages * 1e6,
        idle_client=idle_client,
        idle_server=idle_server,
        server_run=server_run,
        p50=percentile(ms, 0.5),
        p99=percentile(ms, 0.99),
    )


async def run_channels(
    url: str,
    counts: tuple[int, ...],
    messages: int,
    rate: int,
    repeat: int,
    note: Note,
    idle_seconds: float = 3.0,
) -> list[ChannelsResult]:
    out = []
    for n in counts:
        runs = []
        for rep in range(repeat):
            got = await _channels_once(url, n, messages, rate, idle_seconds)
            runs.append(got)
            note(
                f"{n} channels {rep + 1}/{repeat}: {got.cpu_us:.0f} µs/msg, p50 {got.p50:.2f} ms, "
                f"p99 {got.p99:.2f} ms, idle client {got.idle_client:.1%} server "
                f"{got.idle_server:.1%}"
            )
        out.append(
            ChannelsResult(
                n,
                messages,
                statistics.median(r.cpu_us for r in runs),
                statistics.median(r.idle_client for r in runs),
                statistics.median(r.idle_server for r in runs),
                statistics.median(r.server_run for r in runs),
                statistics.median(r.p50 for r in runs),
                statistics.median(r.p99 for r in runs),
            )
        )
    return out


def channels_table(results: list[ChannelsResult]) -> str:
    lines = [
        "| channels | client CPU per message | client CPU idle | server CPU idle | server CPU over "
        "the run | p50 | p99 |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.channels:,} | {r.cpu_us:.0f} µs | {r.idle_client:.1%} | {r.idle_server:.1%} "
            f"| {r.server_run:.1%} | {r.p50:.2f} ms | {r.p99:.2f} ms |"
        )
    base = results[0] if results and results[0].channels == 1 else None
    most = results[-1] if results else None
    if base and most and most is not base:
        cpu = most.cpu_us / base.cpu_us
        p99 = most.p99 / base.p99
        idle = max(most.idle_client, most.idle_server)
        lines += [
            "",
            f"At {most.channels:,} channels against one: CPU per message {cpu:.2f}x "
            f"({'met' if cpu <= 2 else 'missed'}, target ≤ 2x), p99 {p99:.2f}x "
            f"({'met' if p99 <= 2 else 'missed'}, target ≤ 2x), idle CPU {idle:.1%} "
            f"({'met' if idle < 0.02 else 'missed'}, target < 2 %).",
        ]
    return "\n".join(lines)
