"""Partitioned channels, on one server and on a cluster: per-key order on the wire, every
partition used, the count recorded on the server, and a partitioned channel treated as one
channel by subscriptions, tails, inspection and dead letters."""

from __future__ import annotations

import asyncio
import zlib

import pytest
import redis.asyncio as aioredis

import broker
from broker._partitions import partition_for, partition_key
from broker._topology import slot_of
from tests.conftest import compare_ids

SERVERS = ("single", "cluster")


def test_the_partition_of_a_key_is_crc32_mod_p_everywhere() -> None:
    # documented: zlib.crc32 (IEEE) of the key's UTF-8 bytes, modulo the partition count
    assert partition_for("user-1", 12) == zlib.crc32(b"user-1") % 12 == 8
    assert partition_for(b"user-1", 12) == partition_for("user-1", 12)
    assert partition_for(42, 5) == partition_for("42", 5)
    with pytest.raises(TypeError):
        partition_for(1.5, 3)  # type: ignore[arg-type]


async def test_per_key_order_on_the_wire_and_every_partition_used(
    client: broker.Broker, raw: aioredis.Redis, name: str, namespace: str
) -> None:
    ch = client.channel(name, partitions=6)
    keys = [f"user-{i}" for i in range(24)]
    sent: dict[str, list[tuple[str, int]]] = {k: [] for k in keys}

    async def producer(k: str) -> None:  # one task per key, publishing in order
        for seq in range(40):
            mid = await ch.publish({"k": k, "seq": seq}, key=k)
            sent[k].append((mid, seq))

    await asyncio.gather(*(producer(k) for k in keys))
    # what the server holds, partition by partition
    on_wire: dict[str, list[tuple[int, str, int]]] = {k: [] for k in keys}
    used = set()
    for p in range(6):
        rows = await raw.xrange(partition_key(namespace, name, p))
        if rows:
            used.add(p)
        for entry_id, fields in rows:
            import msgpack

            data = msgpack.unpackb(fields[b"d"])
            on_wire[data["k"]].append((p, entry_id.decode(), data["seq"]))
    assert used == set(range(6)), f"partitions used: {sorted(used)}"
    for k in keys:
        parts = {p for p, _, _ in on_wire[k]}
        assert parts == {partition_for(k, 6)}, (k, parts)
        assert [seq for _, _, seq in on_wire[k]] == list(range(40)), k  # publish order kept
    compare_ids(
        [mid for k in keys for mid, _ in sent[k]], [i for k in keys for _, i, _ in on_wire[k]]
    )
    if client.cluster:  # each partition its own slot: spread over the primaries
        assert len({slot_of(partition_key(namespace, name, p)) for p in range(6)}) == 6


async def test_a_group_reads_a_partitioned_channel_as_one(client: broker.Broker, name: str) -> None:
    ch = client.channel(name, partitions=4)
    sent = await ch.publish_many(range(200))  # no key: each batch to the next partition
    sent += await ch.publish_many(range(200), batch=50)
    got: dict[str, int | None] = {}
    async with ch.subscribe(group="g", start="all", prefetch=64) as messages:
        async with asyncio.timeout(20):
            async for msg in messages:
                assert msg.channel == name
                got[msg.id + f"#{msg.partition}"] = msg.partition
                msg.ack()
                if len(got) == len(sent):
                    break
        await messages.flush()
    # ids are per stream: two partitions may hold the same id, so compare (id, count)
    assert sorted(i.split("#")[0] for i in got) == sorted(sent)
    assert set(got.values()) == {0, 1, 2, 3}
    info = await ch.info()
    assert info.partitions == 4 and info.length == 400
    (group,) = info.groups
    assert group.pending == 0 and group.lag == 0


async def test_consume_a_partitioned_channel(client: broker.Broker, name: str) -> None:
    ch = client.channel(name, partitions=3)
    sent = set(await ch.publish_many([{"n": i} for i in range(90)], key=lambda d: d["n"]))
    seen: set[str] = set()
    stop = broker.StopSource()

    async def handle(msg: broker.Message) -> None:
        seen.add(msg.id)
        if len(seen) >= len(sent):
            stop.stop()

    await asyncio.wait_for(
        client.consume(ch, handle, group="g", start="all", concurrency=4, stop=stop.token), 20
    )
    compare_ids(sent, seen)


async def test_the_count_is_recorded_and_cannot_change(
    server: str, client: broker.Broker, namespace: str, name: str
) -> None:
    await client.channel(name, partitions=5).publish("x", key="a")
    async with broker.connect(server, namespace=namespace) as other:
        found = other.channel(name)  # not told: finds 5 on the server
        assert len(await found.streams()) == 5
        assert found.partitions == 5
        with pytest.raises(broker.ConfigurationError, match="has 5 partition"):
            await other.channel(name, partitions=7).publish("y")
        assert await other.channels() == [name]  # listed once, not per partition
    plain = client.channel(name + "-plain")
    await plain.publish("z")
    with pytest.raises(broker.ConfigurationError, match="has 1 partition"):
        await client.channel(name + "-plain", partitions=3).publish("w")
    # inspecting a channel never used records nothing
    assert await client.channel(name + "-never").info() is not None
    assert await client.redis.exists(f"{namespace}:{{{name}-never}}:meta") == 0


async def test_tail_and_dead_letters_of_a_partitioned_channel(
    client: broker.Broker, name: str
) -> None:
    ch = client.channel(name, partitions=3)
    ids = [await ch.publish(i, key=str(i)) for i in range(9)]
    async with ch.tail(start="beginning", follow=False) as t:
        tailed = [m async for m in t]
    assert sorted(m.id for m in tailed) == sorted(ids)
    assert {m.partition for m in tailed} == {partition_for(str(i), 3) for i in range(9)}
    async with ch.subscribe(group="g", start="all", max_deliveries=1, retry_delay=0) as m:
        for _ in range(9):
            (await anext(m)).nack(error="bad")
        await m.flush()
    dead = await ch.dead_letters()
    assert sorted(d.original_id for d in dead) == sorted(ids)
    assert {d.partition for d in dead} == {partition_for(str(i), 3) for i in range(9)}
    replayed = await ch.replay_dead([d.id for d in dead])
    assert len(replayed) == 9 and await ch.dead_letters() == []
    info = await ch.info()
    assert info.length == 18 and info.dead_letters == 0
    await ch.delete()
    assert not await ch.exists()


async def test_a_merged_subscription_over_channels_on_every_primary(
    client: broker.Broker, name: str
) -> None:
    """Channels chosen so their slots sit on each third of the slot space (each primary's
    range on the test cluster), read by one subscription: nothing lost, nothing doubled."""
    chosen: dict[int, str] = {}
    i = 0
    while len(chosen) < 3:
        candidate = f"{name}-{i}"
        third = slot_of(f"{client.namespace}:{{{candidate}}}") * 3 // 16384
        chosen.setdefault(third, candidate)
        i += 1
    chans = [client.channel(n) for n in chosen.values()]
    if client.cluster:
        nodes = {client.topology.wire_for(c.key).name for c in chans}
        assert len(nodes) == 3, nodes
    sent: set[str] = set()
    for ch in chans:
        sent |= {f"{ch.name}/{i}" for i in await ch.publish_many(range(150))}
    got: list[str] = []
    async with client.subscribe(chans, group="g", start="all", prefetch=30) as messages:
        async with asyncio.timeout(20):
            async for msg in messages:
                got.append(f"{msg.channel}/{msg.id}")
                msg.ack()
                if len(got) == len(sent):
                    break
    compare_ids(sent, got)
    assert len(got) == len(set(got))
