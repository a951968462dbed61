"""Watched values: versions, compare-and-set, newest-wins readers, gaps, expiry, processes."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import broker
from broker import ConfigurationError, Version, VersionConflictError

ROOT = Path(__file__).resolve().parents[2]

# every scenario runs on one server and on a Redis Cluster (3 + 3 nodes)
SERVERS = ("single", "cluster")


async def keys_of(raw: Any, namespace: str) -> list[str]:
    return sorted([k.decode() async for k in raw.scan_iter(match=f"{namespace}:*")])


async def kill_pubsub(raw: Any) -> None:
    """Cut every pub/sub connection of the server (every node of a cluster)."""
    if hasattr(raw, "get_nodes"):
        await raw.execute_command(
            "CLIENT", "KILL", "TYPE", "pubsub", target_nodes=raw.get_primaries()
        )
    else:
        await raw.execute_command("CLIENT", "KILL", "TYPE", "pubsub")


async def test_set_get_versions(client: broker.Broker, name: str, raw: Any, namespace: str) -> None:
    w = client.watch(name)
    assert await w.get() is None
    assert await w.version() == 0
    assert await w.set({"rate": 1}) == 1
    assert await w.set({"rate": 2}) == 2
    assert await w.get() == Version({"rate": 2}, 2)
    assert await w.version() == 2
    # the keys: the value and its counter, with the name's hash tag, apart from channel keys
    assert await keys_of(raw, namespace) == [
        f"{namespace}:watch:{{{name}}}",
        f"{namespace}:watch:{{{name}}}:version",
    ]
    assert await client.channels() == []
    # another codec reads what it wrote
    j = client.watch(name + "-j", codec="json")
    await j.set([1, "a"])
    got = await j.get()
    assert got is not None and got.value == [1, "a"]


async def test_compare_and_set(client: broker.Broker, name: str) -> None:
    w = client.watch(name)
    assert await w.set("a", if_version=0) == 1  # only if unset
    with pytest.raises(VersionConflictError) as info:
        await w.set("b", if_version=0)
    assert info.value.current == 1 and info.value.expected == 0
    assert "expected version 0, found version 1" in str(info.value)
    assert await w.set("b", if_version=1) == 2
    with pytest.raises(VersionConflictError) as info:
        await w.set("c", if_version=1)
    assert info.value.current == 2
    assert await w.get() == Version("b", 2)


async def test_two_racing_writers_one_wins_each_round(client: broker.Broker, name: str) -> None:
    w = client.watch(name)
    v = await w.set(0)
    for rnd in range(50):
        results = await asyncio.gather(
            w.set(f"a{rnd}", if_version=v), w.set(f"b{rnd}", if_version=v), return_exceptions=True
        )
        won = [r for r in results if isinstance(r, int)]
        lost = [r for r in results if isinstance(r, VersionConflictError)]
        assert len(won) == 1 and len(lost) == 1, results
        assert won[0] == v + 1 and lost[0].current == v + 1
        v = won[0]
    assert await w.version() == 51


async def test_subscriber_gets_current_value_first(client: broker.Broker, name: str) -> None:
    w = client.watch(name)
    await w.set("one")
    await w.set("two")
    async with w.subscribe() as values:
        first = await asyncio.wait_for(anext(values), 5)
        assert first == Version("two", 2)
        await w.set("three")
        assert await asyncio.wait_for(anext(values), 5) == Version("three", 3)
        stats = values.statistics()
        assert (stats.yielded, stats.version, stats.pending) == (2, 3, False)


async def test_subscriber_before_first_set_waits(client: broker.Broker, name: str) -> None:
    w = client.watch(name)
    async with w.subscribe() as values:
        nothing = asyncio.ensure_future(anext(values))
        await asyncio.sleep(0.2)
        assert not nothing.done()
        await w.set({"x": 1})
        assert await asyncio.wait_for(nothing, 5) == Version({"x": 1}, 1)


async def test_slow_subscriber_skips_to_newest(client: broker.Broker, name: str) -> None:
    w = client.watch(name)
    n = 1000
    seen: list[int] = []
    async with w.subscribe() as values:

        async def writer() -> None:
            for i in range(1, n + 1):
                await w.set(i)

        task = asyncio.ensure_future(writer())
        try:
            async with asyncio.timeout(30):
                async for v in values:
                    assert v.value == v.version
                    seen.append(v.version)
                    if v.version == n:
                        break
                    await asyncio.sleep(0.05)
        finally:
            await task
        stats = values.statistics()
    print(f"slow reader saw {len(seen)} of {n} versions: {seen[:5]} ... {seen[-3:]}; {stats}")
    assert seen[-1] == n
    assert seen == sorted(set(seen)), "went backwards or repeated"
    assert len(seen) < n / 5


async def test_large_values_are_read_from_the_server(client: broker.Broker, name: str) -> None:
    w = client.watch(name, codec="raw")
    big = b"x" * 20_000
    async with w.subscribe() as values:
        await w.set(big)
        got = await asyncio.wait_for(anext(values), 5)
        assert got == Version(big, 1)
        await w.set(big + b"y")
        assert await asyncio.wait_for(anext(values), 5) == Version(big + b"y", 2)
        assert values.statistics().rereads >= 2


async def test_delete_keeps_versions_monotonic(
    client: broker.Broker, name: str, raw: Any, namespace: str
) -> None:
    w = client.watch(name)
    await w.set("a")
    await w.set("b")
    async with w.subscribe() as values:
        assert await asyncio.wait_for(anext(values), 5) == Version("b", 2)
        assert await w.delete() is True
        assert await w.delete() is False
        assert await w.get() is None
        nothing = asyncio.ensure_future(anext(values))
        await asyncio.sleep(0.2)
        assert not nothing.done(), "a delete yields nothing"
        assert await w.set("c") == 3  # the counter outlived the value
        assert await asyncio.wait_for(nothing, 5) == Version("c", 3)
    # a compare-and-set delete, then forget: nothing of the name is left
    with pytest.raises(VersionConflictError) as info:
        await w.delete(if_version=2)
    assert info.value.current == 3
    assert await w.delete(if_version=3, forget=True) is True
    assert await keys_of(raw, namespace) == []
    assert await w.set("again") == 1


async def test_ttl_expiry(client: broker.Broker, name: str, raw: Any, namespace: str) -> None:
    w = client.watch(name)
    assert await w.set("leader-a", if_version=0, ttl=0.3) == 1
    ttl = await raw.pttl(w.key)
    assert 0 < ttl <= 300
    assert await w.set("leader-a", if_version=1, ttl=0.3) == 2  # heartbeat
    async with w.subscribe() as values:
        assert await asyncio.wait_for(anext(values), 5) == Version("leader-a", 2)
        await asyncio.sleep(0.5)
        assert await w.get() is None  # gone
        nothing = asyncio.ensure_future(anext(values))
        await asyncio.sleep(0.1)
        assert not nothing.done(), "an expiry yields nothing"
        # a free leadership: the next taker only succeeds with if_version=0
        assert await w.set("leader-b", if_version=0) == 3
        assert await asyncio.wait_for(nothing, 5) == Version("leader-b", 3)
    assert await raw.pttl(w.key) == -1  # a set without ttl keeps the value
    assert await keys_of(raw, namespace) == [w.key, w.version_key]


async def test_reader_ends_on_newest_after_pubsub_connections_are_killed(
    client: broker.Broker, name: str, raw: Any
) -> None:
    w = client.watch(name)
    await w.set(0)
    seen: list[int] = []
    async with w.subscribe() as values:
        assert (await asyncio.wait_for(anext(values), 5)).version == 1

        async def writer() -> None:
            for i in range(1, 51):
                await w.set(i)
                if i % 10 == 0:
                    await kill_pubsub(raw)
                await asyncio.sleep(0.01)

        task = asyncio.ensure_future(writer())
        try:
            async with asyncio.timeout(30):
                async for v in values:
                    seen.append(v.version)
                    if v.version == 51:
                        break
        finally:
            await task
        stats = values.statistics()
    assert client._pubsub_hub().reconnects >= 1
    assert seen[-1] == 51 and seen == sorted(set(seen))
    print(f"after {client._pubsub_hub().reconnects} reconnects: saw {len(seen)}; {stats}")


async def test_subscriber_leaves_nothing(client: broker.Broker, name: str) -> None:
    w = client.watch(name)
    hub = client._pubsub_hub()
    async with w.subscribe() as a, w.subscribe() as b:
        assert hub.listening(w.key)
        await w.set(1)
        assert (await anext(a)).version == (await anext(b)).version == 1
    assert not hub.listening(w.key)
    await a.aclose()  # twice: harmless
    with pytest.raises(broker.ClosedError):
        async with a:
            pass


async def test_bad_input_is_a_clear_error(client: broker.Broker, name: str) -> None:
    with pytest.raises(ConfigurationError, match="invalid watch name"):
        client.watch("bad {name}")
    with pytest.raises(ConfigurationError, match="unknown codec"):
        client.watch(name, codec="pickle")
    w = client.watch(name)
    with pytest.raises(ConfigurationError, match="if_version must be an int >= 0"):
        await w.set(1, if_version=-1)
    with pytest.raises(ConfigurationError, match="ttl must be a number of seconds > 0"):
        await w.set(1, ttl=0)
    with pytest.raises(ConfigurationError, match="ttl must be"):
        await w.set(1, ttl=-2.5)
    with pytest.raises(TypeError, match="cannot encode"):
        await w.set(object())
    assert await w.get() is None


async def test_processes_three_readers_one_writer(
    client: broker.Broker, name: str, namespace: str, server: str, tmp_path: Path
) -> None:
    n = 1000
    sleeps = ["0", "0.005", "0.05"]
    outs = [tmp_path / f"r{i}.log" for i in range(3)]
    helper = [sys.executable, "-m", "tests.helpers.watch_proc", server, namespace, name]
    readers = [
        subprocess.Popen([*helper, "read", s, str(n), str(o)], cwd=ROOT)
        for s, o in zip(sleeps, outs, strict=True)
    ]
    writer = None
    try:
        async with asyncio.timeout(30):
            while not all(o.exists() and "ready" in o.read_text() for o in outs):
                await asyncio.sleep(0.05)
        t0 = time.monotonic()
        writer = subprocess.Popen([*helper, "write", str(n)], cwd=ROOT)
        assert await asyncio.to_thread(writer.wait, 60) == 0
        wrote = time.monotonic() - t0
        codes = [await asyncio.to_thread(p.wait, 30) for p in readers]
    finally:
        for p in [*readers, *([writer] if writer else [])]:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0, 0, 0]
    counts = []
    for out in outs:
        lines = out.read_text().splitlines()
        versions = [int(ln.split()[1]) for ln in lines if ln.startswith("v ")]
        assert versions[-1] == n, versions[-5:]
        assert versions == sorted(set(versions)), "went backwards or repeated"
        assert all(int(ln.split()[2]) == int(ln.split()[1]) for ln in lines if ln.startswith("v "))
        assert lines[-1] == f"end {len(versions)}"
        counts.append(len(versions))
    print(f"writer: {n} sets in {wrote:.2f}s; values seen by readers sleeping {sleeps}: {counts}")
    assert counts[2] < n
    assert (await client.watch(name).get()) == Version(n, n)


async def test_a_deleted_value_is_not_handed_out(client: broker.Broker, name: str) -> None:
    w = client.watch(name)
    async with w.subscribe() as values:
        await w.set("short-lived")  # announced while the reader is not asking
        await w.delete()
        await asyncio.sleep(0.2)  # both messages arrived
        nothing = asyncio.ensure_future(anext(values))
        await asyncio.sleep(0.2)
        assert not nothing.done(), "the deleted value was handed out"
        await w.set("kept")
        assert await asyncio.wait_for(nothing, 5) == Version("kept", 2)


async def test_a_cancelled_read_loses_nothing(client: broker.Broker, name: str) -> None:
    w = client.watch(name)
    await w.set("now")
    async with w.subscribe() as values:
        # reads cancelled before or during their re-read, until one is fast enough
        got, cancelled = None, 0
        for timeout in [0, 0.0001, 0.0005, 0.001, 0.002, 0.005, 5.0]:
            try:
                got = await asyncio.wait_for(anext(values), timeout)
                break
            except TimeoutError:
                cancelled += 1
        assert got == Version("now", 1), f"after {cancelled} cancelled reads"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(values), 0.1)
        await w.set("next")
        assert await asyncio.wait_for(anext(values), 5) == Version("next", 2)


async def test_a_retried_write_is_applied_once(client: broker.Broker, name: str) -> None:
    """The script run twice with one write id (a reply lost, the call retried): one version,
    and a compare-and-set does not conflict with itself."""
    from broker._scripts import WATCH_SET

    w = client.watch(name)
    await w.set("a")
    publish = "SPUBLISH" if client.cluster else "PUBLISH"
    args = [w.codec.encode("b"), 1, "", 8192, publish, "write-1"]
    keys = [w.key, w.version_key]
    assert await WATCH_SET(client.redis, keys, args) == [1, 2]
    assert await WATCH_SET(client.redis, keys, args) == [1, 2]
    assert await w.get() == Version("b", 2) and await w.version() == 2
    # with no value there is nothing to delete, whatever version was expected
    assert await w.delete(if_version=2) is True
    assert await w.delete(if_version=2) is False
