"""Replies as the wire reads them (``broker/_wire.py``): arbitrary bytes from a server, valid RESP2
and RESP3 values, truncated, corrupted or random, written in arbitrary pieces, the connection
then closed or left silent.

What is allowed: ``Wire.execute`` returns the values, or raises a redis-py error (which every
caller maps to a ``BrokerError`` at its one boundary); and whatever happened, the next exchange
on the wire gets its own reply (no connection goes back to the pool with bytes of the previous
one unread). Run with hiredis (the default, the ``redis[hiredis]`` dependency) and with
redis-py's Python parsers (where hiredis is missing), on RESP2 and RESP3.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions as rex
from hypothesis import strategies as st
from redis._parsers import _AsyncHiredisParser, _AsyncRESP2Parser, _AsyncRESP3Parser

from broker._wire import Wire, pack
from tests.fuzz.conftest import BUDGET, Examples, run_for
from tests.helpers.resp_server import Answer, RespServer

# -- RESP values, as a server writes them ------------------------------------------------------

simple = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=20).map(
    lambda s: s.encode()
)


def _bulk(b: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(b), b)


leaves = st.one_of(
    simple.map(lambda s: b"+" + s + b"\r\n"),
    simple.map(lambda s: b"-ERR " + s + b"\r\n"),
    st.integers(-(2**70), 2**70).map(lambda n: b":%d\r\n" % n),
    st.binary(max_size=40).map(_bulk),
    st.just(b"$-1\r\n"),
    st.just(b"*-1\r\n"),
    # RESP3
    st.just(b"_\r\n"),
    st.sampled_from([b"#t\r\n", b"#f\r\n"]),
    st.floats(allow_nan=True).map(lambda f: b",%b\r\n" % repr(f).encode()),
    st.sampled_from([b",inf\r\n", b",-inf\r\n", b",nan\r\n"]),
    st.integers(-(10**40), 10**40).map(lambda n: b"(%d\r\n" % n),
    st.binary(max_size=20).map(lambda b: b"=%d\r\ntxt:%b\r\n" % (len(b) + 4, b)),
    simple.map(lambda s: b"!%d\r\n%b\r\n" % (len(s), s)),
)


def _aggregate(kind: bytes, items: list[bytes], pairs: bool = False) -> bytes:
    n = len(items) // 2 if pairs else len(items)
    return b"%b%d\r\n" % (kind, n) + b"".join(items[: 2 * n] if pairs else items)


values = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5).map(lambda xs: _aggregate(b"*", xs)),
        st.lists(inner, max_size=5).map(lambda xs: _aggregate(b"~", xs)),
        st.lists(inner, max_size=6).map(lambda xs: _aggregate(b"%", xs, pairs=True)),
        st.lists(inner, max_size=4).map(lambda xs: _aggregate(b"|", xs, pairs=True)),
    ),
    max_leaves=20,
)


def _mutate(data: bytes, how: tuple[str, int, bytes]) -> bytes:
    kind, at, junk = how
    at = at % (len(data) + 1)
    if kind == "truncate":
        return data[:at]
    if kind == "flip" and data:
        i = at % len(data)
        return data[:i] + bytes([data[i] ^ (1 + junk[0] % 255 if junk else 1)]) + data[i + 1 :]
    if kind == "insert":
        return data[:at] + junk + data[at:]
    if kind == "random":
        return junk
    return data


mutations = st.tuples(
    st.sampled_from(["none", "none", "truncate", "flip", "insert", "random"]),
    st.integers(0, 10_000),
    st.binary(min_size=1, max_size=30),
)


def _pieces(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


# -- the target ----------------------------------------------------------------------------------

PARSERS = {
    (2, "hiredis"): _AsyncHiredisParser,
    (3, "hiredis"): _AsyncHiredisParser,
    (2, "python"): _AsyncRESP2Parser,
    (3, "python"): _AsyncRESP3Parser,
}


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


class Target:
    """A wire on a :class:`RespServer`, for one protocol and parser."""

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: int, parser: type) -> None:
        self.loop = loop
        self.server = RespServer()
        loop.run_until_complete(self.server.__aenter__())
        self.client = aioredis.Redis.from_url(
            self.server.url, protocol=protocol, parser_class=parser
        )
        self.wire = Wire.like(self.client, timeout=5.0)

    def close(self) -> None:
        self.loop.run_until_complete(self.wire.aclose())
        self.loop.run_until_complete(self.client.aclose())
        self.loop.run_until_complete(self.server.__aexit__(None, None, None))

    def exchange(self, answer: Answer, limit: float) -> tuple[str, Any]:
        self.server.script.append(answer)
        payload = pack(b"XREADGROUP", b"GROUP", b"g", b"c", b"STREAMS", b"k", b">")
        try:
            [value] = self.loop.run_until_complete(self.wire.execute(payload, 1, limit=limit))
        except rex.RedisError as exc:  # mapped to BrokerError by every caller
            return "error", exc
        finally:
            self.server.script.clear()
        return "value", value

    def ping(self) -> Any:
        """PING's reply; a pooled connection the server closed fails once, as a caller (which
        retries) would see it, but nothing else may come back."""
        for attempt in (1, 2):
            try:
                return self.loop.run_until_complete(self.wire.execute(pack(b"PING"), 1, limit=2.0))[
                    0
                ]
            except rex.ConnectionError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


@pytest.mark.parametrize(("protocol", "parser"), list(PARSERS))
def test_fuzz_wire_replies(loop: asyncio.AbstractEventLoop, protocol: int, parser: str) -> None:
    examples = Examples(f"wire replies RESP{protocol} {parser}")
    target = Target(loop, protocol, PARSERS[protocol, parser])

    def body(reply: bytes, how: tuple[str, int, bytes], cuts: list[int], close: bool) -> None:
        examples.hit()
        data = _mutate(reply, how)
        # a reply the server leaves unfinished on an open connection costs the whole limit
        limit = 0.05
        kind, value = target.exchange(Answer(_pieces(data, cuts), close=close), limit)
        if kind == "value" and how[0] == "none":
            _check_value(value)
        # the next exchange gets its own reply: nothing of this one was left on the connection
        assert target.ping() in (b"PONG", "PONG"), (data, kind, value)

    try:
        run_for(
            examples,
            body,
            values,
            mutations,
            st.lists(st.integers(0, 10_000), max_size=6),
            st.booleans(),
            budget=BUDGET / 4,
        )
    finally:
        target.close()


def _check_value(value: Any) -> None:
    """A valid reply comes back as plain values (or a server error as a value)."""
    if isinstance(value, list | tuple | set):
        for v in value:
            _check_value(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_value(k)
            _check_value(v)
    else:
        assert value is None or isinstance(value, bytes | str | int | float | rex.ResponseError)
        if isinstance(value, float):
            assert math.isnan(value) or isinstance(value, float)


# -- what the fuzzer found, as regular tests ----------------------------------------------------


@pytest.mark.parametrize(("protocol", "parser"), list(PARSERS))
def test_a_reply_the_parser_cannot_build_is_a_redis_error(
    loop: asyncio.AbstractEventLoop, protocol: int, parser: str
) -> None:
    """A RESP3 map whose key is an array: hiredis raised TypeError (unhashable type: 'list')
    out of Wire.execute, past every caller's mapping to BrokerError."""
    target = Target(loop, protocol, PARSERS[protocol, parser])
    try:
        kind, value = target.exchange(Answer([b"%1\r\n*0\r\n*0\r\n"]), 1.0)
        assert kind == "error" or isinstance(value, dict), (kind, value)
        if kind == "error":
            assert isinstance(value, rex.RedisError), value
        assert target.ping() in (b"PONG", "PONG")
    finally:
        target.close()


@pytest.mark.parametrize(("protocol", "parser"), list(PARSERS))
@pytest.mark.parametrize("trailing", [b"\x00", b"+STALE\r\n", b":1\r\n"])
def test_bytes_after_a_reply_are_never_read_as_the_next_reply(
    loop: asyncio.AbstractEventLoop, protocol: int, parser: str, trailing: bytes
) -> None:
    """On RESP3 redis-py's pool does not check a connection for unread bytes (it awaits push
    notifications there): bytes a server sent after a reply were read as the reply of the
    next command on that connection (an error for an innocent command, or a wrong value)."""
    target = Target(loop, protocol, PARSERS[protocol, parser])
    try:
        for pieces in ([b"+OK\r\n" + trailing], [b"+OK\r\n", trailing]):
            kind, value = target.exchange(Answer(pieces), 1.0)
            assert (kind, value) in (("value", b"OK"), ("value", "OK")), (kind, value)
            loop.run_until_complete(asyncio.sleep(0.01))  # the stray bytes have arrived
            assert target.ping() in (b"PONG", "PONG")
    finally:
        target.close()
