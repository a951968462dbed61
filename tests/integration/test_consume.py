"""Channel-level operators: merged subscriptions, chunks, concurrency limits, bounded channels."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis.asyncio as aioredis

import broker
from tests.conftest import compare_ids

ROOT = Path(__file__).resolve().parents[2]


# every scenario that uses a server runs on one server and on a Redis Cluster (3 + 3 nodes)
SERVERS = ("single", "cluster")


async def test_merged_subscription_over_three_channels(client: broker.Broker, name: str) -> None:
    chans = [client.channel(f"{name}-{i}") for i in range(3)]
    sent: set[str] = set()
    got: list[str] = []
    order: list[str] = []

    async def publish_all() -> None:
        # interleaved batches: every channel has entries from the start
        for start in range(0, 100, 10):
            for ch in chans:
                sent.update(
                    f"{mid}@{ch.name}" for mid in await ch.publish_many(range(start, start + 10))
                )

    if not client.cluster:
        await publish_all()  # one server: the first read already interleaves every channel
    async with client.subscribe(chans, group="g", start="all", prefetch=30) as messages:
        if client.cluster:
            # a cluster: a reader per node, started one by one; fairness is in steady state
            await asyncio.sleep(0.5)
            await publish_all()
        async with asyncio.timeout(20):
            async for msg in messages:
                got.append(msg.id + "@" + msg.channel)
                order.append(msg.channel)
                msg.ack()
                if len(got) == 300:
                    break
    compare_ids(sent, got)
    assert len(got) == len(set(got))
    # fairness: one XREADGROUP names every channel (COUNT per stream), or each node's reader
    # holds at most its share of prefetch while the others have entries
    window = 30 if not client.cluster else 60
    assert {c.name for c in chans} == set(order[:window]), order[:window]


async def test_merged_read_is_one_xreadgroup_per_round_trip(
    client: broker.Broker, name: str, raw: aioredis.Redis
) -> None:
    chans = [client.channel(f"{name}-{i}") for i in range(3)]
    for ch in chans:
        await ch.publish_many(range(30))
    await raw.config_resetstat(**({"target_nodes": raw.get_primaries()} if client.cluster else {}))
    async with client.subscribe(chans, group="g", start="all", prefetch=90) as messages:
        batch = []
        async with asyncio.timeout(10):
            async for msg in messages:
                batch.append(msg)
                if len(batch) == 90:
                    break
        messages.ack(batch)
    if client.cluster:  # the reads of every primary (one reader each)
        nodes = raw.get_primaries()
        stats_by_node = await raw.info("commandstats", target_nodes=nodes)
        calls = sum(s.get("cmdstat_xreadgroup", {}).get("calls", 0) for s in stats_by_node.values())
        # per node: replay (one command per slot) + a few reads; not one per message
        assert calls <= 4 * len(chans), calls
    else:
        stats = await raw.info("commandstats")
        calls = stats.get("cmdstat_xreadgroup", {}).get("calls", 0)
        # replay (1) + a few reads; not one per channel per message
        assert calls <= 6, calls


async def test_chunks_never_empty_never_larger(client: broker.Broker, name: str) -> None:
    ch = client.channel(name)
    async with ch.subscribe(group="g", start="all", prefetch=10) as messages:

        async def produce() -> None:
            for i in range(23):
                await ch.publish(i)
                if i % 7 == 0:
                    await asyncio.sleep(0.15)

        producer = asyncio.create_task(produce())
        sizes: list[int] = []
        seen = 0
        async with asyncio.timeout(20):
            async for batch in messages.chunks(5, timeout=0.05):
                assert 1 <= len(batch) <= 5
                sizes.append(len(batch))
                messages.ack(batch)
                seen += len(batch)
                if seen == 23:
                    break
        await producer
    assert sum(sizes) == 23 and any(s < 5 for s in sizes), sizes


async def test_chunks_arguments_checked_at_call(client: broker.Broker, name: str) -> None:
    sub = client.channel(name).subscribe(group="g", prefetch=4)
    with pytest.raises(ValueError, match="size"):
        sub.chunks(0)
    with pytest.raises(ValueError, match="timeout"):
        sub.chunks(2, timeout=0)
    with pytest.raises(ValueError, match="prefetch"):
        sub.chunks(5)


async def test_consume_peak_equals_concurrency_and_failures_are_nacked(
    client: broker.Broker, name: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name)
    sent = await ch.publish_many(range(60))
    running = peak = 0
    done: list[str] = []
    failed_once: set[str] = set()
    source = broker.StopSource()

    async def handler(msg: broker.Message) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(0.02)
            if msg.data % 10 == 0 and msg.id not in failed_once:
                failed_once.add(msg.id)
                raise RuntimeError("transient")
            done.append(msg.id)
        finally:
            running -= 1
        if len(done) == 60:
            source.stop()

    async with asyncio.timeout(30):
        await client.consume(
            ch, handler, group="g", start="all", concurrency=5, stop=source.token, retry_delay=0.01
        )
    assert peak == 5
    compare_ids(sent, done)
    assert (await raw.xpending(ch.key, "g"))["pending"] == 0
    with pytest.raises(ValueError, match="concurrency must be an int >= 1, got 0"):
        await client.consume(ch, handler, group="g", concurrency=0)


@pytest.mark.parametrize(("read_ahead", "held"), [(None, 16), (0, 4), (2, 6)])
async def test_consume_prefetch_is_bounded_so_others_can_take_work(
    client: broker.Broker, name: str, raw: aioredis.Redis, read_ahead: int | None, held: int
) -> None:
    ch = client.channel(name)
    await ch.publish_many(range(100))
    gate = asyncio.Event()

    async def slow(msg: broker.Message) -> None:
        await gate.wait()

    stop = broker.StopSource()
    task = asyncio.create_task(
        client.consume(
            ch,
            slow,
            group="g",
            consumer="slow",
            start="all",
            concurrency=4,
            read_ahead=read_ahead,
            stop=stop.token,
        )
    )
    await asyncio.sleep(0.5)
    pending = await raw.xpending(ch.key, "g")
    # 4 in handlers + the read-ahead (default: four per slot, 12 more): the rest of the 100
    # stays available to other consumers
    assert pending["pending"] == held, pending
    stop.stop()
    gate.set()
    await asyncio.wait_for(task, 10)


def _worker(
    server: str, namespace: str, channel: str, consumer: str, lease: float
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.helpers.group_worker",
            server,
            namespace,
            channel,
            "g",
            consumer,
            "4",
            "3",
            "0.05",
            str(lease),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )


async def test_group_concurrency_across_three_processes(
    client: broker.Broker, name: str, namespace: str, server: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name)
    sent = await ch.publish_many(range(90))
    procs = [_worker(server, namespace, name, f"p{i}", 5.0) for i in range(3)]
    try:
        async with asyncio.timeout(60):
            while await raw.llen(f"{namespace}:{{t}}:done") < 90:
                await asyncio.sleep(0.05)
        await client.stop_source("end").stop()
        codes = [await asyncio.to_thread(p.wait, 20) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            if p.stdout:
                p.stdout.close()
    peak = int(await raw.get(f"{namespace}:{{t}}:peak"))
    print(f"group-wide peak with 3 processes x concurrency 4, group_concurrency 3: {peak}")
    assert peak == 3, f"peak {peak}: the limit is 3 (and 12 local slots should saturate it)"
    assert codes == [0, 0, 0]
    done = [x.decode() for x in await raw.lrange(f"{namespace}:{{t}}:done", 0, -1)]
    compare_ids(sent, set(done))


async def test_permit_of_a_killed_process_comes_back_within_the_lease(
    client: broker.Broker, name: str, namespace: str, server: str, raw: aioredis.Redis
) -> None:
    from broker._names import semaphore_key
    from broker._semaphore import GroupSemaphore

    ch = client.channel(name)
    await ch.publish_many(range(3))
    lease = 1.0
    victim = _worker(server, namespace, name, "victim", lease)
    try:
        sem_key = semaphore_key(namespace, name, "g")
        sem = GroupSemaphore(client, sem_key, 3, lease=lease)
        async with asyncio.timeout(20):
            while await sem.holders() == 0:
                await asyncio.sleep(0.005)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        held = await sem.holders()
        assert held >= 1
        t0 = time.monotonic()
        async with asyncio.timeout(10):
            while await sem.holders() > 0:
                await asyncio.sleep(0.05)
        recovered = time.monotonic() - t0
        print(f"permits of a SIGKILLed holder came back after {recovered:.2f}s (lease {lease}s)")
        assert recovered <= lease + 0.5
        # and they can be taken again: three at once
        leases = [await asyncio.wait_for(sem.acquire(), 5) for _ in range(3)]
        for lid in leases:
            await sem.release(lid)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
        if victim.stdout:
            victim.stdout.close()


async def test_bounded_channel_blocks_while_a_group_lags(client: broker.Broker, name: str) -> None:
    ch = client.channel(name, max_lag=20)
    await ch.create_group("slow", start="all")
    await ch.publish_many(range(20))
    raising = client.channel(name, max_lag=20, on_full="raise")
    with pytest.raises(broker.ChannelFullError, match="20 entries behind"):
        await raising.publish("x")
    blocked = asyncio.create_task(ch.publish("one too many"))
    await asyncio.sleep(0.3)
    assert not blocked.done(), "publish must wait while the group is 21 behind"
    async with ch.subscribe(group="slow", prefetch=10) as m:
        t0 = time.monotonic()
        for _ in range(10):
            (await anext(m)).ack()
        await asyncio.wait_for(blocked, 5)
        print(f"bounded channel: publish resumed {time.monotonic() - t0:.3f}s after catching up")
