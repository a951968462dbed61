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
        assert len(wire.pool._in_use_connections) == 0
    finally:
        await wire.aclose()
        await client.aclose()
        await proxy.cut()


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
