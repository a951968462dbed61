"""Stop tokens: local, remote across processes, durable across disconnects, scoped."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

import broker
from broker import StopSource
from tests.conftest import compare_ids
from tests.helpers.proxy import Proxy

ROOT = Path(__file__).resolve().parents[2]


# every scenario that uses a server runs on one server and on a Redis Cluster (3 + 3 nodes)
SERVERS = ("single", "cluster")


async def test_local_source_token_and_children() -> None:
    source = StopSource()
    child = source.token.child()
    grandchild = child.child()
    seen: list[str | None] = []
    child.on_stop(lambda t: seen.append(t.reason))
    assert not child.stopped
    source.stop("done")
    assert (child.stopped, grandchild.stopped, child.reason, seen) == (True, True, "done", ["done"])
    assert await asyncio.wait_for(grandchild.wait(), 1) == "done"
    # a child firing alone leaves its parent running
    other = StopSource()
    kid = other.token.child()
    kid._fire("kid only")
    assert kid.stopped and not other.stopped


async def test_stop_stream_on_a_plain_async_iterable() -> None:
    source = StopSource()
    got: list[int] = []

    async def numbers() -> object:
        for i in range(1000):
            await asyncio.sleep(0.001)
            yield i

    async for n in source.token.stop_stream(numbers()):
        got.append(n)
        if n == 10:
            source.stop()
    assert got == list(range(11))


async def test_remote_stop_ends_subscription_cooperatively(
    client: broker.Broker, name: str
) -> None:
    ch = client.channel(name)
    sent = await ch.publish_many(range(40))
    handled: list[str] = []
    async with client.stop_token("job") as token:
        async with ch.subscribe(group="g", start="all", prefetch=8) as messages:
            async for msg in token.stop_stream(messages):
                handled.append(msg.id)
                msg.ack()
                if len(handled) == 5:
                    await client.stop_source("job").stop("enough")
        st = messages.statistics()
    assert token.reason == "enough" and len(handled) == 5
    assert st.released >= 1
    # what was fetched but not handled is released: another consumer takes it at once
    async with ch.subscribe(group="g", consumer="next", claim_idle=3600) as m:
        rest = []
        for _ in range(35):
            rest.append(await asyncio.wait_for(anext(m), 5))
            rest[-1].ack()
    compare_ids(sent, handled + [x.id for x in rest])
    await client.stop_source("job").reset()


async def test_token_created_after_stop_fires_at_once_and_reset_clears(
    client: broker.Broker,
) -> None:
    src = client.stop_source("deploy")
    await src.stop("rolled back", ttl=60)
    assert await src.status() == (True, "rolled back")
    async with client.stop_token("deploy") as token:
        assert token.stopped and token.reason == "rolled back"
    assert await src.reset()
    async with client.stop_token("deploy") as token:
        assert not token.stopped


async def test_scoped_tokens_parent_fires_children(client: broker.Broker) -> None:
    async with client.stop_token("fleet") as fleet:
        async with (
            client.stop_token("fleet/worker-1", parent=fleet) as w1,
            client.stop_token("fleet/worker-2", parent=fleet) as w2,
        ):
            await client.stop_source("fleet/worker-1").stop("just me")
            await asyncio.wait_for(w1.wait(), 5)
            await asyncio.sleep(0.05)
            assert not w2.stopped and not fleet.stopped
            await client.stop_source("fleet").stop("everyone")
            assert await asyncio.wait_for(w2.wait(), 5) == "everyone"
    for n in ("fleet", "fleet/worker-1"):
        await client.stop_source(n).reset()


async def test_many_tokens_share_one_pubsub_connection(client: broker.Broker, raw) -> None:  # type: ignore[no-untyped-def]
    async with (
        client.stop_token("a1") as t1,
        client.stop_token("a2") as t2,
        client.stop_token("a1") as t3,
    ):
        if client.cluster:  # a connection per node that serves one of the channels
            nodes = {raw.get_node_from_key(t.key).name for t in (t1, t2)}
            for name in nodes:
                conns = await raw.client_list(
                    _type="pubsub", target_nodes=raw.get_node(node_name=name)
                )
                mine = [c for c in conns if c.get("name") == "broker-py"]
                assert len(mine) == 1, (name, conns)
        else:
            clients = await raw.client_list(_type="pubsub")
            mine = [c for c in clients if c.get("name") == "broker-py"]
            assert len(mine) == 1, clients
        await client.stop_source("a1").stop()
        await asyncio.wait_for(asyncio.gather(t1.wait(), t3.wait()), 5)
        assert not t2.stopped
    await client.stop_source("a1").reset()


async def test_disconnected_process_stops_once_it_reconnects(
    redis_url: str, namespace: str
) -> None:
    server = redis_url  # a TCP proxy in front of one server (a cluster redirects past it)
    host, port = server.split("//")[1].split("/")[0].rsplit(":", 1)
    proxy = Proxy(host, int(port))
    await proxy.start()
    via_proxy = f"redis://127.0.0.1:{proxy.port}/0"
    try:
        async with (
            broker.connect(via_proxy, namespace=namespace, reconnect_deadline=30) as cut_off,
            broker.connect(server, namespace=namespace) as other,
        ):
            async with cut_off.stop_token("net") as token:
                await proxy.cut()
                await other.stop_source("net").stop("while you were away")
                await asyncio.sleep(0.3)
                assert not token.stopped, "the publish cannot have reached a cut-off host"
                await proxy.start_again()
                assert await asyncio.wait_for(token.wait(), 15) == "while you were away"
                assert cut_off._stop_hub().reconnects >= 1
    finally:
        await proxy.cut()


async def test_stalled_connection_still_sees_the_stop(redis_url: str, namespace: str) -> None:
    """A partition that stalls TCP raises nothing: the PONG deadline and the key poll catch it."""
    server = redis_url  # a TCP proxy in front of one server (a cluster redirects past it)
    host, port = server.split("//")[1].split("/")[0].rsplit(":", 1)
    proxy = Proxy(host, int(port))
    await proxy.start()
    try:
        async with (
            broker.connect(f"redis://127.0.0.1:{proxy.port}/0", namespace=namespace) as stalled,
            broker.connect(server, namespace=namespace) as other,
        ):
            async with stalled.stop_token("partition") as token:
                proxy.stall()
                t0 = time.monotonic()
                await other.stop_source("partition").stop("cut")
                assert await asyncio.wait_for(token.wait(), 20) == "cut"
                print(f"stop seen through a stalled connection after {time.monotonic() - t0:.1f}s")
    finally:
        await proxy.cut()


async def test_three_processes_stop_together_and_lose_nothing(
    client: broker.Broker, name: str, namespace: str, server: str, tmp_path: Path
) -> None:
    ch = client.channel(name)
    sent = await ch.publish_many(range(300))
    outs = [tmp_path / f"w{i}.log" for i in range(3)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.helpers.stop_worker",
                server,
                namespace,
                name,
                "g",
                f"w{i}",
                "halt",
                str(out),
                "0.02",
            ],
            cwd=ROOT,
        )
        for i, out in enumerate(outs)
    ]
    try:
        async with asyncio.timeout(30):
            while not all(o.exists() and o.read_text().count("ack ") >= 3 for o in outs):
                await asyncio.sleep(0.02)
        t_stop = time.time_ns()
        await client.stop_source("halt").stop("maintenance")
        codes = [await asyncio.to_thread(p.wait, 15) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0, 0, 0]
    handled: set[str] = set()
    latencies = []
    for out in outs:
        lines = out.read_text().splitlines()
        got = {ln.split()[1] for ln in lines if ln.startswith("got ")}
        acked = {ln.split()[1] for ln in lines if ln.startswith("ack ")}
        assert got == acked, f"handed to a handler but not acked: {got - acked}"
        end = [ln for ln in lines if ln.startswith("end ")]
        assert end and end[0].split()[1] == "maintenance"
        latencies.append((int(end[0].split()[2]) - t_stop) / 1e6)
        handled |= acked
    print(f"stop latency per process (ms, includes one in-flight handler of 20 ms): {latencies}")
    assert max(latencies) < 5000
    rest: list[str] = []
    async with ch.subscribe(group="g", consumer="after", claim_idle=3600, prefetch=64) as m:
        async with asyncio.timeout(20):
            while len(rest) + len(handled) < len(sent):
                msg = await anext(m)
                rest.append(msg.id)
                msg.ack()
    compare_ids(sent, handled | set(rest))
    assert not handled & set(rest)
    await client.stop_source("halt").reset()


@pytest.mark.parametrize("bad", ["", "a b", "x{y}"])
async def test_bad_token_names(client: broker.Broker, bad: str) -> None:
    with pytest.raises(broker.ConfigurationError):
        client.stop_token(bad)


async def test_a_failed_enter_leaves_no_registration(
    client: broker.Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from broker._pubsub import Hub, Listener

    async def unreachable(self: Hub, listener: Listener) -> None:
        raise broker.ConnectionLostError("server unreachable (simulated)")

    monkeypatch.setattr(Hub, "add", unreachable)
    parent = StopSource()
    token = client.stop_token("half-entered", parent=parent.token)
    with pytest.raises(broker.ConnectionLostError):
        async with token:
            pass
    assert token.key not in client._stop_hub()._tokens
    assert parent.token._callbacks == [], "the parent no longer holds the failed token"
