"""Edges of the hot paths (Wire, pipelined publisher, waiter deque, consume workers)."""

from __future__ import annotations

import asyncio
import signal

import pytest
import redis.asyncio as aioredis

import broker

# every scenario that uses a server runs on one server and on a Redis Cluster (3 + 3 nodes)
SERVERS = ("single", "cluster")


async def test_consume_survives_a_handler_that_raises_cancelled_error(
    client: broker.Broker, name: str
) -> None:
    """A handler raising CancelledError (e.g. awaiting a future cancelled elsewhere) must not
    end consume() as if stopped: the other messages still have to be handled."""
    ch = client.channel(name)
    await ch.publish_many(range(5))
    seen: list[int] = []

    async def handler(msg: broker.Message[int]) -> None:
        seen.append(msg.data)
        if msg.data == 0:
            raise asyncio.CancelledError  # not a cancellation of consume()

    async with ch.subscribe(group="g", start="all", prefetch=4) as sub:
        consumer = asyncio.create_task(sub.consume(handler, concurrency=1))
        try:
            async with asyncio.timeout(5):
                while len(set(seen)) < 5 and not consumer.done():
                    await asyncio.sleep(0.02)
            assert not consumer.done(), (
                f"consume() returned without a stop after {seen}: its only worker died"
            )
            assert set(seen) == {0, 1, 2, 3, 4}
        finally:
            sub.stop()
            await asyncio.wait_for(consumer, 5)


async def test_cancelled_chunk_fill_wakes_another_waiting_reader(
    client: broker.Broker, name: str
) -> None:
    """Reader A holds a message in an unfinished chunk, reader B waits; A is cancelled and hands
    the message back: B must get it (no lost wake-up)."""
    ch = client.channel(name)
    async with ch.subscribe(group="g", prefetch=8, block=0.2) as sub:
        chunks = sub.chunks(3)  # no timeout: waits for 3
        a = asyncio.create_task(anext(chunks))
        await asyncio.sleep(0.1)
        await ch.publish("only")
        async with asyncio.timeout(5):
            while sub.statistics().in_flight == 0:  # A took the message, waits for more
                await asyncio.sleep(0.01)
        b = asyncio.create_task(anext(sub))
        await asyncio.sleep(0.1)  # B waits in the waiter deque
        a.cancel()
        with pytest.raises(asyncio.CancelledError):
            await a
        try:
            msg = await asyncio.wait_for(asyncio.shield(b), 3)
        except TimeoutError:
            pytest.fail("the handed-back message never reached the waiting reader")
        finally:
            sub.stop()
            await asyncio.wait([b], timeout=5)
            if b.done() and not b.cancelled():
                b.exception()  # retrieved (StopAsyncIteration when the message never came)
        assert msg.data == "only"
        msg.ack()
        await chunks.aclose()


async def test_reader_cancelled_right_after_its_wake_passes_the_message_on(
    client: broker.Broker, name: str
) -> None:
    ch = client.channel(name)
    async with ch.subscribe(group="g", prefetch=8, block=0.2) as sub:
        readers = [asyncio.create_task(anext(sub)) for _ in range(4)]
        await asyncio.sleep(0.1)
        ledger = sub._ledger
        assert ledger is not None
        first = ledger.waiters[0]
        wake = ledger.wake

        def wake_then_cancel(n: int | None = None) -> None:
            wake(n)
            if first.done() and not readers[0].done():
                readers[0].cancel()  # woken, then cancelled before it runs

        ledger.wake = wake_then_cancel  # type: ignore[method-assign]
        await ch.publish("x")
        done, _ = await asyncio.wait(readers[1:], timeout=3, return_when=asyncio.FIRST_COMPLETED)
        assert done, "the message woke a reader that was cancelled, and nobody else"
        assert readers[0].cancelled()
        got = [t.result() for t in done]
        assert [m.data for m in got] == ["x"]
        sub.ack(got)
        sub.stop()
        await asyncio.wait(readers, timeout=5)
        for t in readers[1:]:
            if t not in done:  # the others end with the stop
                assert isinstance(t.exception(), StopAsyncIteration)
        assert sub.statistics().delivered == 1


async def test_statistics_delivered_and_acked_after_chunks_and_stop(
    client: broker.Broker, name: str
) -> None:
    ch = client.channel(name)
    await ch.publish_many(range(20))
    async with ch.subscribe(group="g", start="all", prefetch=10) as sub:
        got = []
        async with asyncio.timeout(5):
            async for batch in sub.chunks(4, timeout=0.2):
                got += batch
                sub.ack(batch)
                if len(got) >= 12:
                    break
        await sub.flush()
        s = sub.statistics()
        assert s.delivered == len(got) and s.acked == len(got), s
        sub.stop()
        await asyncio.sleep(0.2)
        s = sub.statistics()
        assert s.delivered == len(got) and s.buffered == 0, s


async def test_pending_stays_within_twice_prefetch_with_a_slow_ack_path(
    client: broker.Broker, name: str, raw: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    from broker._wire import Wire

    real = Wire.execute

    async def slow_acks(self: Wire, payload: bytes, replies: int, **kw):  # type: ignore[no-untyped-def]
        if b"XACK" in payload[:40]:
            await asyncio.sleep(0.3)
        return await real(self, payload, replies, **kw)

    monkeypatch.setattr(Wire, "execute", slow_acks)
    ch = client.channel(name)
    await ch.publish_many(range(300))
    prefetch = 5
    worst = 0
    async with ch.subscribe(group="g", start="all", prefetch=prefetch, block=0.1) as sub:
        n = 0
        async with asyncio.timeout(20):
            async for msg in sub:
                msg.ack()
                n += 1
                if n % 5 == 0:
                    info = await raw.xpending(ch.key, "g")
                    worst = max(worst, int(info["pending"]))
                if n == 100:
                    break
    assert worst <= 2 * prefetch, worst


async def test_publish_to_a_stalled_server_fails_instead_of_hanging_on_reconnect() -> None:
    """The Wire's connections have no socket timeout: a stalled server (SIGSTOP; the kernel still
    accepts TCP) must still end in ConnectionLostError after the reconnect deadline. The Wire's
    deadline is lowered to 1 s to keep the test short (15 s in production)."""
    with broker.EmbeddedServer() as server:
        async with broker.connect(server.url, reconnect_deadline=2, connect_timeout=1) as b:
            ch = b.channel("stall")
            await ch.publish("warm")  # one pooled Wire connection
            b.wire.timeout = 1.0
            assert server.process is not None
            server.process.send_signal(signal.SIGSTOP)
            try:
                # the old connection times out (1 s), the reconnect's handshake (CLIENT SETNAME)
                # reads without any timeout: hangs for as long as the server is stopped
                with pytest.raises(broker.ConnectionLostError):
                    try:
                        await asyncio.wait_for(ch.publish("x"), 8)
                    except TimeoutError:
                        pytest.fail("publish hung on a stalled server past every deadline")
            finally:
                server.process.send_signal(signal.SIGCONT)


async def test_publish_in_flight_at_close_leaves_no_open_connection(
    server: str, namespace: str, raw: aioredis.Redis
) -> None:
    b = broker.connect(server, namespace=namespace, reconnect_deadline=5)
    await b.__aenter__()
    ch = b.channel("closing")
    await ch.publish("warm")
    wire = b.topology.wire_for(ch.key)
    on_node = {"target_nodes": raw.get_node_from_key(ch.key)} if b.cluster else {}
    await raw.execute_command("CLIENT", "PAUSE", 500, "WRITE", **on_node)  # XADD waits
    pub = asyncio.create_task(ch.publish("in flight"))
    await asyncio.sleep(0.1)
    await b.aclose()
    outcome: object
    try:
        outcome = await asyncio.wait_for(pub, 5)
    except broker.BrokerError as exc:
        outcome = exc
    open_conns = [
        c
        for c in [*wire.pool._available_connections, *wire.pool._in_use_connections]
        if c.is_connected
    ]
    await wire.aclose()  # the test's own cleanup of what close() left behind
    assert not open_conns, f"close() returned, then the publish ({outcome!r}) reopened {open_conns}"


async def test_connections_killed_mid_publish_and_read_lose_nothing_and_leak_nothing(
    server: str, namespace: str, raw: aioredis.Redis
) -> None:
    async with broker.connect(
        server, namespace=namespace, reconnect_deadline=10, max_pipelines=3
    ) as b:
        ch = b.channel("kill")
        sent: set[str] = set()
        got: set[str] = set()
        async with ch.subscribe(group="g", start="all", prefetch=16, block=0.1) as sub:

            async def reader() -> None:
                async for msg in sub:
                    got.add(msg.id)
                    msg.ack()

            async def writer(k: int) -> None:
                for i in range(150):
                    sent.add(await ch.publish((k, i)))

            r = asyncio.create_task(reader())
            writers = [asyncio.create_task(writer(k)) for k in range(8)]
            on_node = {"target_nodes": raw.get_node_from_key(ch.key)} if b.cluster else {}
            for _ in range(5):
                await asyncio.sleep(0.05)
                await raw.client_kill_filter(_type="normal", skipme=True, **on_node)
            async with asyncio.timeout(20):
                await asyncio.gather(*writers)
                while not got >= sent:
                    await asyncio.sleep(0.02)
            sub.stop()
            await asyncio.wait_for(r, 5)
            await sub.flush()
        wire = b.topology.wire_for(ch.key)
        pool = wire.pool
        # none leaked: in use (for the pool) are only those waiting in the wire
        assert set(pool._in_use_connections) == set(wire._idle)
        assert len(pool._available_connections) + len(wire._idle) <= 3 + 2
    assert await raw.xpending(ch.key, "g") and (await raw.xpending(ch.key, "g"))["pending"] == 0


async def test_poison_and_oversized_payloads_on_the_fast_path_are_dead_lettered(
    server: str, namespace: str, raw: aioredis.Redis
) -> None:
    async with broker.connect(server, namespace=namespace, max_payload=64) as b:
        ch = b.channel("poison")
        async with ch.subscribe(group="g", prefetch=8, block=0.1) as sub:
            await raw.xadd(ch.key, {"d": b"\xc1"})  # never valid msgpack
            await raw.xadd(ch.key, {"d": b"\xc4\x50" + b"x" * 80})  # over max_payload
            await raw.xadd(ch.key, {"d": b"\x01", "extra": "1"})  # d plus another field
            await raw.xadd(ch.key, {"x": "1"})  # foreign
            good = await ch.publish(7)
            got = []
            async with asyncio.timeout(5):
                async for msg in sub:
                    got.append(msg)
                    msg.ack()
                    if len(got) == 3:
                        break
            await sub.flush()
            assert [m.data for m in got] == [1, {"x": "1"}, 7]
            assert got[-1].id == good
            dead = await ch.dead_letters()
            assert len(dead) == 2, dead
            assert (await raw.xpending(ch.key, "g"))["pending"] == 0


async def test_publish_to_a_wrong_type_key_is_a_typed_error_on_both_paths(
    client: broker.Broker, name: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name)
    await raw.set(ch.key, "not a stream")
    with pytest.raises(broker.WrongTypeError):
        await asyncio.wait_for(ch.publish(1), 5)
    results = await asyncio.wait_for(
        asyncio.gather(*(ch.publish(i) for i in range(20)), return_exceptions=True), 5
    )
    assert all(isinstance(r, broker.WrongTypeError) for r in results), results


async def test_stop_during_consume_releases_the_buffered_messages(
    client: broker.Broker, name: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name)
    await ch.publish_many(range(20))
    started = asyncio.Event()
    handled: list[int] = []

    async def handler(msg: broker.Message[int]) -> None:
        started.set()
        await asyncio.sleep(0.2)
        handled.append(msg.data)

    async with ch.subscribe(group="g", consumer="a", start="all", prefetch=8) as sub:
        consumer = asyncio.create_task(sub.consume(handler, concurrency=2))
        await asyncio.wait_for(started.wait(), 5)
        sub.stop()
        await asyncio.wait_for(consumer, 5)
        s = sub.statistics()
        assert s.acked == len(handled) == 2 and s.delivered == 2 and s.buffered == 0, s
        assert s.released == 6, s
    # what was fetched and not handled is claimable by another consumer at once
    claimed = await raw.xautoclaim(ch.key, "g", "b", 10_000, "0-0", count=100)
    assert len(claimed[1]) == 6


async def test_single_pipeline_keeps_the_order_of_concurrent_publishes(
    server: str, namespace: str, raw: aioredis.Redis
) -> None:
    async with broker.connect(server, namespace=namespace, max_pipelines=1) as b:
        ch = b.channel("order")
        ids = await asyncio.wait_for(asyncio.gather(*(ch.publish(i) for i in range(300))), 10)
        entries = await raw.xrange(ch.key)
        assert [e[0].decode() for e in entries] == ids
        assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
        assert b.publisher.statistics().published == 300


# -- acks riding ahead of the next read ------------------------------------------------------


async def test_acks_ride_with_the_next_read_and_flush_does_not_wait_for_it(
    client: broker.Broker, name: str, raw: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message at a time: each ack leaves ahead of the next blocking XREADGROUP, on its
    connection (one write and one round trip less per message). The ack is settled when its
    reply is read, not when the read returns: ``flush()`` must not wait out the BLOCK."""
    from broker._settle import Settler

    landed: list[int] = []
    real = Settler.riders_landed

    def counting(self: Settler, mine: dict[str, list[str]], replies: list[object]) -> None:
        landed.append(len(replies))
        real(self, mine, replies)

    monkeypatch.setattr(Settler, "riders_landed", counting)
    ch = client.channel(name)
    sent = await ch.publish_many(range(20))
    got = []
    async with ch.subscribe(group="g", start="all", block=30.0, prefetch=1) as messages:
        async with asyncio.timeout(15):
            async for msg in messages:
                got.append(msg.id)
                msg.ack()
                if len(got) == len(sent):
                    break
        # the last ack rides with a read that blocks for 30 s: flush returns at once
        t0 = asyncio.get_running_loop().time()
        await asyncio.wait_for(messages.flush(), 5)
        assert asyncio.get_running_loop().time() - t0 < 5
        assert messages.statistics().pending_acks == 0
        assert (await raw.xpending(ch.key, "g"))["pending"] == 0
    assert got == sent
    assert len(landed) >= len(sent) // 2, f"acks rode with {len(landed)} reads of {len(sent)}"


async def test_acks_of_a_read_lost_before_their_replies_are_sent_again(
    client: broker.Broker, name: str, raw: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection of a read carrying acks is lost before any reply: the acks go back to
    the queue and are sent again (XACK is idempotent); nothing is left pending and nothing is
    delivered twice."""
    import redis.exceptions as rex

    from broker._wire import Wire

    real = Wire.execute
    lost: list[bytes] = []

    async def losing(self: Wire, payload: bytes, replies: int, **kw: object) -> list[object]:
        if not lost and payload.startswith(b"*") and b"XACK" in payload[:20] and replies > 1:
            lost.append(payload)
            raise rex.ConnectionError("connection lost (simulated) before the replies")
        return await real(self, payload, replies, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Wire, "execute", losing)
    ch = client.channel(name)
    sent = await ch.publish_many(range(10))
    got = []
    async with ch.subscribe(group="g", start="all", block=1.0, prefetch=1) as messages:
        async with asyncio.timeout(20):
            async for msg in messages:
                got.append(msg.id)
                msg.ack()
                if len(got) == len(sent):
                    break
        await asyncio.wait_for(messages.flush(), 10)
        assert (await raw.xpending(ch.key, "g"))["pending"] == 0
    assert lost, "no read carried acks"
    assert sorted(got) == sorted(sent) and len(got) == len(set(got))
