"""The hand-packed hot path (broker._wire): same bytes as redis-py, safe connections, both
protocols."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.connection import Connection

import broker
from broker._publisher import XAdd, pack_xadd
from broker._wire import Wire, pack, pack_strs
from tests.helpers.proxy import Proxy


def _redis_py_packing(*args: Any) -> bytes:
    return b"".join(Connection().pack_command(*args))


@pytest.mark.parametrize(
    "args",
    [
        (b"XACK", "k", "g", "1-0", "2-5"),
        (b"XADD", "ns:{é}", b"*", b"d", b"\x00\r\n" * 300),
        (b"XREADGROUP", b"GROUP", "g", "c", b"COUNT", 10, b"BLOCK", 0, b"STREAMS", "a", ">"),
    ],
)
def test_pack_matches_redis_py(args: tuple[Any, ...]) -> None:
    assert pack(*args) == _redis_py_packing(*args)


def test_pack_xadd_and_ids_match_redis_py() -> None:
    for maxlen, minid, headers in [
        (None, None, None),
        (1000, None, b"\x81\xa1a\xa1b"),
        (None, "1700000000000-0", None),
        (5, "1700000000000-0", b"h"),  # the age bound goes in an XTRIM after: not in the XADD
    ]:
        item = XAdd("ns:{c}", "c", b"payload", headers, maxlen, minid)
        args: list[Any] = [b"XADD", "ns:{c}"]
        if maxlen is not None:
            args += [b"MAXLEN", b"~", maxlen]
        elif minid is not None:
            args += [b"MINID", b"~", minid]
        args += [b"*", b"d", b"payload"] + ([b"h", headers] if headers else [])
        assert pack_xadd(item) == _redis_py_packing(*args), (maxlen, minid, headers)
    ids = ["1-0", "1700000000000-12"]
    assert pack_strs(ids) == _redis_py_packing(*ids)[len(b"*2\r\n") :]


@pytest.mark.parametrize("protocol", [2, 3])
async def test_subscription_works_over_resp2_and_resp3(
    redis_url: str, namespace: str, protocol: int
) -> None:
    url = f"{redis_url}{'&' if '?' in redis_url else '?'}protocol={protocol}"
    async with broker.connect(url, namespace=namespace) as b:
        assert b.redis.connection_pool.connection_kwargs.get("protocol") == protocol
        ch = b.channel("p")
        sent = {await ch.publish({"i": i}) for i in range(50)}
        got = set()
        async with ch.subscribe(group="g", start="all", prefetch=8) as messages:
            async for msg in messages:
                got.add(msg.id)
                msg.ack()
                if len(got) == len(sent):
                    break
        assert got == sent
        assert (await ch.pending("g")) == []


async def test_a_stalled_server_is_detected_and_the_connection_discarded(redis_url: str) -> None:
    host, port = redis_url.split("//")[1].split("/")[0].split(":")
    proxy = Proxy(host, int(port))
    await proxy.start()
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{proxy.port}/0")
    wire = Wire.like(client, timeout=0.5)
    try:
        assert await wire.execute(pack(b"PING"), 1) == [b"PONG"]
        proxy.stall()
        with pytest.raises(rex.TimeoutError, match="no reply"):
            await asyncio.wait_for(wire.execute(pack(b"PING"), 1), 10)
        # the stalled connection is not reused: a fresh one answers
        assert await wire.execute(pack(b"PING"), 1) == [b"PONG"]
        # none leaked: what the pool counts in use is what waits in the wire for the next
        # exchange, one connection, not the stalled one
        assert set(wire.pool._in_use_connections) == set(wire._idle)
        assert len(wire._idle) == 1 and wire._idle[0].is_connected
    finally:
        await wire.aclose()
        await client.aclose()
        await proxy.cut()


async def test_an_idle_connection_is_reused_only_while_sound(redis_url: str) -> None:
    """A clean exchange's connection waits in the wire for the next one (no pool checkout);
    one the server closed meanwhile, or one a failover marked for a reconnect, is not taken
    again, and ``drop_idle`` closes them all."""
    client = aioredis.Redis.from_url(redis_url)
    wire = Wire.like(client, timeout=5)

    async def client_id() -> int:
        (got,) = await wire.execute(pack(b"CLIENT", b"ID"), 1)
        return int(got)

    try:
        first = await client_id()
        assert await client_id() == first  # the same connection again
        await client.client_kill_filter(_id=first)  # the server closes it while idle
        await asyncio.sleep(0.05)
        second = await client_id()
        assert second != first
        await wire.pool.update_active_connections_for_reconnect()  # what a failover does
        third = await client_id()
        assert third != second
        assert len(wire._idle) == 1
        await wire.drop_idle()
        assert wire._idle == [] and not wire.pool._in_use_connections
        assert await client_id() not in (first, second, third)
    finally:
        await wire.aclose()
        await client.aclose()


async def test_cancelled_mid_reply_leaves_no_unread_replies(raw: Any, redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    wire = Wire.like(client, timeout=5)
    try:
        # cancelled while the server holds a BLOCK: its reply must not reach the next caller
        blocked = asyncio.create_task(wire.execute(pack(b"BLPOP", "wire-test-never", 1), 1, wait=1))
        await asyncio.sleep(0.1)
        blocked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocked
        for _ in range(3):
            assert await wire.execute(pack(b"ECHO", b"mine"), 1) == [b"mine"]
        replies = await wire.execute(
            pack(b"ECHO", b"a") + pack(b"NOSUCHCMD") + pack(b"ECHO", b"b"), 3
        )
        assert replies[0] == b"a" and replies[2] == b"b"
        assert isinstance(replies[1], rex.ResponseError)
    finally:
        await wire.aclose()
        await client.aclose()


def _shadowed(wire: Wire) -> list[str]:
    """StreamReader methods still shadowed by a fast exchange on any pooled connection."""
    conns = [*wire.pool._available_connections, *wire.pool._in_use_connections]
    names = ("feed_data", "feed_eof", "set_exception")
    return [n for c in conns if c._reader is not None for n in names if n in c._reader.__dict__]


@pytest.mark.parametrize("protocol", [2, 3])
async def test_replies_are_parsed_as_they_arrive_and_the_stream_is_given_back(
    redis_url: str, protocol: int
) -> None:
    """On hiredis the replies are parsed in the transport's callback: ``done`` runs there (no
    task), after ``early``, before the caller resumes; the stream gets its methods back after
    every exchange, whether it ended well, with a server error, a cancel or a killed link."""
    url = f"{redis_url}{'&' if '?' in redis_url else '?'}protocol={protocol}"
    client = aioredis.Redis.from_url(url)
    wire = Wire.like(client, timeout=5)
    killer = aioredis.Redis.from_url(redis_url)
    try:
        calls: list[tuple[str, list[Any], asyncio.Task[Any] | None]] = []
        replies = await wire.execute(
            pack(b"ECHO", b"a") + pack(b"NOSUCHCMD") + pack(b"ECHO", b"b"),
            3,
            early=(1, lambda out: calls.append(("early", list(out), asyncio.current_task()))),
            done=lambda out: calls.append(("done", list(out), asyncio.current_task())),
        )
        assert replies[0] == b"a" and replies[2] == b"b"
        assert isinstance(replies[1], rex.ResponseError)
        assert [(k, o[0], t) for k, o, t in calls] == [("early", b"a", None), ("done", b"a", None)]
        assert calls[1][1] == replies
        assert _shadowed(wire) == []

        # cancelled while the server holds the reply: given back, the connection discarded
        blocked = asyncio.create_task(wire.execute(pack(b"BLPOP", "wire-fast-never", 5), 1, wait=5))
        await asyncio.sleep(0.1)
        blocked.cancel()
        with pytest.raises(asyncio.CancelledError):
            await blocked
        assert _shadowed(wire) == []
        assert await wire.execute(pack(b"ECHO", b"mine"), 1) == [b"mine"]

        # the server closes the link mid-exchange: a ConnectionError, then a fresh connection
        blocked = asyncio.create_task(wire.execute(pack(b"BLPOP", "wire-fast-never", 5), 1, wait=5))
        await asyncio.sleep(0.1)
        held = [c["id"] for c in await killer.client_list() if c.get("cmd") == "blpop"]
        assert len(held) == 1, held
        await killer.client_kill_filter(_id=held[0])
        with pytest.raises(rex.ConnectionError):
            await asyncio.wait_for(blocked, 10)
        assert _shadowed(wire) == []
        assert await wire.execute(pack(b"ECHO", b"again"), 1) == [b"again"]
    finally:
        await wire.aclose()
        await client.aclose()
        await killer.aclose()


async def test_a_health_check_due_before_an_exchange_reads_its_own_reply(redis_url: str) -> None:
    """``health_check_interval`` (a URL option): redis-py PINGs a connection idle that long
    before it sends; that PONG must not be taken for the exchange's reply."""
    client = aioredis.Redis.from_url(redis_url, health_check_interval=0.01)
    wire = Wire.like(client, timeout=5)
    try:
        for i in range(5):
            await asyncio.sleep(0.03)  # idle longer than the interval: a check is due
            word = b"w%d" % i
            assert await wire.execute(pack(b"ECHO", word), 1) == [word]
    finally:
        await wire.aclose()
        await client.aclose()


async def test_without_hiredis_replies_are_read_by_the_task_and_done_is_not_called(
    redis_url: str,
) -> None:
    from redis._parsers import _AsyncRESP2Parser

    client = aioredis.Redis.from_url(redis_url, parser_class=_AsyncRESP2Parser)
    wire = Wire.like(client, timeout=5)
    try:
        done: list[Any] = []
        assert await wire.execute(pack(b"ECHO", b"a"), 1, done=done.append) == [b"a"]
        assert done == []
    finally:
        await wire.aclose()
        await client.aclose()


@pytest.mark.parametrize("limit", [1, 3])
async def test_publish_pipelines_in_flight_are_bounded(
    redis_url: str, namespace: str, limit: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_flight = peak = 0
    original = Wire.execute

    async def counting(self: Wire, payload: bytes, replies: int, **kw: Any) -> list[Any]:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await asyncio.sleep(0.002)  # a slower server: batches overlap
            return await original(self, payload, replies, **kw)
        finally:
            in_flight -= 1

    monkeypatch.setattr(Wire, "execute", counting)
    async with broker.connect(redis_url, namespace=namespace, max_pipelines=limit) as b:
        ch = b.channel("pipes")

        async def one(k: int) -> list[str]:
            return [await ch.publish({"k": k, "i": i}) for i in range(50)]

        per_task = await asyncio.gather(*(one(k) for k in range(40)))
        ids = [i for ids in per_task for i in ids]
        assert len(set(ids)) == 2000
        assert (await b.redis.xlen(ch.key)) == 2000
        for ids in per_task:  # one task's publishes keep their order
            assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    # direct sends (when nothing was queued) count against the same limit
    assert 1 <= peak <= limit
    if limit > 1:
        assert peak > 1
