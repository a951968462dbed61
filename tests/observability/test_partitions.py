"""A partitioned channel (P streams) is one row in ``broker top`` and one series per metric:
its partitions are added up."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

import broker
import broker.metrics
from broker.cli._top import TopSampler


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    reg = CollectorRegistry()
    broker.metrics.enable(reg, sample_interval=0.05)
    try:
        yield reg
    finally:
        broker.metrics.disable()


async def test_partitions_add_up(
    registry: CollectorRegistry, client: broker.Broker, name: str
) -> None:
    ch = client.channel(name, partitions=3)
    await ch.publish_many(range(12), key=lambda n: n)
    assert len(await ch.streams()) == 3
    async with ch.subscribe(group="g", start="all", prefetch=12) as sub:
        got = [await anext(sub) for _ in range(12)]
        for msg in got[:9]:
            msg.ack()
        await sub.flush()
        families = {f.name: f for f in await asyncio.to_thread(list, registry.collect())}
        top = TopSampler(client, [name])
        await top.sample()
        frame = await top.sample()

    def one(family: str) -> float:
        (sample,) = families[family].samples
        return sample.value

    assert one("broker_channel_length_messages") == 12
    assert one("broker_group_pending_messages") == 3
    assert one("broker_group_lag_messages") == 0
    assert one("broker_acked_messages") == 9
    (row,) = frame.channels
    (group,) = row.groups
    assert (row.name, row.length, group.name, group.lag, group.pending) == (name, 12, "g", 0, 3)
    assert group.oldest_pending is not None and group.consumers == 1
