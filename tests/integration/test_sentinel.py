"""Sentinel (issue 14): ``redis+sentinel://`` through redis-py's asyncio Sentinel, following the
master across a failover (``SENTINEL FAILOVER`` and a killed master), durable publishes
(``replicas=``), and the subscription, stop tokens and ``broker worker`` going on.

The module has a Sentinel set of its own (1 master, 1 replica, 3 sentinels; down-after 1 s,
failover-timeout 3 s) from the suite's server binary; every test starts from a set whose nodes
all run and whose sentinels agree, and leaves it so (a killed node is started again even when
the test fails).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

import broker
from broker._server_cluster import _call
from broker._server_sentinel import EmbeddedSentinel
from tests.conftest import compare_ids
from tests.helpers.failover import Load
from tests.helpers.receipts import Receipts

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sentinel_set() -> Iterator[EmbeddedSentinel]:
    with EmbeddedSentinel(down_after=2000, failover_timeout=3000) as s:
        yield s


def heal(s: EmbeddedSentinel) -> None:
    """Every node running, replicating the master, and the sentinels agreeing (a killed node
    starts again only once every sentinel names another master: see ``wait_agreed``)."""
    for node in s.nodes:
        if node.process is None:
            new = s.wait_master(node.port, 45)
            s.wait_agreed(new.port, 45)
            s.rejoin(node, 45)
    s.wait_ready(45)


@pytest.fixture
def sentinel(sentinel_set: EmbeddedSentinel) -> Iterator[EmbeddedSentinel]:
    heal(sentinel_set)
    yield sentinel_set
    heal(sentinel_set)


async def commandstat(port: int, command: str) -> int:
    r = aioredis.Redis(port=port)
    try:
        info = await r.info("commandstats")
    finally:
        await r.aclose()
    return int(info.get(f"cmdstat_{command}", {}).get("calls", 0))


# -- connecting -------------------------------------------------------------------------------


async def test_connect_publish_and_subscribe_through_sentinel(
    sentinel: EmbeddedSentinel, name: str, namespace: str
) -> None:
    master = sentinel.master()
    url = sentinel.url + "/3"  # database 3
    async with broker.connect(url, namespace=namespace) as b:
        assert b.topology.sentinel and b.topology.master == ("127.0.0.1", master.port)
        assert not b.cluster
        ch = b.channel(name)
        sent = await ch.publish_many(range(50))
        async with ch.subscribe(group="g", start="all") as messages:
            got = []
            async with asyncio.timeout(10):
                async for msg in messages:
                    got.append(msg.id)
                    msg.ack()
                    if len(got) == len(sent):
                        break
        compare_ids(sent, got)
        # the keys are on the master, in database 3
        direct = aioredis.Redis(port=master.port, db=3)
        try:
            assert await direct.xlen(ch.key) == 50
        finally:
            await direct.aclose()
        await ch.delete()


async def test_an_unknown_service_fails_at_connect(sentinel: EmbeddedSentinel) -> None:
    url = sentinel.url.rsplit("/", 1)[0] + "/no-such-service"
    t0 = time.monotonic()
    with pytest.raises(broker.ConnectionLostError, match="no-such-service"):
        async with broker.connect(url, connect_timeout=1):
            pass
    assert time.monotonic() - t0 < 10


async def test_an_acl_user_through_sentinel(sentinel: EmbeddedSentinel, name: str) -> None:
    # ACLs are not replicated: the user exists on every data node; the sentinels have no such
    # user, so they must be asked without the URL's credentials
    for node in sentinel.nodes:
        _call(node.port, "ACL", "SETUSER", "app", "on", ">app-pw", "~*", "&*", "+@all")
    hosts = sentinel.url.split("://", 1)[1]
    async with broker.connect(f"redis+sentinel://app:app-pw@{hosts}") as b:
        assert "app-pw" not in repr(b)
        ch = b.channel(name)
        assert await ch.publish("x")
        assert await b.redis.acl_whoami() in ("app", b"app")
        await ch.delete()
    with pytest.raises(broker.AuthenticationError) as caught:
        async with broker.connect(f"redis+sentinel://app:WRONG-pw@{hosts}"):
            pass
    assert "WRONG-pw" not in str(caught.value)


def test_the_cli_works_unchanged_through_sentinel(
    sentinel: EmbeddedSentinel, name: str, namespace: str
) -> None:
    env = {**os.environ, "BROKER_URL": sentinel.url, "BROKER_NAMESPACE": namespace}
    cli = [sys.executable, "-m", "broker.cli"]
    out = subprocess.run(
        [*cli, "publish", name, '{"n": 1}'], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    mid = out.stdout.strip()
    out = subprocess.run(
        [*cli, "tail", name, "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert mid in out.stdout and '"n": 1' in out.stdout
    # durable from the command line: the publish and the stop record wait for the replica
    for args in (["publish", name, '{"n": 2}', "--replicas", "1"],
                 ["stop", name, "--replicas", "1"], ["stop", "--reset", name]):  # fmt: skip
        out = subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (args, out.stderr)
    # two replicas asked, one exists: one line saying what happened, status 1
    out = subprocess.run(
        [*cli, "publish", name, '{"n": 3}', "--replicas", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1, out
    assert "may or may not survive" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


# -- durable publishes ------------------------------------------------------------------------


async def test_durable_publishes_wait_for_the_replica(
    sentinel: EmbeddedSentinel, name: str, namespace: str
) -> None:
    master = sentinel.master()
    async with broker.connect(sentinel.url, namespace=namespace) as b:
        ch = b.channel(name, replicas=1)
        waits = await commandstat(master.port, "wait")
        assert await ch.publish({"one": 1})
        assert await commandstat(master.port, "wait") == waits + 1
        # one WAIT per pipelined batch, not per message
        waits = await commandstat(master.port, "wait")
        ids = await ch.publish_many(range(1000), batch=250)
        assert len(ids) == 1000
        assert await commandstat(master.port, "wait") == waits + 4
        # concurrent publishes coalesce; those that do not wait leave apart from those that do
        waits = await commandstat(master.port, "wait")
        both = await asyncio.gather(
            *(ch.publish(i, replicas=0 if i % 2 else None) for i in range(400))
        )
        assert len(set(both)) == 400
        used = await commandstat(master.port, "wait") - waits
        assert 1 <= used < 200, used  # coalesced: far fewer WAITs than the 200 durable publishes
        print(f"400 concurrent publishes, 200 of them durable: {used} WAITs")
        # the default channel does not wait
        waits = await commandstat(master.port, "wait")
        await b.channel(name).publish_many(range(100))
        assert await commandstat(master.port, "wait") == waits
        # more replicas than there are: a typed error after the timeout; the entry is there
        strict = b.channel(name, replicas=2, replica_timeout=0.3)
        t0 = time.monotonic()
        with pytest.raises(broker.ReplicationTimeoutError) as caught:
            await strict.publish({"strict": True})
        took = time.monotonic() - t0
        err = caught.value
        assert err.replicas == 2 and err.acked == 1 and err.channel == name
        assert "may or may not survive" in str(err)
        assert err.message_id and await b.redis.xrange(ch.key, err.message_id, err.message_id)
        assert 0.3 <= took < 5, took
        with pytest.raises(broker.ReplicationTimeoutError):
            await strict.publish_many(range(3))
        # a WAIT that cannot be met holds the publishes that asked for it, and no other: the
        # durable ones fill every pipeline of their lane, the plain ones still go through
        held = b.channel(name, replicas=2, replica_timeout=3.0)
        slow = [asyncio.create_task(held.publish(i)) for i in range(20)]
        await asyncio.sleep(0)
        fast = await asyncio.wait_for(
            asyncio.gather(*(held.publish(i, replicas=0) for i in range(20))), 10
        )
        assert len(fast) == 20 and not any(t.done() for t in slow)
        outcomes = await asyncio.gather(*slow, return_exceptions=True)
        assert all(isinstance(o, broker.ReplicationTimeoutError) for o in outcomes), outcomes
        with pytest.raises(broker.ConfigurationError, match="replicas must be"):
            b.channel(name, replicas=-1)
        with pytest.raises(broker.ConfigurationError, match="replica_timeout"):
            b.channel(name, replicas=1, replica_timeout=0)
        await ch.delete()


async def test_durable_acks_dead_letters_and_stop_records(
    sentinel: EmbeddedSentinel, name: str, namespace: str
) -> None:
    master = sentinel.master()
    async with broker.connect(sentinel.url, namespace=namespace) as b:
        ch = b.channel(name)
        await ch.publish_many(range(10))
        waits = await commandstat(master.port, "wait")
        async with ch.subscribe(
            group="g", start="all", replicas=1, max_deliveries=1, retry_delay=0
        ) as messages:
            for i in range(10):
                msg = await asyncio.wait_for(anext(messages), 10)
                if i == 0:
                    msg.nack(error="bad")  # max_deliveries=1: to the dead letters at once
                else:
                    msg.ack()
            await messages.flush()
        assert await commandstat(master.port, "wait") > waits  # acks and the dead letter
        (dead,) = await ch.dead_letters()
        assert dead.error.startswith("bad")
        assert (await ch.info()).groups[0].pending == 0
        # a stop record that waits for the replica; then read from the replica itself
        waits = await commandstat(master.port, "wait")
        await b.stop_source(name).stop("durable", replicas=1)
        assert await commandstat(master.port, "wait") == waits + 1
        (replica,) = sentinel.replicas_of(master)
        on_replica = aioredis.Redis(port=replica.port)
        try:
            assert await on_replica.get(f"{namespace}:stop:{{{name}}}") is not None
        finally:
            await on_replica.aclose()
        with pytest.raises(broker.ReplicationTimeoutError, match="stop record"):
            await b.stop_source(name).stop("again", replicas=2, replica_timeout=0.2)
        await b.stop_source(name).reset()
        await ch.delete()


# -- failover ---------------------------------------------------------------------------------


async def fail(sentinel: EmbeddedSentinel, how: str) -> tuple[int, float]:
    """Fail the master over; returns the old master's port and when it began."""
    old = sentinel.master()
    t0 = time.monotonic()
    if how == "SIGKILL":
        old.kill()
    else:
        await asyncio.to_thread(sentinel.failover)
    return old.port, t0


async def recover(sentinel: EmbeddedSentinel, old_port: int, t0: float) -> tuple[float, float]:
    """Wait for the new master, start a killed master again (it rejoins as a replica) and wait
    until the new master has a replica; returns (seconds to the new master, seconds until it
    has a replica again)."""
    new = await asyncio.to_thread(sentinel.wait_master, old_port, 30)
    promoted = time.monotonic() - t0
    old = sentinel.node_at(old_port)
    if old.process is None:
        # restarted empty: only once no sentinel can take it for the master any more (see
        # EmbeddedSentinel.wait_agreed: else the promoted node may be made its replica and
        # wiped, which once lost a stop record and every durable publish in CI), and not
        # promotable until it has synced (EmbeddedSentinel.rejoin)
        await asyncio.to_thread(sentinel.wait_agreed, new.port, 30)
        await asyncio.to_thread(sentinel.rejoin, old, 30)
    deadline = time.monotonic() + 40
    while not sentinel.replicas_of(new) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return promoted, time.monotonic() - t0


@pytest.mark.parametrize("how", ["SENTINEL FAILOVER", "SIGKILL"])
async def test_failover_under_load_loses_no_durable_publish(
    sentinel: EmbeddedSentinel,
    name: str,
    namespace: str,
    how: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="broker")
    async with (
        broker.connect(sentinel.url, namespace=namespace, reconnect_deadline=30) as b,
        broker.connect(sentinel.url, namespace=namespace, reconnect_deadline=30) as b2,
    ):
        ch = b.channel(name, replicas=1, replica_timeout=1.0)
        bulk = b.channel(f"{name}-bulk", replica_timeout=1.0)
        async with Load(b, ch, brokers=[b, b2], hold=0.01, bulk=bulk) as load:
            await asyncio.sleep(1.5)
            pending = (await b.redis.xpending(ch.key, "g"))["pending"]
            assert pending > 0, "the consumers hold no pending entry: the test would prove less"
            assert load.ok["durable"] and load.ok["plain"], "nothing was published yet"
            old_port, t0 = await fail(sentinel, how)
            promoted, replicated = await recover(sentinel, old_port, t0)
            await asyncio.sleep(3.0)  # durable publishes go through again
            after = len(load.ok["durable"])
            await asyncio.sleep(1.0)
            assert len(load.ok["durable"]) > after, "durable publishes did not resume"
            load.stop_producing()
            held = await load.wait_consumed(30)
            report = await load.report(t0, held)
            await b.redis.delete(ch.key, bulk.key)
    line = report.line(f"Sentinel, {how}")
    print(f"\n{line}; new master after {promoted:.1f}s, with a replica after {replicated:.1f}s")
    assert not report.failed, report.failed[:5]
    assert not report.durable_lost, f"acknowledged with replicas=1 and lost: {report.durable_lost}"
    assert not report.bulk_durable_lost, f"bulk, replicas=1, lost: {report.bulk_durable_lost[:20]}"
    missing = sorted(held - load.consumed.keys())
    assert not missing, f"on the server but never consumed: {missing[:20]}"
    # every message that was handed out had been published (nothing invented)
    extra = [k for k in load.consumed if k[1] not in load.ok[k[0]] and k[1] not in load.uncertain]
    assert len(extra) <= 5, f"consumed but never returned by a publish: {extra[:20]}"
    assert any("sentinel: the master of" in r.getMessage() for r in caplog.records), [
        r.getMessage() for r in caplog.records
    ]


async def test_a_worker_and_stop_tokens_ride_a_killed_master(
    sentinel: EmbeddedSentinel, name: str, namespace: str, redis_url: str, tmp_path: Path
) -> None:
    """``broker worker`` consumes across the failover; a stop fired while the master is dead
    reaches every process (two stop-token subscribers and a second worker), and its record is
    on the new master for a token that starts later."""
    token = f"halt-{uuid.uuid4().hex[:6]}"
    receipts = f"receipts-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "BROKER_URL": sentinel.url,
        "BROKER_NAMESPACE": namespace,
        "RECEIPTS_URL": redis_url,  # the receipts live on a server that does not fail over
        "RECEIPTS_KEY": receipts,
    }
    cli = [sys.executable, "-m", "broker.cli", "worker", "tests.helpers.receipts:record"]
    worker = subprocess.Popen(
        [*cli, "--channel", name, "--group", "g", "--name", "rec", "--claim-idle", "3",
         "--start", "all"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    stopped_worker = subprocess.Popen(
        [*cli, "--channel", f"{name}-other", "--group", "g", "--name", "other",
         "--stop-token", token],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    outs = [tmp_path / f"s{i}.log" for i in range(2)]
    subscribers = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.stop_worker", sentinel.url, namespace,
             f"{name}-stop", "g", f"s{i}", token, str(out), "0.01"],
            cwd=ROOT,
        )
        for i, out in enumerate(outs)
    ]  # fmt: skip
    procs = [worker, stopped_worker, *subscribers]
    plain = aioredis.Redis.from_url(redis_url)
    try:
        async with broker.connect(sentinel.url, namespace=namespace) as b:
            ch = b.channel(name, replicas=1, replica_timeout=1.0)
            sent = set(await ch.publish_many(range(50)))
            async with asyncio.timeout(60):
                while not all(o.exists() and "ready" in o.read_text() for o in outs):
                    await asyncio.sleep(0.05)
                while not (await Receipts.fetch(plain, receipts)).ids >= sent:
                    await asyncio.sleep(0.05)
            killed_at = time.time()
            old_port, t0 = await fail(sentinel, "SIGKILL")
            # fired while the master is dead: the call goes on once the new master answers
            fired = asyncio.create_task(b.stop_source(token).stop("failover"))

            async def exit_of(p: subprocess.Popen[bytes]) -> tuple[int, float]:
                code = await asyncio.to_thread(p.wait, 40)
                return code, time.time() - killed_at

            exits = asyncio.gather(*(exit_of(p) for p in (stopped_worker, *subscribers)))
            publishing = True

            async def publish_meanwhile() -> None:
                i = 0
                while publishing:
                    i += 1
                    try:
                        sent.add(await ch.publish({"during": i}))
                    except broker.ReplicationTimeoutError as exc:
                        assert exc.message_id is not None
                        uncertain.add(exc.message_id)  # not confirmed: may or may not be handled
                    await asyncio.sleep(0.02)

            uncertain: set[str] = set()
            producer = asyncio.create_task(publish_meanwhile())
            promoted, _ = await recover(sentinel, old_port, t0)
            await asyncio.wait_for(fired, 30)
            ended = await exits
            await asyncio.sleep(2.0)
            publishing = False
            await producer
            async with asyncio.timeout(30):
                while not (got := await Receipts.fetch(plain, receipts)).ids >= sent:
                    await asyncio.sleep(0.1)
            # a token that starts after the failover reads the record from the new master
            async with b.stop_token(token) as late:
                assert late.stopped and late.reason == "failover"
            await b.stop_source(token).reset()
        assert worker.poll() is None, "the worker ended during the failover"
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker.wait, 30) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        await plain.delete(receipts)
        await plain.aclose()
    assert [code for code, _ in ended] == [0, 0, 0], ended
    for out in outs:
        assert "end failover" in out.read_text(), out.read_text()[-500:]
    stop_took = max(took for _, took in ended)
    # every acknowledged publish handled; the unconfirmed ones may be there too
    compare_ids(sent, got.ids - uncertain)
    print(
        f"\nworker across a killed Sentinel master: {len(sent)} handled, {got.extra} duplicate "
        f"receipts; new master after {promoted:.1f}s; the stop fired at the kill ended the 3 "
        f"processes within {stop_took:.1f}s of it"
    )


async def test_pubsub_follows_the_master_at_once(
    sentinel: EmbeddedSentinel, namespace: str, name: str
) -> None:
    """After ``SENTINEL FAILOVER`` the old master stays up, a master for several seconds more:
    the stop tokens' pub/sub connection must move to the new master when the sentinels announce
    it, not stay where publishes no longer arrive (tokens would then fire only at their next
    poll of the record, and doorbells would not ring)."""
    async with (
        broker.connect(sentinel.url, namespace=namespace) as a,
        broker.connect(sentinel.url, namespace=namespace) as c,
    ):
        async with a.stop_token(name) as token:
            old = sentinel.master()
            await asyncio.to_thread(sentinel.failover)
            new = await asyncio.to_thread(sentinel.wait_master, old.port, 30)
            async with asyncio.timeout(10):
                # the firing side too: the old master takes writes for a while, and a stop
                # published there reaches only its own subscribers (then its record is wiped)
                while {a.topology.master, c.topology.master} != {("127.0.0.1", new.port)}:
                    await asyncio.sleep(0.02)
                while a._pubsub_hub().reconnects < 1 or not a._pubsub_hub().listening(token.key):
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)
            receivers = await c.stop_source(name).stop("moved")
            await asyncio.wait_for(token.wait(), 5)
        await c.stop_source(name).reset()
    assert receivers >= 1, "the token's pub/sub connection is not on the new master"


# -- sentinels that require a password ---------------------------------------------------------


async def test_sentinels_with_a_password_of_their_own(name: str, namespace: str) -> None:
    """Sentinels started with ``requirepass`` (as managed services run them): the URL gives
    their password as ``?sentinel_password=``, apart from the data nodes' credentials; the
    master is found, followed across ``SENTINEL FAILOVER`` (the ``+switch-master`` watch
    authenticates too), and a missing or wrong password is a typed error that says what to do
    and never shows the password."""
    with EmbeddedSentinel(
        service="guarded", sentinel_password="s3nt-pw", down_after=2000, failover_timeout=3000
    ) as s:
        assert "sentinel_password=s3nt-pw" in s.url
        bare = s.url.split("?", 1)[0]
        with pytest.raises(broker.AuthenticationError, match="sentinel_password") as caught:
            async with broker.connect(bare, connect_timeout=2):
                pass
        with pytest.raises(broker.AuthenticationError) as wrong:
            async with broker.connect(f"{bare}?sentinel_password=WRONG-pw", connect_timeout=2):
                pass
        assert "WRONG-pw" not in str(wrong.value) and "s3nt-pw" not in str(caught.value)

        async with broker.connect(s.url, namespace=namespace) as b:
            assert "s3nt-pw" not in repr(b) and "s3nt-pw" not in b.settings.safe_url
            old = s.master()
            assert b.topology.master == ("127.0.0.1", old.port)
            ch = b.channel(name)
            sent = [await ch.publish(i) for i in range(10)]
            await asyncio.to_thread(s.failover)
            new = await asyncio.to_thread(s.wait_master, old.port, 30)
            async with asyncio.timeout(15):
                while b.topology.master != ("127.0.0.1", new.port):
                    await asyncio.sleep(0.02)
            sent += [await ch.publish(i) for i in range(10, 20)]
            direct = aioredis.Redis(port=new.port)
            try:
                # every publish is on the new master (the first ten reached it by replication)
                ids = [i.decode() for i, _ in await direct.xrange(ch.key)]
            finally:
                await direct.aclose()
            compare_ids(sent, ids)
