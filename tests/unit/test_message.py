"""Messages as the hot path builds them: no headers or fields dict until asked for, the reply's
entries freed as they are decoded, the same outcome as the general decoder."""

from __future__ import annotations

import collections

import msgpack

import broker
from broker._codec import get_codec
from broker._decode import decode_entry, decode_new
from broker._stream import Stream


def _stream() -> Stream:
    return Stream("orders", "ns:{orders}", "ns:{orders}:dead", get_codec("msgpack"), 1 << 20)


def test_new_entries_are_decoded_in_order_and_the_reply_is_emptied() -> None:
    payloads = [msgpack.packb({"i": i}) for i in range(5)]
    entries = [[f"1-{i}".encode(), [b"d", p]] for i, p in enumerate(payloads)]
    entries.append([b"1-5", [b"d", b"\xc1"]])  # undecodable: handed back, not out
    entries.append([b"1-6", None])  # deleted before it was read
    out: list[broker.Message] = []
    bad = decode_new(_stream(), entries, None, out)
    assert entries == []  # each entry's lists were let go as it was decoded
    assert [m.id for m in out] == [f"1-{i}" for i in range(5)]
    assert [m.data for m in out] == [{"i": i} for i in range(5)]
    assert [m.id for m in bad] == ["1-5", "1-6"]
    assert bad[0].error is not None and bad[1].error is None
    for m, p in zip(out, payloads, strict=True):
        # the same message as the general decoder's
        general = decode_entry(_stream(), m.id, [b"d", p])
        assert (m.channel, m.data, m.headers, m.fields) == (
            general.channel,
            general.data,
            general.headers,
            general.fields,
        )


def test_headers_and_fields_are_made_when_first_read_and_then_kept() -> None:
    out: list[broker.Message] = []
    payload = msgpack.packb("x")
    decode_new(_stream(), [[b"1-0", [b"d", payload]]], None, out)
    (msg,) = out
    assert msg._headers is None and msg._fields == payload  # nothing allocated yet
    assert msg._header("reply-to") is None and msg._headers is None
    assert msg.fields == {b"d": payload}
    assert msg.fields is msg.fields  # made once
    msg.headers["k"] = "v"  # a dict of its own, kept
    assert msg.headers == {"k": "v"} and msg._header("k") == "v"
    assert "headers={'k': 'v'}" in repr(msg)


def test_the_constructor_takes_what_it_took_before() -> None:
    msg = broker.Message("1-0", "c", {"a": 1}, {"h": "1"}, 2, False, None, {b"d": b"x"}, None)
    assert (msg.id, msg.channel, msg.data, msg.headers, msg.deliveries) == (
        "1-0",
        "c",
        {"a": 1},
        {"h": "1"},
        2,
    )
    assert msg.fields == {b"d": b"x"} and not msg.foreign and msg.error is None
    bare = broker.Message("1-1", "c", None, {})
    assert bare.headers == {} and bare.fields == {} and bare.deliveries == 1


def test_fields_given_as_a_dict_subclass_are_kept_as_given() -> None:
    fields = collections.OrderedDict([(b"d", b"x"), (b"h", b"y")])
    assert broker.Message("1-0", "c", None, {}, fields=fields).fields is fields
