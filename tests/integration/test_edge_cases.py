"""Edge cases found by review: hostile payloads, cancelled batches, stops mid-retry, clocks,
claimed delivery counts, error types."""

from __future__ import annotations

import asyncio
import time
from unittest import mock

import pytest
import redis.asyncio as aioredis

import broker
from tests.conftest import compare_ids

# every scenario that uses a server runs on one server and on a Redis Cluster (3 + 3 nodes)
SERVERS = ("single", "cluster")


async def test_payload_that_breaks_the_codec_is_dead_lettered(
    client: broker.Broker, name: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name, codec="json")
    await raw.xadd(ch.key, {"d": b"[" * 100_000})  # json.loads -> RecursionError
    good = await ch.publish({"ok": True})
    async with ch.subscribe(group="g", start="all") as m:
        msg = await asyncio.wait_for(anext(m), 10)
        assert (msg.id, msg.data) == (good, {"ok": True})
        msg.ack()
    dead = await ch.dead_letters()
    assert len(dead) == 1 and "recursion" in dead[0].error


async def test_cancelled_chunk_hands_its_messages_back(client: broker.Broker, name: str) -> None:
    ch = client.channel(name)
    sent = await ch.publish_many(range(3))
    got: list[str] = []
    async with ch.subscribe(group="g", start="all", prefetch=5) as m:
        batches = m.chunks(5, timeout=30)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.5):
                await anext(batches)  # takes 3, waits for 2 more: cancelled
        await batches.aclose()
        assert m.statistics().in_flight == 0 and m.statistics().buffered == 3
        async for batch in m.chunks(3, timeout=0.1):
            got += [x.id for x in batch]
            m.ack(batch)
            break
    compare_ids(sent, got)


async def test_message_nacked_after_stop_is_released(client: broker.Broker, name: str) -> None:
    ch = client.channel(name)
    sent = await ch.publish_many(range(2))
    async with ch.subscribe(group="g", consumer="a", start="all", prefetch=2) as m:
        first = await anext(m)
        m.stop()
        await asyncio.sleep(0.1)  # the stop released what was buffered
        first.nack(delay=30, error="failed while stopping")
    async with ch.subscribe(group="g", consumer="b", claim_idle=3600, claim_interval=0.05) as m:
        got = [await asyncio.wait_for(anext(m), 5) for _ in range(2)]
        m.ack(got)
    compare_ids(sent, [x.id for x in got])


async def test_claimed_messages_carry_their_real_delivery_count(
    client: broker.Broker, name: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name)
    await ch.create_group("g", start="all")
    p1 = await ch.publish("one")
    await raw.xreadgroup("g", "crasher", {ch.key: ">"}, count=1)
    p2 = await ch.publish("rescuer's own")
    await raw.xreadgroup("g", "rescuer", {ch.key: ">"}, count=1)
    poison = await ch.publish("poison")
    await raw.xreadgroup("g", "crasher", {ch.key: ">"}, count=1)
    for _ in range(5):  # the poison has killed five consumers already: 6 deliveries
        await raw.xclaim(ch.key, "g", "crasher", 0, [poison])
    # the claimed batch (p1, poison) spans the rescuer's own pending p2
    async with ch.subscribe(
        group="g", consumer="rescuer", claim_idle=0.05, claim_interval=0.05, max_deliveries=5
    ) as m:
        got = [await asyncio.wait_for(anext(m), 5) for _ in range(2)]
        m.ack(got)
        await asyncio.sleep(0.3)
        await m.flush()
        assert m.statistics().dead_lettered == 1
    compare_ids([p1, p2], [x.id for x in got])
    assert (await ch.dead_letters())[0].original_id == poison


async def test_replay_over_many_channels_respects_prefetch(
    client: broker.Broker, name: str
) -> None:
    chans = [client.channel(f"{name}-{i}") for i in range(4)]
    for ch in chans:
        await ch.publish_many(range(8))
    async with client.subscribe(chans, group="g", consumer="c", start="all", prefetch=32) as m:
        taken = [await anext(m) for _ in range(32)]  # all pending, none acked
        assert len(taken) == 32
    async with client.subscribe(chans, group="g", consumer="c", prefetch=8) as m:
        await anext(m)
        await asyncio.sleep(0.3)
        st = m.statistics()
        assert st.buffered + st.in_flight <= 8, st


async def test_max_age_uses_the_servers_clock(server: str, namespace: str) -> None:
    real = time.time
    with mock.patch("time.time", lambda: real() + 120):  # this host's clock runs 2 min ahead
        async with broker.connect(server, namespace=namespace) as b:
            ch = b.channel("aged", max_age=60)
            await ch.create_group("g", start="all")
            ids = [await ch.publish("a"), *(await ch.publish_many(["b", "c"]))]
            assert await b.redis.xlen(ch.key) == 3, "nothing just published may be trimmed"
            assert ids


async def test_consume_raises_the_error_itself(client: broker.Broker, name: str, raw) -> None:  # type: ignore[no-untyped-def]
    ch = client.channel(name)
    await ch.create_group("g")

    async def handler(msg: broker.Message) -> None:
        pass

    async def drop_group() -> None:
        await asyncio.sleep(0.3)
        await raw.xgroup_destroy(ch.key, "g")

    dropper = asyncio.create_task(drop_group())
    with pytest.raises(broker.GroupMissingError):
        await asyncio.wait_for(client.consume(ch, handler, group="g", concurrency=2, block=0.1), 10)
    await dropper


async def test_group_limited_handler_error_keeps_its_type(client: broker.Broker, name: str) -> None:
    ch = client.channel(name)
    await ch.publish("x")
    stop = broker.StopSource()

    async def handler(msg: broker.Message) -> None:
        if msg.deliveries >= 1:
            stop.stop()
        raise KeyError("the real cause")

    await asyncio.wait_for(
        client.consume(
            ch,
            handler,
            group="g",
            start="all",
            group_concurrency=1,
            max_deliveries=1,
            stop=stop.token,
        ),
        10,
    )
    await asyncio.sleep(0.1)
    dead = await ch.dead_letters()
    assert dead and dead[0].error.startswith("KeyError"), dead


async def test_stream_deleted_under_a_blocked_read(
    client: broker.Broker, name: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name)
    async with ch.subscribe(group="g", block=5) as m:
        reader = asyncio.create_task(anext(m))
        await asyncio.sleep(0.3)  # blocked in XREADGROUP
        await raw.delete(ch.key)
        with pytest.raises(broker.GroupMissingError):
            await asyncio.wait_for(reader, 10)
    assert await ch.delete_group("g") is False


async def test_task_that_finds_the_broker_closing_ends_quietly(server: str, namespace: str) -> None:
    """Closing takes several awaits; a background task that touches the broker in between (a
    pub/sub line reconnecting, as CI once caught) meets ``ClosedError``. That ends the task, and
    ``aclose`` must not raise it (inside the broker's task group it would)."""
    b = broker.connect(server, namespace=namespace)
    touched: list[str] = []

    async def recovering() -> None:
        while not b._closed:
            await asyncio.sleep(0.005)
        touched.append("closing")
        b.topology  # noqa: B018  (what a reconnecting line reads)
        touched.append("not reached")

    async with b:
        b._spawn(recovering(), "test-recovering")
        b._pubsub_hub()  # and a hub to close, so that closing awaits before its task group ends
    assert touched == ["closing"]
    # an error while the broker is open still reaches the task group, as before
    b2 = broker.connect(server, namespace=namespace)
    with pytest.raises(ExceptionGroup) as caught:
        async with b2:

            async def failing() -> None:
                raise broker.ClosedError("raised while open")

            b2._spawn(failing(), "test-failing")
            await asyncio.sleep(0.05)
    assert caught.group_contains(broker.ClosedError)
