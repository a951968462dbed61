"""Scenarios only a cluster has: a slot moved to another primary while producers and consumers
run (resharding), a stop token reaching processes seeded with different nodes, and the worker
runtime on a cluster. (Every other scenario runs on a cluster too: see ``SERVERS`` in the other
modules.)"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import broker
from broker._server_cluster import EmbeddedCluster
from broker._topology import slot_of
from tests.conftest import compare_ids, raw_client
from tests.helpers.receipts import Receipts

SERVERS = ("cluster",)


async def test_resharding_under_load_loses_nothing(
    cluster: EmbeddedCluster, client: broker.Broker, name: str
) -> None:
    """Three channels read by one subscription; the slot of one moves to another primary
    mid-load (its stream, groups and pending list go with MIGRATE)."""
    chans = [client.channel(f"{name}-{i}") for i in range(3)]
    moving = chans[0]
    slot = slot_of(moving.key)
    source = cluster.node_of_slot(slot)
    target = next(n for n in cluster.primaries() if n is not source)
    for ch in chans:
        await ch.create_group("g")
    sent: set[str] = set()
    got: set[str] = set()
    seen_at: list[float] = []
    migrated = asyncio.Event()
    figures: dict[str, float] = {}

    async def produce() -> None:
        for i in range(1500):
            ch = chans[i % 3]
            sent.add(f"{ch.name}/{await ch.publish(i)}")
            if i % 30 == 0:
                await asyncio.sleep(0.01)

    async def migrate() -> None:
        await asyncio.sleep(0.4)
        t0 = time.monotonic()
        figures["keys"] = await asyncio.to_thread(cluster.migrate_slot, slot, target)
        figures["migration_s"] = time.monotonic() - t0
        migrated.set()

    async with client.subscribe(chans, group="g", prefetch=32, block=0.2) as messages:

        async def consume() -> None:
            async for msg in messages:
                got.add(f"{msg.channel}/{msg.id}")
                seen_at.append(time.monotonic())
                msg.ack()

        reader = asyncio.create_task(consume())
        try:
            async with asyncio.timeout(60):
                await asyncio.gather(produce(), migrate())
                while not got >= sent:
                    await asyncio.sleep(0.02)
        finally:
            messages.stop()
            await reader
        await messages.flush()
        stats = messages.statistics()
    assert migrated.is_set() and figures["keys"] >= 1, "the channel's keys really moved"
    assert cluster.node_of_slot(slot) is target
    compare_ids(sent, got)
    gaps = [b - a for a, b in itertools.pairwise(seen_at)]
    print(
        f"\nresharding: {figures['keys']} keys moved in {figures['migration_s'] * 1000:.0f} ms; "
        f"{len(sent)} published, {len(got)} handled, longest gap between messages "
        f"{max(gaps) * 1000:.0f} ms, reader reconnects {stats.reconnects}"
    )
    for ch in chans:  # nothing left pending, on whichever node the stream lives now
        assert (await ch.info()).groups[0].pending == 0


async def test_a_stop_token_reaches_processes_seeded_with_different_nodes(
    cluster: EmbeddedCluster, client: broker.Broker, name: str, namespace: str, tmp_path: Path
) -> None:
    ch = client.channel(name)
    await ch.publish_many(range(30))
    procs = []
    outs = []
    try:
        for i, node in enumerate(cluster.primaries()):
            out = tmp_path / f"worker{i}.log"
            outs.append(out)
            url = f"redis+cluster://127.0.0.1:{node.port}"  # each knows another node first
            argv = [sys.executable, "-m", "tests.helpers.stop_worker", url, namespace, name,
                    "g", f"c{i}", "halt", str(out), "0.01"]  # fmt: skip
            procs.append(subprocess.Popen(argv))
        async with asyncio.timeout(30):
            while not all(o.exists() and "ready" in o.read_text() for o in outs):
                await asyncio.sleep(0.05)
        fired = time.time_ns()
        await client.stop_source("halt").stop("enough")
        async with asyncio.timeout(30):
            while not all("end enough" in o.read_text() for o in outs):
                await asyncio.sleep(0.05)
        ends = [int(o.read_text().split("end enough ")[1].split()[0]) for o in outs]
        print(f"\nstop on a cluster: every process ended within {(max(ends) - fired) / 1e6:.0f} ms")
        for p in procs:
            assert p.wait(30) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        await client.stop_source("halt").reset()


async def test_broker_worker_on_a_cluster(
    cluster: EmbeddedCluster, client: broker.Broker, name: str, namespace: str
) -> None:
    """The worker CLI, unchanged but for its URL: a partitioned channel on a cluster, two slots."""
    ch = client.channel(name, partitions=6)
    receipts = f"{namespace}:receipts"
    env = {
        **os.environ,
        "BROKER_URL": cluster.url,
        "BROKER_NAMESPACE": namespace,
        "RECEIPTS_KEY": receipts,
        "RECEIPTS_URL": cluster.url,
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "broker.cli.main", "worker", "tests.helpers.receipts:record",
         "--channel", name, "--group", "g", "--processes", "2", "--concurrency", "4",
         "--start", "all", "--name", "recorder"],
        env=env,
    )  # fmt: skip
    r = raw_client(cluster.url)
    try:
        sent = set(await ch.publish_many(({"n": i} for i in range(300)), key=lambda d: d["n"]))
        async with asyncio.timeout(60):
            while not (await Receipts.fetch(r, receipts)).ids >= sent:
                await asyncio.sleep(0.1)
        worker.terminate()
        assert worker.wait(30) == 0
        handled = await Receipts.fetch(r, receipts)
        compare_ids(sent, handled.ids)
        assert {x.pid for x in handled.items} and len({x.pid for x in handled.items}) <= 2
        assert (await ch.info()).groups[0].pending == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        await r.delete(receipts)
        await r.aclose()


async def test_drained_readers_never_wait_on_each_other(client: broker.Broker, name: str) -> None:
    """Readers of drained streams once yielded to any parked reader, so two drained readers
    yielded to each other for ever (about one run in six stalled): entries published after the
    readers drained must all arrive. Repeated, each time on fresh channels."""
    for run in range(10):
        chans = [client.channel(f"{name}-{run}-{i}") for i in range(3)]
        sent: set[str] = set()
        got: set[str] = set()
        async with client.subscribe(chans, group="g", start="all", prefetch=30) as messages:
            await asyncio.sleep(0.3)  # every reader has read its empty stream: drained
            for start in range(0, 50, 10):
                for ch in chans:
                    ids = await ch.publish_many(range(start, start + 10))
                    sent.update(f"{ch.name}/{i}" for i in ids)
            async with asyncio.timeout(15):
                async for msg in messages:
                    got.add(f"{msg.channel}/{msg.id}")
                    msg.ack()
                    if len(got) == len(sent):
                        break
        compare_ids(sent, got)


async def test_requests_are_answered_while_the_reply_inbox_moves(
    cluster: EmbeddedCluster, client: broker.Broker, name: str
) -> None:
    """The requester's inbox (``<ns>:{reply~hex}``) moves to another primary while requests
    are in flight: its reader follows the slot, answers written on the new node are read, and
    every request gets its own answer (none times out)."""
    from tests.integration.test_request import responding

    async def echo(msg: broker.Message[int]) -> int:
        return msg.data * 10

    ch = client.channel(name)
    async with responding(client, name, echo):
        assert await ch.request(0, timeout=10) == 0  # the inbox exists now
        inbox = client.request_statistics().inbox
        assert inbox is not None
        slot = slot_of(inbox)
        source = cluster.node_of_slot(slot)
        target = next(n for n in cluster.primaries() if n is not source)
        moved: dict[str, int] = {}
        answers: list[int] = []

        async def requests() -> None:
            for i in range(1, 301):
                answers.append(await ch.request(i, timeout=10))
                if i % 20 == 0:
                    await asyncio.sleep(0.01)

        async def migrate() -> None:
            while len(answers) < 50:
                await asyncio.sleep(0.005)
            moved["before"] = len(answers)
            moved["keys"] = await asyncio.to_thread(cluster.migrate_slot, slot, target)
            moved["after"] = len(answers)

        async with asyncio.timeout(90):
            await asyncio.gather(requests(), migrate())
    print(f"\nreply inbox moved after {moved['before']} answers; {moved['after']} when done")
    assert moved["keys"] >= 1, "the inbox really moved"
    assert moved["after"] < 300, "requests were still being made when the inbox had moved"
    assert cluster.node_of_slot(slot) is target
    assert answers == [i * 10 for i in range(1, 301)]
    stats = client.request_statistics()
    assert (stats.timed_out, stats.waiting) == (0, 0) and stats.inbox == inbox
