"""RESP packing (``broker/_wire.py``, the publisher's XADD) against arbitrary arguments: what a
RESP reader (hiredis, as the server parses it) reads back is exactly the arguments, whatever
the split points of the stream, and the bytes equal redis-py's own packing."""

from __future__ import annotations

import itertools
from typing import Any

import hiredis
from hypothesis import strategies as st
from redis.asyncio.connection import Connection

from broker._publisher import XAdd, pack_xadd
from broker._wire import bulk, pack, pack_strs
from tests.fuzz.conftest import BUDGET, Examples, run_for

args = st.lists(
    st.one_of(
        st.binary(max_size=300),
        st.text(max_size=100),  # no lone surrogates: names that reach pack() are ASCII
        st.integers(min_value=-(2**63), max_value=2**64),
        st.sampled_from([b"", b"\r\n", b"$-1\r\n", b"*1\r\n", b"\x00", "\r\n", "é"]),
    ),
    min_size=1,
    max_size=12,
)


def expected(arg: bytes | str | int) -> bytes:
    if isinstance(arg, bytes):
        return arg
    return arg.encode() if isinstance(arg, str) else str(arg).encode()


def read_back(stream: bytes, cuts: list[int]) -> list[Any]:
    """Every complete value in ``stream``, fed to a reader in pieces cut at ``cuts``."""
    reader = hiredis.Reader()
    out = []
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for a, b in itertools.pairwise(points):
        reader.feed(stream[a:b])
        while (value := reader.gets()) is not False:
            out.append(value)
    assert reader.gets() is False, "a partial value left over"
    return out


cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=8)


def test_fuzz_pack() -> None:
    examples = Examples("resp pack")
    redis_py = Connection()

    def body(commands: list[list[Any]], cut: list[int]) -> None:
        examples.hit()
        stream = b"".join(pack(*c) for c in commands)
        assert read_back(stream, cut) == [[expected(a) for a in c] for c in commands]
        for c in commands:
            # redis-py splits its first argument on whitespace (for "CONFIG GET"): ours is
            # always a command name
            assert pack(b"XADD", *c) == b"".join(redis_py.pack_command(b"XADD", *c)), c
        values = [expected(a) for a in commands[0]]
        assert read_back(b"".join(map(bulk, values)), cut) == values

    run_for(examples, body, st.lists(args, min_size=1, max_size=4), cuts, budget=BUDGET / 2)


entry_ids = st.builds(
    lambda ms, seq: f"{ms}-{seq}",
    st.integers(min_value=0, max_value=2**64 - 1),
    st.integers(min_value=0, max_value=2**64 - 1),
)


def test_fuzz_pack_strs_and_xadd() -> None:
    examples = Examples("resp xadd")

    def body(ids: list[str], item: XAdd, cut: list[int]) -> None:
        examples.hit()
        head = b"*%d\r\n" % (len(ids) + 1) + bulk(b"XACK")
        [acked] = read_back(head + pack_strs(ids), cut)
        assert acked == [b"XACK", *(i.encode() for i in ids)]
        argv = [b"XADD", item.key.encode()]
        if item.maxlen is not None:
            argv += [b"MAXLEN", b"~", str(item.maxlen).encode()]
        elif item.minid is not None:
            argv += [b"MINID", b"~", item.minid.encode()]
        argv += [b"*", b"d", item.payload]
        if item.headers is not None:
            argv += [b"h", item.headers]
        assert read_back(pack_xadd(item) * 2, cut) == [argv, argv]

    channel = st.text(alphabet="abcxyz019_.:/@+=-", min_size=1, max_size=30)
    items = st.builds(
        lambda ch, payload, headers, maxlen, minid: XAdd(
            key=f"broker:{{{ch}}}",
            channel=ch,
            payload=payload,
            headers=headers,
            maxlen=maxlen,
            minid=minid,
        ),
        channel,
        st.binary(max_size=2000),
        st.none() | st.binary(max_size=100),
        st.none() | st.integers(min_value=0, max_value=2**63),
        st.none() | entry_ids,
    )
    run_for(examples, body, st.lists(entry_ids, max_size=50), items, cuts, budget=BUDGET / 2)
