from __future__ import annotations

import msgpack
import pytest

import broker
from broker import ConfigurationError
from broker._codec import get_codec, pack_headers, unpack_headers
from broker._names import channel_from_key, channel_key, check_channel, dead_key


@pytest.mark.parametrize("name", ["orders", "a.b:c/d@e+f=g-h_i", "x" * 200])
def test_valid_channel_names(name: str) -> None:
    assert check_channel(name) == name
    assert channel_from_key("ns", channel_key("ns", name)) == name


@pytest.mark.parametrize("name", ["", "x" * 201, "a{b}", "has space", "tab\t", "ü", 5, None])
def test_invalid_channel_names(name: object) -> None:
    with pytest.raises(ConfigurationError):
        check_channel(name)


def test_key_layout_shares_the_hash_tag() -> None:
    assert channel_key("broker", "orders") == "broker:{orders}"
    assert dead_key("broker", "orders") == "broker:{orders}:dead"


@pytest.mark.parametrize("codec", ["msgpack", "json"])
def test_round_trip(codec: str) -> None:
    c = get_codec(codec)
    value = {"a": [1, 2.5, "x", None, True]}
    assert c.decode(c.encode(value)) == value


def test_msgpack_keeps_bytes_and_rejects_garbage() -> None:
    c = get_codec("msgpack")
    assert c.decode(c.encode(b"\x00\x01")) == b"\x00\x01"
    with pytest.raises(ValueError, match="invalid msgpack"):
        c.decode(b"\xc1")
    with pytest.raises(ValueError):
        c.decode(msgpack.packb([1, 2])[:-1])
    with pytest.raises(TypeError, match="cannot encode object"):
        c.encode(object())


def test_raw_and_json_errors() -> None:
    assert get_codec("raw").encode("é") == "é".encode()
    with pytest.raises(TypeError):
        get_codec("raw").encode(1)
    with pytest.raises(ValueError, match="invalid JSON"):
        get_codec("json").decode(b"{nope")
    with pytest.raises(ConfigurationError, match="unknown codec 'pickle'"):
        get_codec("pickle")


def test_headers() -> None:
    assert pack_headers(None) is None and pack_headers({}) is None
    assert unpack_headers(pack_headers({"k": "v"})) == {"k": "v"}
    with pytest.raises(TypeError):
        pack_headers({"k": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        unpack_headers(msgpack.packb([1]))


def test_channel_options_are_checked_at_the_call() -> None:
    b = broker.connect("redis://localhost:1/0")
    with pytest.raises(ConfigurationError, match="maxlen"):
        b.channel("x", maxlen=0)
    with pytest.raises(ConfigurationError, match="invalid channel name"):
        b.channel("a b")
    with pytest.raises(ConfigurationError, match="prefetch"):
        b.subscribe("x", group="g", prefetch=0)
    with pytest.raises(ConfigurationError, match="start"):
        b.subscribe("x", group="g", start="yesterday")
