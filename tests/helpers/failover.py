"""Load for the failover tests: producers that publish with and without ``replicas`` to one
channel, consumers that hold each message a moment before acking it (so that entries are
pending when the master dies), and the bookkeeping the tests compare and report.

With ``bulk`` (another channel on the same node), two more producers write ``publish_many``
blocks as fast as they are answered, one with ``replicas=1`` and one without, so that much is
in flight when the master dies; nobody consumes that channel: what was acknowledged is compared
with what the promoted replica holds.

Every payload is ``{"k": "durable" | "plain", "i": <sequence>}``: unique, so messages are
compared by payload, not by id (a promoted replica may hand out again an id that the dead master
had returned for an entry it lost).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time
from typing import Any

import broker

__all__ = ["Load", "Report"]


@dataclasses.dataclass
class Report:
    durable_ok: int
    durable_uncertain: int
    durable_lost: list[int]
    plain_ok: int
    plain_lost: list[int]
    bulk_durable_ok: int
    bulk_durable_lost: list[int]
    bulk_plain_ok: int
    bulk_plain_lost: list[int]
    failed: list[str]
    duplicates: int
    consumer_gap: float
    publish_gap: float

    def line(self, label: str) -> str:
        return (
            f"{label}: replicas=1: {self.durable_ok} acknowledged, {len(self.durable_lost)} "
            f"lost, {self.durable_uncertain} not confirmed (ReplicationTimeoutError); "
            f"replicas=0: {self.plain_ok} acknowledged, {len(self.plain_lost)} lost; bulk "
            f"publish_many with replicas=1: {self.bulk_durable_ok} acknowledged, "
            f"{len(self.bulk_durable_lost)} lost; without: {self.bulk_plain_ok} acknowledged, "
            f"{len(self.bulk_plain_lost)} lost; "
            f"{self.duplicates} duplicate deliveries; consumers' gap {self.consumer_gap:.2f}s, "
            f"publishers' gap {self.publish_gap:.2f}s; other errors: {len(self.failed)}"
        )


class Load:
    """Producers and consumers on ``channel`` until :meth:`stop_producing`.

    :param hold: seconds a consumer holds a message before acking it.
    """

    def __init__(
        self,
        b: broker.Broker,
        channel: broker.Channel[Any],
        *,
        producers: int = 3,
        rate: float = 60.0,
        consumers: int = 2,
        hold: float = 0.005,
        group: str = "g",
        brokers: list[broker.Broker] | None = None,
        bulk: broker.Channel[Any] | None = None,
        block: int = 100,
    ) -> None:
        self.b = b
        self.channel = channel
        self.producers = producers
        self.rate = rate
        self.consumers = consumers
        self.hold = hold
        self.group = group
        #: one broker per consumer (separate processes' worth of connections), default ``b``
        self.brokers = brokers or [b] * consumers
        self.bulk = bulk
        self.block = block
        #: bulk: sequence -> acknowledged, per kind
        self.bulk_ok: dict[str, set[int]] = {"durable": set(), "plain": set()}
        #: sequence -> id returned, per kind
        self.ok: dict[str, dict[int, str]] = {"durable": {}, "plain": {}}
        self.uncertain: dict[int, str] = {}
        self.failed: list[str] = []
        #: (kind, sequence) -> when consumed (each delivery)
        self.consumed: dict[tuple[str, int], list[float]] = {}
        self.returned_at: list[float] = []
        self._seq = {"durable": 0, "plain": 0, "bulk-durable": 0, "bulk-plain": 0}
        self._producing = asyncio.Event()
        self._consuming = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Load:
        self._producing.set()
        self._consuming.set()
        for k in range(self.consumers):
            self._tasks.append(asyncio.create_task(self._consume(k)))
        for _ in range(self.producers):
            self._tasks.append(asyncio.create_task(self._produce("durable", None)))
            self._tasks.append(asyncio.create_task(self._produce("plain", 0)))
        if self.bulk is not None:
            self._tasks.append(asyncio.create_task(self._produce_bulk("durable", 1)))
            self._tasks.append(asyncio.create_task(self._produce_bulk("plain", 0)))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._producing.clear()
        self._consuming.clear()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _produce(self, kind: str, replicas: int | None) -> None:
        pause = 1 / self.rate
        while self._producing.is_set():
            seq = self._seq[kind]
            self._seq[kind] += 1
            try:
                mid = await self.channel.publish({"k": kind, "i": seq}, replicas=replicas)
            except broker.ReplicationTimeoutError as exc:
                self.uncertain[seq] = str(exc)
            except broker.BrokerError as exc:
                self.failed.append(f"{kind} {seq}: {type(exc).__name__}: {exc}")
            else:
                self.ok[kind][seq] = mid
                self.returned_at.append(time.monotonic())
            await asyncio.sleep(pause)

    async def _produce_bulk(self, kind: str, replicas: int) -> None:
        assert self.bulk is not None
        while self._producing.is_set():
            first = self._seq[f"bulk-{kind}"]
            self._seq[f"bulk-{kind}"] += self.block
            seqs = range(first, first + self.block)
            try:
                await self.bulk.publish_many(
                    [{"k": kind, "i": i} for i in seqs], batch=self.block, replicas=replicas
                )
            except broker.ReplicationTimeoutError:
                pass  # not confirmed: may or may not be there
            except broker.BrokerError as exc:
                self.failed.append(f"bulk {kind} {first}: {type(exc).__name__}: {exc}")
            else:
                self.bulk_ok[kind].update(seqs)
            await asyncio.sleep(0.02)

    async def _consume(self, k: int) -> None:
        b = self.brokers[k]
        ch = b.channel(self.channel.name)
        async with ch.subscribe(
            group=self.group, consumer=f"c{k}", start="all", prefetch=8, block=0.2, claim_idle=2.0
        ) as messages:
            while self._consuming.is_set():
                try:
                    msg = await anext(messages)
                except broker.ConnectionLostError as exc:  # past the deadline: reported
                    self.failed.append(f"consumer {k}: {exc}")
                    return
                data = msg.data
                self.consumed.setdefault((data["k"], data["i"]), []).append(time.monotonic())
                await asyncio.sleep(self.hold)
                msg.ack()

    def stop_producing(self) -> None:
        self._producing.clear()

    async def on_server(self, channel: broker.Channel[Any] | None = None) -> set[tuple[str, int]]:
        """The payloads the channel's stream holds now (read from the master)."""
        import msgpack

        key = (channel or self.channel).key
        rows = await self.b.call(lambda: self.b.redis.xrange(key))
        out = set()
        for _, fields in rows:
            data = msgpack.unpackb(fields[b"d"])
            out.add((data["k"], data["i"]))
        return out

    async def wait_consumed(self, within: float) -> set[tuple[str, int]]:
        """Until every message on the server was consumed, or ``within`` seconds; returns what
        the server holds."""
        deadline = time.monotonic() + within
        while True:
            held = await self.on_server()
            if held <= self.consumed.keys() or time.monotonic() > deadline:
                return held
            await asyncio.sleep(0.2)

    async def report(self, since: float, held: set[tuple[str, int]]) -> Report:
        """What happened from ``since`` (the fault) on; ``held``: what the server holds."""
        consumed_at = sorted(t for times in self.consumed.values() for t in times)
        bulk = set() if self.bulk is None else await self.on_server(self.bulk)
        return Report(
            durable_ok=len(self.ok["durable"]),
            durable_uncertain=len(self.uncertain),
            durable_lost=sorted(s for s in self.ok["durable"] if ("durable", s) not in held),
            plain_ok=len(self.ok["plain"]),
            plain_lost=sorted(s for s in self.ok["plain"] if ("plain", s) not in held),
            bulk_durable_ok=len(self.bulk_ok["durable"]),
            bulk_durable_lost=sorted(
                s for s in self.bulk_ok["durable"] if ("durable", s) not in bulk
            ),
            bulk_plain_ok=len(self.bulk_ok["plain"]),
            bulk_plain_lost=sorted(s for s in self.bulk_ok["plain"] if ("plain", s) not in bulk),
            failed=self.failed,
            duplicates=sum(len(v) - 1 for v in self.consumed.values()),
            consumer_gap=_gap(consumed_at, since),
            publish_gap=_gap(sorted(self.returned_at), since),
        )


def _gap(times: list[float], since: float) -> float:
    """The longest wait between two events from ``since`` on (``since`` counts as one)."""
    later = [since, *[t for t in times if t >= since]]
    return max((b - a for a, b in itertools.pairwise(later)), default=0.0)
