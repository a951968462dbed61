"""Metrics samples and ``broker top`` on a Redis Cluster (three primaries, a merged
subscription whose channels live on different nodes)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

import broker
import broker.metrics
from broker._server_cluster import EmbeddedCluster
from broker.cli._top import TopSampler
from broker.testing import isolated


@pytest.fixture(scope="module")
def cluster_url() -> Iterator[str]:
    with EmbeddedCluster() as cluster:
        yield cluster.url


async def test_samples_and_top_read_every_node(cluster_url: str) -> None:
    reg = CollectorRegistry()
    broker.metrics.enable(reg, sample_interval=0.05)
    try:
        async with isolated(cluster_url) as b:
            names = ["a", "b", "c", "d"]
            for name in names:
                await b.channel(name).publish_many(range(5))
            async with b.subscribe(names, group="g", start="all", prefetch=40) as sub:
                got = [await anext(sub) for _ in range(20)]
                held = [m for m in got if m.channel == "c"]
                for m in got:
                    if m.channel != "c":
                        m.ack()
                await sub.flush()
                await asyncio.to_thread(list, reg.collect())  # a scrape from another thread
                families = {f.name: f for f in await asyncio.to_thread(list, reg.collect())}
                top = TopSampler(b, names)
                await top.sample()
                frame = await top.sample()
                assert len(held) == 5
    finally:
        broker.metrics.disable()
    pending = {
        s.labels["channel"]: s.value for s in families["broker_group_pending_messages"].samples
    }
    lengths = {
        s.labels["channel"]: s.value for s in families["broker_channel_length_messages"].samples
    }
    assert pending == {"a": 0, "b": 0, "c": 5, "d": 0}
    assert lengths == dict.fromkeys(names, 5)
    # a merged subscription reports one series per channel
    acked = {s.labels["channel"]: s.value for s in families["broker_acked_messages"].samples}
    assert acked == {"a": 5, "b": 5, "c": 0, "d": 5}
    assert [
        (c.name, c.length, [(g.name, g.lag, g.pending) for g in c.groups]) for c in frame.channels
    ] == [(n, 5, [("g", 0, 5 if n == "c" else 0)]) for n in names]
