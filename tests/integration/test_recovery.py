"""Recovery: nack and retry, dead letters, bad entries, killed and restarted consumers."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

import broker
from broker._ledger import Ledger
from broker._stream import Stream
from tests.conftest import compare_ids

ROOT = Path(__file__).resolve().parents[2]


# every scenario that uses a server runs on one server and on a Redis Cluster (3 + 3 nodes)
SERVERS = ("single", "cluster")


async def test_nack_redelivers_with_count_then_dead_letters(
    client: broker.Broker, name: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name)
    mid = await ch.publish({"job": 1})
    seen = []
    async with ch.subscribe(group="g", start="all", max_deliveries=3, retry_delay=0.01) as messages:
        async with asyncio.timeout(10):
            async for msg in messages:
                seen.append(msg.deliveries)
                msg.nack(error=RuntimeError(f"boom {msg.deliveries}"))
                if msg.deliveries == 3:
                    break
        await messages.flush()
        assert messages.statistics().dead_lettered == 1
    assert seen == [1, 2, 3]
    dead = await ch.dead_letters()
    assert len(dead) == 1
    assert dead[0].original_id == mid and dead[0].deliveries == 3 and "boom 3" in dead[0].error
    assert (await raw.xpending(ch.key, "g"))["pending"] == 0, "original acked with the move"
    # replay is idempotent per entry
    new_ids = await ch.replay_dead([dead[0].id, dead[0].id])
    assert len(new_ids) == 1 and await ch.dead_letters() == []
    async with ch.subscribe(group="g") as messages:
        again = await asyncio.wait_for(anext(messages), 10)
        assert again.data == {"job": 1} and again.id == new_ids[0]
        again.ack()


async def test_nack_with_delay_waits(client: broker.Broker, name: str) -> None:
    ch = client.channel(name)
    await ch.publish("x")
    async with ch.subscribe(group="g", start="all") as messages:
        first = await anext(messages)
        t0 = time.monotonic()
        first.nack(delay=0.3)
        second = await asyncio.wait_for(anext(messages), 10)
        assert time.monotonic() - t0 >= 0.29
        assert second.id == first.id and second.deliveries == 2
        second.ack()


async def test_poison_foreign_and_trimmed_entries_do_not_stop_the_consumer(
    client: broker.Broker, name: str, raw: aioredis.Redis, server: str
) -> None:
    ch = client.channel(name)
    # a consumer takes 3 entries and dies before acking; then two are trimmed away
    await ch.publish_many(["t1", "t2", "t3"])
    async with ch.subscribe(group="g", consumer="dead-one", start="all", prefetch=3) as messages:
        for _ in range(3):
            await anext(messages)
    await raw.xtrim(ch.key, maxlen=1, approximate=False)
    # a poison payload and a foreign entry (as redis-cli XADD would write)
    await raw.xadd(ch.key, {"d": b"\xc1\xc1 not msgpack"})
    cli = shutil.which("redis-cli")
    if cli:
        # the first host of the URL; -c follows a cluster's redirection to the key's node
        host_port = server.split("//")[1].split("/")[0].split(",")[0]
        host, port = host_port.rsplit(":", 1)
        subprocess.run(
            [cli, "-c", "-h", host, "-p", port, "XADD", ch.key, "*", "sensor", "7", "unit", "C"],
            check=True,
            capture_output=True,
        )
    else:
        await raw.xadd(ch.key, {"sensor": "7", "unit": "C"})
    good = await ch.publish("good")
    got = []
    async with ch.subscribe(group="g", consumer="dead-one", start="all") as messages:
        async with asyncio.timeout(10):
            async for msg in messages:
                got.append(msg)
                msg.ack()
                if msg.id == good:
                    break
        await messages.flush()
        st = messages.statistics()
    assert [m.data for m in got] == ["t3", {"sensor": "7", "unit": "C"}, "good"]
    assert got[1].foreign
    assert st.trimmed == 2 and st.dead_lettered == 1
    dead = await ch.dead_letters()
    assert len(dead) == 1 and "msgpack" in dead[0].error
    assert (await raw.xpending(ch.key, "g"))["pending"] == 0


async def test_redelivered_past_max_deliveries_goes_to_dead_letters(
    client: broker.Broker, name: str
) -> None:
    """A message whose handler kills the process every time stops at max_deliveries."""
    ch = client.channel(name)
    await ch.publish("crashes the worker")
    for _ in range(2):
        async with ch.subscribe(group="g", consumer="w", start="all", max_deliveries=2) as m:
            await anext(m)  # never acked: the "crash"
    async with ch.subscribe(group="g", consumer="w", max_deliveries=2) as m:
        await asyncio.sleep(0.3)
        await m.flush()
        assert m.statistics().dead_lettered == 1
    assert "without an ack" in (await ch.dead_letters())[0].error


async def test_restart_under_same_name_replays_pending_at_once(
    client: broker.Broker, name: str
) -> None:
    ch = client.channel(name)
    sent = await ch.publish_many(range(10))
    async with ch.subscribe(group="g", consumer="slot-1", start="all", prefetch=10) as m:
        taken = [await anext(m) for _ in range(10)]
        m.ack(taken[:4])
    t0 = time.monotonic()
    async with ch.subscribe(group="g", consumer="slot-1", claim_idle=3600) as m:
        replayed = [await asyncio.wait_for(anext(m), 5) for _ in range(6)]
        m.ack(replayed)
    assert time.monotonic() - t0 < 3
    compare_ids(sent[4:], [x.id for x in replayed])
    assert all(x.deliveries == 2 for x in replayed)


async def test_stuck_consumer_entries_are_claimed(client: broker.Broker, name: str) -> None:
    ch = client.channel(name)
    sent = await ch.publish_many(range(5))
    async with ch.subscribe(group="g", consumer="stuck", start="all", prefetch=5) as m:
        [await anext(m) for _ in range(5)]
    async with ch.subscribe(group="g", consumer="rescuer", claim_idle=0.2, claim_interval=0.1) as m:
        got = [await asyncio.wait_for(anext(m), 5) for _ in range(5)]
        m.ack(got)
        assert m.statistics().claimed == 5
    compare_ids(sent, [x.id for x in got])


async def test_closing_releases_unhanded_messages(client: broker.Broker, name: str) -> None:
    ch = client.channel(name)
    sent = await ch.publish_many(range(8))
    async with ch.subscribe(group="g", consumer="a", start="all", prefetch=8) as m:
        first = await anext(m)
        first.ack()
        await asyncio.sleep(0.2)  # the other 7 are buffered
    async with ch.subscribe(group="g", consumer="b", claim_idle=3600, claim_interval=0.05) as m:
        rest = [await asyncio.wait_for(anext(m), 5) for _ in range(7)]
        m.ack(rest)
    compare_ids(sent[1:], [x.id for x in rest])
    assert all(x.deliveries == 1 for x in rest), "release restores the delivery count"


async def test_consumer_killed_with_sigkill_loses_nothing(
    client: broker.Broker, name: str, namespace: str, server: str, tmp_path: Path
) -> None:
    ch = client.channel(name)
    sent = await ch.publish_many(range(40))
    out = tmp_path / "victim.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.helpers.consumer",
            server,
            namespace,
            name,
            "g",
            "victim",
            str(out),
            "0.05",
        ],
        cwd=ROOT,
    )
    try:
        async with asyncio.timeout(30):
            while out.read_text().count("ack ") < 5 if out.exists() else True:
                await asyncio.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lines = out.read_text().splitlines()
    acked = {ln.split()[1] for ln in lines if ln.startswith("ack ")}
    got_unacked = {ln.split()[1] for ln in lines if ln.startswith("got ")} - acked
    assert got_unacked, "the victim died holding unacked messages"
    received: set[str] = set()
    async with ch.subscribe(
        group="g", consumer="survivor", claim_idle=0.5, claim_interval=0.1
    ) as m:
        async with asyncio.timeout(20):
            async for msg in m:
                received.add(msg.id)
                msg.ack()
                if received | acked >= set(sent):
                    break
    compare_ids(sent, received | acked)
    assert got_unacked <= received


async def test_group_deleted_under_subscription_raises_typed_error(
    client: broker.Broker, name: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name)
    async with ch.subscribe(group="g", block=0.1) as m:
        await raw.xgroup_destroy(ch.key, "g")
        with pytest.raises(broker.GroupMissingError) as info:
            async with asyncio.timeout(10):
                await anext(m)
        assert info.value.channel == name and info.value.group == "g"
    async with ch.subscribe(group="g2", block=0.1) as m:
        await raw.delete(ch.key)
        with pytest.raises(broker.GroupMissingError):
            async with asyncio.timeout(10):
                await anext(m)


async def test_wrong_type_key_is_a_clear_error(
    client: broker.Broker, name: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name)
    await raw.set(ch.key, "not a stream")
    with pytest.raises(broker.WrongTypeError, match="not a Redis stream"):
        await ch.publish(1)
    with pytest.raises(broker.WrongTypeError):
        async with ch.subscribe(group="g"):
            pass


async def test_idle_consumers_without_pending_are_pruned(
    client: broker.Broker, name: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name)
    await ch.publish_many(range(3))
    async with ch.subscribe(group="g", consumer="holder", start="all", prefetch=1) as m:
        await anext(m)  # keeps one pending
    async with ch.subscribe(group="g", consumer="empty", prefetch=1) as m:
        pass
    (await raw.xpending(ch.key, "g"))
    await asyncio.sleep(0.3)
    async with ch.subscribe(group="g", consumer="pruner", prune_idle=0.2, claim_idle=3600):
        names = {c["name"] for c in await raw.xinfo_consumers(ch.key, "g")}
    assert b"holder" in names, "a consumer with pending entries is never deleted"
    assert b"empty" not in names


async def test_connection_killed_mid_stream_resumes_without_loss(
    client: broker.Broker, name: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name)
    sent: list[str] = []
    received: list[str] = []
    async with ch.subscribe(group="g", start="all", prefetch=10, block=5) as m:

        async def consume() -> None:
            async for msg in m:
                received.append(msg.id)
                msg.ack()

        task = asyncio.create_task(consume())
        try:
            for _ in range(4):
                sent += await ch.publish_many(range(50))
                async with asyncio.timeout(20):
                    while set(received) < set(sent):
                        await asyncio.sleep(0.01)
                await asyncio.sleep(0.1)  # the subscription is now blocked in XREADGROUP
                if client.cluster:  # on the node that serves the channel (and blocks the read)
                    node = raw.get_node_from_key(ch.key)
                    await raw.client_kill_filter(_type="normal", skipme=True, target_nodes=node)
                else:
                    await raw.client_kill_filter(_type="normal", skipme=True)
            sent += await ch.publish_many(range(50))
            async with asyncio.timeout(20):
                while set(received) < set(sent):
                    await asyncio.sleep(0.01)
        finally:
            m.stop()
            await task
        assert m.statistics().reconnects >= 1
    compare_ids(sent, set(received))


async def test_connection_lost_while_a_replay_page_is_taken_in_replays_that_page_again(
    client: broker.Broker, name: str, raw: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection dies after a replay (``XREADGROUP ... 0``) returned a page, while that page
    is turned into messages (the ``XPENDING`` of their delivery counts): the replay after the
    reconnect must read that page again. Continuing after it left its entries pending, unseen,
    until ``claim_idle`` (what ``CLIENT KILL`` under load did to
    test_connections_killed_mid_publish_and_read_lose_nothing_and_leak_nothing)."""
    ch = client.channel(name)
    sent = await ch.publish_many(range(5))
    await raw.xgroup_create(ch.key, "g", id="0")
    # delivered to slot-1 and the reply lost (a connection killed under XREADGROUP >)
    await raw.xreadgroup("g", "slot-1", {ch.key: ">"})
    real = Ledger.pending_rows
    failed: list[list[Any]] = []

    async def killed_once(self: Ledger[Any], stream: Stream, ids: list[Any]) -> dict[str, Any]:
        if not failed:
            failed.append(list(ids))
            raise broker.ConnectionLostError("connection killed while taking in a replay page")
        return await real(self, stream, ids)

    monkeypatch.setattr(Ledger, "pending_rows", killed_once)
    async with ch.subscribe(group="g", consumer="slot-1", claim_idle=3600, block=0.1) as m:
        got = [await asyncio.wait_for(anext(m), 5) for _ in range(5)]
        m.ack(got)
        await m.flush()
        assert m.statistics().reconnects == 1
    assert len(failed) == 1 and len(failed[0]) == 5
    compare_ids(sent, [x.id for x in got])
    # delivered by the lost read, the replay whose page was lost, and the replay again
    assert [x.deliveries for x in got] == [3] * 5
    assert (await raw.xpending(ch.key, "g"))["pending"] == 0


async def test_ack_after_close_is_an_error_and_the_message_stays_pending(
    client: broker.Broker, name: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name)
    await ch.publish("late")
    async with ch.subscribe(group="g", start="all") as m:
        msg = await anext(m)
    with pytest.raises(broker.ClosedError, match="stays pending"):
        msg.ack()
    assert (await raw.xpending(ch.key, "g"))["pending"] == 1


async def test_heartbeat_keeps_a_slow_handler_and_never_steals_back(
    client: broker.Broker, name: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name)
    await ch.publish_many(["slow", "stolen"])
    async with ch.subscribe(group="g", consumer="a", start="all", claim_idle=0.6, prefetch=2) as m:
        slow, stolen = await anext(m), await anext(m)
        # another consumer claims one of them (as if this process had stalled)
        await raw.xclaim(ch.key, "g", "b", 0, [stolen.id])
        await asyncio.sleep(1.0)  # several heartbeats (every claim_idle / 3)
        owners = {
            p["message_id"].decode(): (p["consumer"].decode(), p["time_since_delivered"])
            for p in await raw.xpending_range(ch.key, "g", "-", "+", 10)
        }
        assert owners[slow.id][0] == "a" and owners[slow.id][1] < 600, "kept fresh"
        assert owners[stolen.id][0] == "b", "not taken back from the consumer that claimed it"
        slow.ack()
