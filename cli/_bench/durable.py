"""The cost of durable publishes: ``replicas=1`` (one ``WAIT`` per pipelined batch) against the
default, side by side on one master that has a replica.

The server of the run is used when it has a replica; otherwise a private master and replica
(``EmbeddedServer``, the second one ``--replicaof`` the first) are started for these scenarios
and stopped after them, and both sides are measured there. Throughput: ``publish()`` from many
tasks and ``publish_many``; latency: how long an awaited ``publish()`` takes at a fixed rate
(the round trip the producer waits for, which ``WAIT`` adds to), interleaved repetitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Any

import broker

from . import library
from .common import Run, Summary, fresh_name, payload, redis_client, summarize, unlink_namespace
from .latency import Latency, _paced, _summary, combine

__all__ = ["DURABLE", "Durable", "run"]

#: the scenario ids of ``--only``
DURABLE = ["durable.publish", "durable.publish_many", "durable.latency"]


@dataclasses.dataclass
class Durable:
    """Medians by scenario and by ``replicas`` (0: the default, 1: waits for one replica)."""

    #: where it ran: the server's own replica, or a private pair
    where: str
    throughput: dict[str, dict[int, Summary]] = dataclasses.field(default_factory=dict)
    #: replicas -> the awaited ``publish()`` round trip at ``rate``
    latency: dict[int, Latency] = dataclasses.field(default_factory=dict)
    rate: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "where": self.where,
            "throughput": {
                sid: {str(k): s.to_json() for k, s in sides.items()}
                for sid, sides in self.throughput.items()
            },
            "publish_latency_ms": {str(k): v.to_json() for k, v in self.latency.items()},
            "rate": self.rate,
        }


@contextlib.asynccontextmanager
async def replicated(url: str) -> AsyncIterator[tuple[str, str]]:
    """``(url, where)`` of a master with at least one replica: ``url`` itself when it has one,
    else a private pair started for the block."""
    r = redis_client(url)
    try:
        info = await r.info("replication")
    finally:
        await r.aclose()
    if int(info.get("connected_slaves", 0)) >= 1:
        yield url, f"the server's own replica ({info.get('connected_slaves')} connected)"
        return
    from broker import EmbeddedServer

    # started from this (the main) thread, so that they die with this process if it is killed
    master = EmbeddedServer(extra=["--repl-diskless-sync-delay", "0"]).start()
    try:
        replica = EmbeddedServer(extra=["--replicaof", master.bind, str(master.port)]).start()
        try:
            await _synced(replica.url)
            host = urllib.parse.urlsplit(url).hostname or url
            yield (
                master.url,
                (
                    f"a private master and replica on loopback ({host} has no replica): both sides "
                    "measured there"
                ),
            )
        finally:
            replica.close()
    finally:
        master.close()


async def _synced(url: str, within: float = 30.0) -> None:
    r = redis_client(url)
    try:
        deadline = time.monotonic() + within
        while (await r.info("replication")).get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise RuntimeError("the benchmark's replica did not sync")
            await asyncio.sleep(0.05)
    finally:
        await r.aclose()


async def publish_latency(ch: broker.Channel[Any], rate: int, seconds: float) -> Latency:
    """How long an awaited ``publish()`` takes, sends started at ``rate`` per second."""
    total = max(1, int(rate * seconds))
    samples: list[float] = []

    async def send(i: int) -> None:
        t0 = time.perf_counter()
        await ch.publish(payload(i))
        samples.append(time.perf_counter() - t0)

    sent_in = await _paced(total, rate, send)
    return _summary(rate, samples, sent_in)


async def run(
    url: str,
    prefix: str,
    wanted: list[str],
    *,
    messages: int,
    tasks: int,
    repeat: int,
    rate: int,
    seconds: float,
    note: Callable[[str], None],
) -> Durable:
    """Each selected scenario with ``replicas=0`` and ``replicas=1``, interleaved, ``repeat``
    times; medians."""
    async with replicated(url) as (target, where):
        note(f"durable publishes: on {where}")
        ns = fresh_name(f"{prefix}-bench")
        out = Durable(where, rate=rate)
        runs: dict[str, dict[int, list[Run]]] = {sid: {0: [], 1: []} for sid in wanted}
        lat: dict[int, list[Latency]] = {0: [], 1: []}
        try:
            async with broker.connect(target, namespace=ns) as b:
                # -1: an untimed warm-up (not for --quick's tiny sizes: a smoke test)
                for rep in range(-1 if messages >= 10_000 else 0, repeat):
                    for sid in wanted:
                        for replicas in (0, 1):
                            ch = b.channel(f"{sid}-{replicas}-{rep}", replicas=replicas)
                            try:
                                got = await _one(sid, ch, messages if rep >= 0 else 500, tasks,
                                                 rate, seconds if rep >= 0 else 0.1)  # fmt: skip
                            finally:
                                await b.redis.unlink(ch.key)
                            if rep < 0:
                                continue
                            if isinstance(got, Latency):
                                lat[replicas].append(got)
                                note(
                                    f"{sid} replicas={replicas} {rep + 1}/{repeat}: publish "
                                    f"p50 {got.p50:.2f} ms p99 {got.p99:.2f} ms"
                                )
                            else:
                                runs[sid][replicas].append(got)
                                note(
                                    f"{sid} replicas={replicas} {rep + 1}/{repeat}: "
                                    f"{got.rate:,.0f} msg/s, {got.cpu_us:.1f} µs CPU/msg"
                                )
        finally:
            r = redis_client(target)
            try:
                await unlink_namespace(r, ns)
            finally:
                await r.aclose()
    out.throughput = {
        sid: {k: summarize(rs) for k, rs in sides.items()}
        for sid, sides in runs.items()
        if sid != "durable.latency"
    }
    out.latency = {k: combine(v) for k, v in lat.items() if v}
    return out


async def _one(
    sid: str, ch: broker.Channel[Any], n: int, tasks: int, rate: int, seconds: float
) -> Run | Latency:
    match sid:
        case "durable.publish":
            return await library.publish(ch, n, tasks)
        case "durable.publish_many":
            return await library.publish_many(ch, n)
        case "durable.latency":
            return await publish_latency(ch, rate, seconds)
    raise ValueError(f"unknown scenario {sid!r}")
