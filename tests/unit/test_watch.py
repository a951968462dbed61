"""Watched values without a server: the reader's newest-wins state, names, options, errors."""

from __future__ import annotations

import pytest

import broker
from broker import ConfigurationError, VersionConflictError
from broker._watch import Watch, WatchSubscription, version_key, watch_key


def reader() -> WatchSubscription[object]:
    b = broker.connect("redis://localhost:1/0", namespace="ns")  # never entered
    return b.watch("cfg").subscribe()


def test_keys_share_the_names_slot_and_stay_apart_from_channels() -> None:
    assert watch_key("ns", "cfg") == "ns:watch:{cfg}"
    assert version_key("ns", "cfg") == "ns:watch:{cfg}:version"
    b = broker.connect("redis://localhost:1/0", namespace="ns")
    w = b.watch("cfg", codec="json")
    assert isinstance(w, Watch) and w.key == "ns:watch:{cfg}" and w.codec.name == "json"


@pytest.mark.parametrize("name", ["", "a b", "{x}", "x" * 201, 3])
def test_bad_names(name: object) -> None:
    b = broker.connect("redis://localhost:1/0")
    with pytest.raises(ConfigurationError, match="watch name"):
        b.watch(name)  # type: ignore[arg-type]


async def test_bad_options_fail_before_anything_is_sent() -> None:
    w = broker.connect("redis://localhost:1/0").watch("cfg")
    for kwargs, words in [
        ({"if_version": -1}, "if_version must be an int >= 0"),
        ({"if_version": True}, "if_version must be an int"),
        ({"if_version": 1.5}, "if_version must be an int"),
        ({"ttl": 0}, "ttl must be a number of seconds > 0, got 0"),
        ({"ttl": -1.0}, "ttl must be"),
        ({"ttl": float("nan")}, "ttl must be"),
    ]:
        with pytest.raises(ConfigurationError, match=words):
            await w.set(1, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="if_version"):
        await w.delete(if_version=-3)


def test_conflict_error() -> None:
    exc = VersionConflictError("leader", expected=0, current=4)
    assert isinstance(exc, broker.BrokerError)
    assert (exc.name, exc.expected, exc.current) == ("leader", 0, 4)
    assert str(exc).startswith("watch 'leader': expected version 0, found version 4;")
    assert "found no value" in str(VersionConflictError("x", expected=2, current=0))


def test_the_newest_announced_value_wins_and_nothing_goes_back() -> None:
    r = reader()
    r._on_message(b"3:1:c")
    r._on_message(b"2:1:b")  # late and older: ignored
    r._on_message(b"5:1:e")
    assert r._pending == (5, b"e")
    r._on_message(b"4:1:d")
    assert r._pending == (5, b"e"), "at most one held, the newest"
    r._last = 5  # as if yielded
    r._pending = None
    r._on_message(b"5:1:e")
    r._on_message(b"1:1:a")
    assert r._pending is None
    assert r.statistics().messages == 6


def test_large_values_are_announced_and_deletes_drop_what_they_delete() -> None:
    r = reader()
    r._on_message(b"7:2:")
    assert r._announced == 7 and r._pending is None
    r._on_message(b"7:0:")  # deleted before the reader asked: nothing to read
    assert r._announced == 0
    r._on_message(b"8:1:x:y")  # a value may hold colons
    assert r._pending == (8, b"x:y")
    r._on_message(b"9:0:")
    assert r._pending is None
    r._on_message(b"10:1:z")
    r._on_message(b"9:0:")  # the deletion of an older version leaves the newer value
    assert r._pending == (10, b"z")
    r._on_message(b"garbage")
    assert r._pending == (10, b"z")


async def test_a_reader_must_be_entered() -> None:
    r = reader()
    with pytest.raises(broker.ClosedError, match="enter the subscription first"):
        await anext(r)
    await r.aclose()  # never entered: nothing to release
