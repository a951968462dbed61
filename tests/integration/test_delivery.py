"""Group delivery: every id delivered once per group, to one consumer at a time."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection

import broker
from tests.conftest import compare_ids


async def consume_until(
    messages: broker.Subscription, into: list[str], stop: asyncio.Event
) -> None:
    async for msg in messages:
        into.append(msg.id)
        msg.ack()
        if stop.is_set():
            break


# every scenario that uses a server runs on one server and on a Redis Cluster (3 + 3 nodes)
SERVERS = ("single", "cluster")


async def test_k_consumers_share_and_two_groups_each_see_all(
    client: broker.Broker, name: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name)
    sent = await ch.publish_many({"n": i} for i in range(600))
    per_consumer: dict[str, list[str]] = {f"c{i}": [] for i in range(4)}
    other_group: list[str] = []
    async with asyncio.timeout(30):
        subs = [ch.subscribe(group="g1", consumer=c, start="all", prefetch=8) for c in per_consumer]
        other = ch.subscribe(group="g2", start="all", prefetch=32)
        for s in (*subs, other):
            await s.__aenter__()
        try:

            async def drain(sub: broker.Subscription, out: list[str], total: int) -> None:
                async for msg in sub:
                    out.append(msg.id)
                    msg.ack()
                    if sum(map(len, per_consumer.values())) >= total and sub is not other:
                        return
                    if sub is other and len(out) >= total:
                        return

            tasks = [
                asyncio.create_task(drain(s, per_consumer[c], 600))
                for s, c in zip(subs, per_consumer, strict=True)
            ]
            await drain(other, other_group, 600)
            while sum(map(len, per_consumer.values())) < 600:
                await asyncio.sleep(0.01)
            for s in subs:
                s.stop()
            await asyncio.gather(*tasks)
        finally:
            for s in (*subs, other):
                await s.aclose()
    everything = [i for ids in per_consumer.values() for i in ids]
    assert len(everything) == len(set(everything)), "an id went to two live consumers"
    compare_ids(sent, everything)
    compare_ids(sent, other_group)
    assert all(per_consumer.values()), {c: len(v) for c, v in per_consumer.items()}
    groups = {g["name"]: g for g in await raw.xinfo_groups(ch.key)}
    assert groups[b"g1"]["pending"] == 0 and groups[b"g2"]["pending"] == 0


async def test_messages_carry_fields(client: broker.Broker, name: str) -> None:
    ch = client.channel(name)
    mid = await ch.publish({"x": [1, 2]}, headers={"trace": "abc"})
    async with ch.subscribe(group="g", start="all") as messages:
        msg = await anext(messages)
        assert (msg.id, msg.channel, msg.data, msg.headers, msg.deliveries) == (
            mid,
            name,
            {"x": [1, 2]},
            {"trace": "abc"},
            1,
        )
        assert abs(msg.timestamp.timestamp() * 1000 - int(mid.split("-")[0])) < 1
        msg.ack()


async def test_start_new_skips_history_and_all_reads_it(client: broker.Broker, name: str) -> None:
    ch = client.channel(name)
    await ch.publish("old")
    async with ch.subscribe(group="new-only", start="new") as messages:
        await ch.publish("fresh")
        msg = await asyncio.wait_for(anext(messages), 10)
        assert msg.data == "fresh"
        msg.ack()
    async with ch.subscribe(group="everything", start="all") as messages:
        assert [(await anext(messages)).data for _ in range(2)] == ["old", "fresh"]


async def test_codecs_json_and_raw(client: broker.Broker, name: str, raw: aioredis.Redis) -> None:
    js = client.channel(name + "j", codec="json")
    rw = client.channel(name + "r", codec="raw")
    await js.publish({"a": 1})
    await rw.publish(b"\x00\xff")
    entries = await raw.xrange(js.key)
    assert entries[0][1] == {b"d": b'{"a":1}'}
    async with client.subscribe([js, rw], group="g", start="all") as messages:
        got = {m.channel: m.data for m in [await anext(messages), await anext(messages)]}
    assert got == {js.name: {"a": 1}, rw.name: b"\x00\xff"}


async def test_wire_format(
    client: broker.Broker, name: str, raw: aioredis.Redis, namespace: str
) -> None:
    ch = client.channel(name)
    await ch.publish({"k": "v"}, headers={"h1": "x"})
    await ch.publish(1)
    key = f"{namespace}:{{{name}}}"
    rows = await raw.xrange(key)

    assert msgpack.unpackb(rows[0][1][b"d"]) == {"k": "v"}
    assert msgpack.unpackb(rows[0][1][b"h"]) == {"h1": "x"}
    assert set(rows[1][1]) == {b"d"}, "no h field without headers"


async def test_prefetch_bounds_the_pending_list(
    client: broker.Broker, name: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name)
    await ch.publish_many(range(100))
    async with ch.subscribe(group="g", start="all", prefetch=5) as messages:
        held = [await anext(messages) for _ in range(5)]
        await asyncio.sleep(0.3)
        pending = await raw.xpending(ch.key, "g")
        assert pending["pending"] == 5
        st = messages.statistics()
        assert st.in_flight == 5 and st.buffered == 0
        messages.ack(held)
        await messages.flush()
        nxt = await anext(messages)
        nxt.ack()


async def test_retention_maxlen_and_max_age(
    client: broker.Broker, name: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name, maxlen=10)
    await ch.publish_many(range(2000))
    assert await raw.xlen(ch.key) < 300  # approximate trimming: within a node or so of 10
    aged = client.channel(name + "a", max_age=0.2)
    await aged.publish_many(range(300))
    await asyncio.sleep(0.5)
    for _ in range(200):
        await aged.publish("x")
    # approximate MINID frees whole nodes (100 entries): most of the 300 old ones are gone
    assert await raw.xlen(aged.key) <= 300


@pytest.mark.parametrize(("pipelines", "per_write"), [(1, 10), (4, 3)])
async def test_publish_coalesces_concurrent_calls_and_keeps_order(
    server: str,
    namespace: str,
    name: str,
    raw: aioredis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    pipelines: int,
    per_write: int,
) -> None:
    writes = 0
    original = AbstractConnection.send_packed_command

    async def counting(
        self: AbstractConnection, command: object, check_health: bool = True
    ) -> None:
        nonlocal writes
        writes += 1
        await original(self, command, check_health)

    async with broker.connect(server, namespace=namespace, max_pipelines=pipelines) as client:
        ch = client.channel(name)
        monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)

        async def producer(p: int) -> list[str]:
            return [await ch.publish({"p": p, "seq": s}) for s in range(50)]

        results = await asyncio.gather(*(producer(p) for p in range(40)))
        monkeypatch.undo()
        batches = client.publisher.statistics().batches
    # 2000 publishes from 40 tasks: far fewer round trips (socket writes) than publishes; with
    # more pipelines on the wire at once each carries fewer
    print(
        f"2000 concurrent publishes, at most {pipelines} on the wire: "
        f"{batches} pipelines, {writes} socket writes"
    )
    assert writes <= 2000 / per_write, f"{writes} socket writes for 2000 publishes"
    assert batches <= writes
    rows = await raw.xrange(ch.key)
    assert len(rows) == 2000
    seqs: dict[int, list[int]] = {}
    for _, f in rows:
        d = msgpack.unpackb(f[b"d"])
        seqs.setdefault(d["p"], []).append(d["seq"])
    assert all(v == list(range(50)) for v in seqs.values()), "order per producer task kept"
    for ids in results:
        assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))


async def test_publish_many_with_headers(client: broker.Broker, name: str) -> None:
    ch = client.channel(name)
    ids = await ch.publish_many([("a", {"k": "1"}), "b"], batch=1)
    async with ch.subscribe(group="g", start="all") as messages:
        a, b = await anext(messages), await anext(messages)
    assert [a.id, b.id] == ids and (a.headers, b.headers) == ({"k": "1"}, {})


async def test_chunked_ack_is_one_xack(
    client: broker.Broker, name: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name)
    await ch.publish_many(range(10))
    async with ch.subscribe(group="g", start="all", prefetch=10) as messages:
        async for batch in messages.chunks(10, timeout=1):
            messages.ack(batch)
            break
        await messages.flush()
    assert (await raw.xpending(ch.key, "g"))["pending"] == 0
