"""Cluster failover (issue 14), on the suite's cluster (3 primaries, 3 replicas, node timeout
2 s): durable publishes wait once per node; the primary that owns a channel's slot is killed
with SIGKILL while producers and consumers run, several times, and every publish made with
``replicas=1`` that returned an id is consumed, while the publishes made without it that were
acknowledged and lost are counted and reported (at the end of the module, over the runs); a
stop token fired while that primary is down reaches every process.

Each run kills a primary, waits for its replica to take over, starts the killed node again (it
rejoins as a replica of the promoted one, so that durable publishes can be confirmed again) and
leaves the cluster healthy for the next test, even when it fails.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

import broker
from broker._server import EmbeddedServer
from broker._server_cluster import EmbeddedCluster, _call, _info
from broker._stop import stop_key
from broker._topology import slot_of
from tests.helpers.failover import Load, Report

ROOT = Path(__file__).resolve().parents[2]
RUNS = 3


@pytest.fixture(scope="module")
def reports(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """Lines reported at the end of the module, whatever the outcome (not hidden by -q)."""
    lines: list[str] = []
    yield lines
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    if reporter is not None and lines:
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line)


@pytest.fixture
def healthy(cluster: EmbeddedCluster) -> Iterator[EmbeddedCluster]:
    """The cluster with every node running and every replica in sync, before and after."""
    heal(cluster)
    for node in cluster.nodes:  # a restarted node syncs at once, not after 5 s
        _call(node.port, "CONFIG", "SET", "repl-diskless-sync-delay", "0")
    yield cluster
    heal(cluster)


def heal(cluster: EmbeddedCluster) -> None:
    for node in cluster.nodes:
        if node.process is None:
            node.start()
    cluster.wait_ok(60)


def replica_of(cluster: EmbeddedCluster, primary: EmbeddedServer) -> EmbeddedServer | None:
    """A running replica of ``primary`` with its link up."""
    for node in cluster.nodes:
        if node is primary or node.process is None:
            continue
        info = _info(node.port, "replication")
        if (
            info.get("role") == "slave"
            and info.get("master_port") == str(primary.port)
            and info.get("master_link_status") == "up"
        ):
            return node
    return None


async def kill_and_recover(
    cluster: EmbeddedCluster, slot: int
) -> tuple[EmbeddedServer, EmbeddedServer, float, float, float]:
    """SIGKILL the primary of ``slot``; wait for its replica to take the slot; start the killed
    node again and wait until it replicates the new primary. Returns (victim, new primary,
    when it was killed, seconds to the promotion, seconds until the new primary has a replica).
    """
    victim = cluster.node_of_slot(slot)
    assert replica_of(cluster, victim) is not None, "the primary has no replica to promote"
    t0 = time.monotonic()
    victim.kill()
    deadline = t0 + 30
    while True:
        try:
            new = cluster.node_of_slot(slot)
            if new is not victim:
                break
        except LookupError:
            pass
        assert time.monotonic() < deadline, "no replica took over the slot"
        await asyncio.sleep(0.05)
    promoted = time.monotonic() - t0
    await asyncio.to_thread(victim.start)
    while replica_of(cluster, new) is None:
        assert time.monotonic() < deadline + 30, "the killed node did not rejoin as a replica"
        await asyncio.sleep(0.05)
    return victim, new, t0, promoted, time.monotonic() - t0


async def commandstat(port: int, command: str) -> int:
    r = aioredis.Redis(port=port)
    try:
        info = await r.info("commandstats")
    finally:
        await r.aclose()
    return int(info.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_durable_publishes_on_a_cluster_wait_once_per_node(
    healthy: EmbeddedCluster, namespace: str
) -> None:
    async with broker.connect(healthy.url, namespace=namespace) as b:
        channels = [b.channel(f"d{i}", replicas=1) for i in range(12)]
        primaries = {n.port: n for n in healthy.primaries()}
        owners = {ch.name: healthy.node_of_slot(slot_of(ch.key)).port for ch in channels}
        assert len(set(owners.values())) == 3, "the channels should span every primary"
        before = {p: await commandstat(p, "wait") for p in primaries}
        # concurrent publishes over channels on every primary coalesce into pipelines: each
        # pipeline has one WAIT per node it touches
        pairs = [(ch, i) for i in range(50) for ch in channels]
        ids = await asyncio.gather(*(ch.publish(i) for ch, i in pairs))
        assert len({(ch.name, mid) for (ch, _), mid in zip(pairs, ids, strict=True)}) == 600
        used = {p: await commandstat(p, "wait") - before[p] for p in primaries}
        assert all(1 <= n < 200 for n in used.values()), used
        print(f"\n600 durable publishes over 12 channels on 3 primaries: WAITs per node {used}")
        # publish_many: one batch, one node, one WAIT
        ch = channels[0]
        node = owners[ch.name]
        before_one = await commandstat(node, "wait")
        assert len(await ch.publish_many(range(300), batch=100)) == 300
        assert await commandstat(node, "wait") == before_one + 3
        with pytest.raises(broker.ReplicationTimeoutError) as caught:
            await b.channel("d0", replicas=2, replica_timeout=0.2).publish("x")
        assert caught.value.acked == 1


@pytest.mark.parametrize("run", range(1, RUNS + 1))
async def test_killing_the_primary_of_a_channel_under_load(
    healthy: EmbeddedCluster, namespace: str, run: int, reports: list[str]
) -> None:
    name = f"orders-{uuid.uuid4().hex[:6]}"
    async with (
        broker.connect(healthy.url, namespace=namespace, reconnect_deadline=30) as b,
        broker.connect(healthy.url, namespace=namespace, reconnect_deadline=30) as b2,
    ):
        ch = b.channel(name, replicas=1, replica_timeout=1.0)
        slot = slot_of(ch.key)
        first_owner = healthy.node_of_slot(slot)
        bulk = next(  # written in bulk, on the same primary
            c
            for c in (b.channel(f"{name}-bulk{i}", replica_timeout=1.0) for i in range(10_000))
            if healthy.node_of_slot(slot_of(c.key)) is first_owner
        )
        async with Load(b, ch, brokers=[b, b2], hold=0.01, bulk=bulk) as load:
            await asyncio.sleep(1.5)
            owner = healthy.node_of_slot(slot)
            pending = (await b.redis.xpending(ch.key, "g"))["pending"]
            assert pending > 0, "the consumers hold no pending entry: the test would prove less"
            assert load.ok["durable"] and load.ok["plain"], "nothing was published yet"
            victim, new, t0, promoted, replicated = await kill_and_recover(healthy, slot)
            assert victim is owner and new is not owner, "the killed node did not own the slot"
            await asyncio.sleep(2.0)  # durable publishes go through again
            after = len(load.ok["durable"])
            await asyncio.sleep(1.0)
            assert len(load.ok["durable"]) > after, "durable publishes did not resume"
            load.stop_producing()
            held = await load.wait_consumed(30)
            report: Report = await load.report(t0, held)
            for key in (ch.key, bulk.key):
                await b.redis.delete(key)
    line = report.line(f"cluster failover run {run}/{RUNS}")
    line += (
        f"; replica promoted after {promoted:.1f}s, with a replica again after {replicated:.1f}s"
    )
    reports.append(line)
    print("\n" + line)
    assert not report.failed, report.failed[:5]
    assert not report.durable_lost, f"acknowledged with replicas=1 and lost: {report.durable_lost}"
    assert not report.bulk_durable_lost, f"bulk, replicas=1, lost: {report.bulk_durable_lost[:20]}"
    missing = sorted(held - load.consumed.keys())
    assert not missing, f"on the server but never consumed: {missing[:20]}"
    extra = [k for k in load.consumed if k[1] not in load.ok[k[0]] and k[1] not in load.uncertain]
    assert len(extra) <= 5, f"consumed but never returned by a publish: {extra[:20]}"


async def test_a_stop_fired_while_the_primary_is_down_reaches_every_process(
    healthy: EmbeddedCluster, namespace: str, tmp_path: Path, reports: list[str]
) -> None:
    name = f"work-{uuid.uuid4().hex[:6]}"
    # a token whose record lives on the primary that will be killed
    target = healthy.node_of_slot(slot_of(f"{namespace}:{{{name}}}"))
    token = next(
        t
        for t in (f"halt-{i}" for i in range(10_000))
        if healthy.node_of_slot(slot_of(stop_key(namespace, t))) is target
    )
    outs = [tmp_path / f"s{i}.log" for i in range(3)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.stop_worker", healthy.url, namespace, name,
             "g", f"s{i}", token, str(out), "0.01"],
            cwd=ROOT,
        )
        for i, out in enumerate(outs)
    ]  # fmt: skip
    try:
        async with broker.connect(healthy.url, namespace=namespace) as b:
            async with asyncio.timeout(60):  # every process subscribed, then work for them
                while not all(o.exists() and "ready" in o.read_text() for o in outs):
                    await asyncio.sleep(0.05)
                await b.channel(name).publish_many(range(30))
                while sum(o.read_text().count("ack ") for o in outs) < 30:
                    await asyncio.sleep(0.05)
            killed_at = time.time()
            recovering = asyncio.create_task(
                kill_and_recover(healthy, slot_of(stop_key(namespace, token)))
            )
            await asyncio.sleep(0.2)  # the primary is dead now; the record's slot has no node
            # durable: returns once the promoted replica's own replica has it (it retries
            # through the failover; ReplicationTimeoutError until the killed node rejoins)
            while True:
                try:
                    await b.stop_source(token).stop("failover", replicas=1, replica_timeout=1.0)
                    break
                except broker.ReplicationTimeoutError:
                    continue
            codes = [await asyncio.to_thread(p.wait, 40) for p in procs]
            _, _, _, promoted, _ = await recovering
            async with b.stop_token(token) as late:  # the record survived the failover
                assert late.stopped and late.reason == "failover"
            await b.stop_source(token).reset()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0, 0, 0], codes
    ends = []
    for out in outs:
        text = out.read_text()
        end = [ln for ln in text.splitlines() if ln.startswith("end ")]
        assert end and end[0].split()[1] == "failover", text[-500:]
        ends.append(int(end[0].split()[2]) / 1e9 - killed_at)
    line = (
        f"cluster: a stop fired while the primary of its record was down ended 3 processes "
        f"{min(ends):.1f}-{max(ends):.1f}s after the kill (replica promoted after {promoted:.1f}s)"
    )
    reports.append(line)
    print("\n" + line)
