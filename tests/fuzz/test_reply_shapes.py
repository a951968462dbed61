"""The reply shapes the library reads, against a real server whose answers to ``XREADGROUP`` (a
subscription's replay and new reads) and ``XADD`` (a publish) are replaced by arbitrary values,
as a RESP2 or RESP3 parser would build them: lists, maps, bytes, integers, nils, errors.

The documented outcomes only: a subscription hands out messages (the real ones, or what the
reply claimed, decoded, foreign or dead-lettered) or raises a ``BrokerError``; it never hangs,
and leaves no task behind. A publish returns an entry id (a ``str``) or raises a
``BrokerError``. Redis itself sends none of these shapes; a proxy, a "compatible" server or a
bug between them could.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis.exceptions as rex
from hypothesis import strategies as st

import broker
from tests.fuzz.conftest import BUDGET, Examples, run_for

#: stands for the channel's own key in a generated reply (each example has its own channel)
KEY = object()
ID = re.compile(r"\d+-\d+")

ids = st.one_of(
    st.builds(lambda a, b: b"%d-%d" % (a, b), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
    st.sampled_from([b"0-0", b"1-1", b"18446744073709551615-18446744073709551615"]),
    st.binary(max_size=12),
    st.sampled_from([None, 7, "1-1", b"\xff\xfe"]),
)
field_values = st.one_of(
    st.binary(max_size=20),
    st.sampled_from([b"\x81\xa1a\x01", b"\xc1", b"\xa3abc", b"", None, 3, [b"x"]]),
)
fields = st.one_of(
    st.lists(st.one_of(st.sampled_from([b"d", b"h", b"x"]), field_values), max_size=6),
    st.dictionaries(st.sampled_from([b"d", b"h", b"x", 1, None]), field_values, max_size=3),
    st.sampled_from([None, [], 5, b"d"]),
)
entry = st.one_of(
    st.tuples(ids, fields).map(list),
    st.sampled_from([None, [], [b"1-1"], [b"1-1", None, None], 4, b"1-1"]),
)
entries = st.one_of(st.lists(entry, max_size=4), st.sampled_from([None, 3, b"x", [[]]]))
keys = st.one_of(st.just(KEY), st.sampled_from([b"other", None, 1, [KEY]]))
read_replies = st.one_of(
    st.lists(st.tuples(keys, entries).map(list), max_size=3),
    st.dictionaries(keys.filter(lambda k: not isinstance(k, list)), entries, max_size=2),
    st.sampled_from(
        [
            None,
            [],
            {},
            0,
            b"OK",
            [[KEY]],
            [KEY],
            rex.ResponseError("NOGROUP No such key or consumer group"),
            rex.ResponseError("WRONGTYPE Operation against a key holding the wrong kind"),
            rex.ResponseError("ERR something else"),
        ]
    ),
)
add_replies = st.one_of(
    ids, st.sampled_from([None, 1, [], {}, rex.ResponseError("ERR nope"), rex.ResponseError("OOM")])
)


def _with_key(value: Any, key: bytes) -> Any:
    if value is KEY:
        return key
    if isinstance(value, list):
        return [_with_key(v, key) for v in value]
    if isinstance(value, dict):
        return {_with_key(k, key): _with_key(v, key) for k, v in value.items()}
    return value


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


class Fuzzed:
    """A broker whose wire answers the next XREADGROUPs / XADDs from a script."""

    def __init__(self, b: broker.Broker) -> None:
        self.b = b
        self.reads: list[Any] = []
        self.adds: list[Any] = []
        self._real = b.wire.execute

    async def execute(self, payload: bytes, replies: int, **kw: Any) -> list[Any]:
        await asyncio.sleep(0)  # a real exchange yields; a scripted one must too
        if self.reads and b"XREADGROUP" in payload[:40]:
            return [self.reads.pop(0)]
        if self.adds and b"XADD" in payload[:20]:
            out = await self._real(payload, replies, **kw)  # really appended, then misreported
            return [self.adds.pop(0), *out[1:]]
        return await self._real(payload, replies, **kw)

    def __enter__(self) -> Fuzzed:
        self.b.wire.execute = self.execute  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.b.wire.execute


def _tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


async def _subscribe_once(b: broker.Broker, fuzzed: Fuzzed, script: list[Any]) -> str:
    ch = b.channel(f"fz-{uuid.uuid4().hex[:10]}")
    sent = await ch.publish_many([{"n": 1}, {"n": 2}])
    fuzzed.reads = [_with_key(r, ch.key.encode()) for r in script]
    before = _tasks()
    got: list[str] = []
    outcome = "messages"
    try:
        async with asyncio.timeout(8):
            try:
                async with ch.subscribe(
                    group="g", consumer="c", start="all", prefetch=4, block=0.05
                ) as messages:
                    async for msg in messages:
                        assert isinstance(msg, broker.Message), msg
                        assert isinstance(msg.id, str) and ID.fullmatch(msg.id), msg.id
                        assert msg.channel == ch.name and msg.deliveries >= 1
                        got.append(msg.id)
                        msg.ack()
                        if set(sent) <= set(got):
                            break
            except broker.BrokerError:
                outcome = "error"
    except TimeoutError:
        raise AssertionError(f"hung: {got} after {script!r}") from None
    finally:
        await b.call(lambda: b.redis.delete(ch.key, ch.dead_key))
    await asyncio.sleep(0)
    left = _tasks() - before
    assert not left, f"tasks left behind: {left}"
    return outcome


def test_fuzz_subscription_read_replies(loop: asyncio.AbstractEventLoop, redis_url: str) -> None:
    examples = Examples("subscription read replies")
    b = broker.connect(redis_url, namespace=f"fz{uuid.uuid4().hex[:6]}", reconnect_deadline=5)
    loop.run_until_complete(b.__aenter__())
    fuzzed = Fuzzed(b)

    def body(script: list[Any]) -> None:
        examples.hit()
        with fuzzed:
            loop.run_until_complete(_subscribe_once(b, fuzzed, script))

    try:
        run_for(examples, body, st.lists(read_replies, min_size=1, max_size=3), budget=BUDGET / 2)
    finally:
        loop.run_until_complete(b.__aexit__(None, None, None))


def test_fuzz_publish_replies(loop: asyncio.AbstractEventLoop, redis_url: str) -> None:
    examples = Examples("publish replies")
    b = broker.connect(redis_url, namespace=f"fz{uuid.uuid4().hex[:6]}", reconnect_deadline=5)
    loop.run_until_complete(b.__aenter__())
    fuzzed = Fuzzed(b)

    async def publish(reply: Any, many: bool) -> None:
        fuzzed.adds = [reply]
        ch = b.channel(f"fz-{uuid.uuid4().hex[:10]}")
        try:
            async with asyncio.timeout(8):
                try:
                    if many:
                        got = await ch.publish_many([1, 2])
                    else:
                        got = [await ch.publish(1)]
                except broker.BrokerError:
                    return
        finally:
            fuzzed.adds = []
            await b.call(lambda: b.redis.delete(ch.key))
        assert all(isinstance(i, str) and ID.fullmatch(i) for i in got), got

    def body(reply: Any, many: bool) -> None:
        examples.hit()
        with fuzzed:
            loop.run_until_complete(publish(reply, many))

    try:
        run_for(examples, body, add_replies, st.booleans(), budget=BUDGET / 4)
    finally:
        loop.run_until_complete(b.__aexit__(None, None, None))


# -- what the fuzzer found, as regular tests ----------------------------------------------------


@pytest.mark.parametrize("reply", [None, b"\x80", b"", 7, b"OK"])
async def test_an_xadd_reply_that_is_not_an_id_is_a_redis_command_error(
    client: broker.Broker, name: str, reply: Any
) -> None:
    """publish() raised AttributeError (None, 7), UnicodeDecodeError (b"\\x80") or returned a
    bogus id ("", "OK") as if the entry were known."""
    with Fuzzed(client) as fuzzed:
        for many in (False, True):
            fuzzed.adds = [reply]
            with pytest.raises(broker.RedisCommandError, match="unexpected reply to XADD"):
                if many:
                    await client.channel(name).publish_many([1])
                else:
                    await client.channel(name).publish(1)
