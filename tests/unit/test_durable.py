"""Durable writes and failover without a server: the WAIT at the end of a batch, what a short
WAIT turns into, which replies mean "reconnect", and Sentinel URLs."""

from __future__ import annotations

import asyncio

import pytest
import redis.exceptions as rex

import broker
from broker._durable import WaitFor, durability
from broker._publisher import Bells, XAdd, _payload, _results, confirm
from broker._settings import parse_endpoint
from broker._topology import routing_error
from broker._wire import pack


def test_wait_is_packed_once_in_milliseconds() -> None:
    w = WaitFor(1, 5.0)
    assert w.command == pack(b"WAIT", 1, 5000)
    assert WaitFor(2, 0.0001).command == pack(b"WAIT", 2, 1)  # never WAIT n 0 (for ever)
    assert WaitFor(1, 5.0) == w and hash(WaitFor(1, 5.0)) == hash(w)  # batches group by it


def test_durability_checks_its_arguments_at_the_call() -> None:
    assert durability(0, 5.0) is None
    assert durability(2, 1) == WaitFor(2, 1.0)
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(broker.ConfigurationError, match="replicas must be"):
            durability(bad, 1.0)  # type: ignore[arg-type]
    with pytest.raises(broker.ConfigurationError, match="replica_timeout"):
        durability(1, 0)


def test_the_wait_comes_last_after_the_bells() -> None:
    items = [XAdd("ns:{a}", "a", b"1"), XAdd("ns:{b}", "b", b"2")]
    bells = Bells(sharded=False)
    payload, count, rung = _payload(items, bells, WaitFor(1, 2.0))
    assert count == 2 + 2 + 1 and rung == ["ns:{a}", "ns:{b}"]
    assert payload.endswith(pack(b"WAIT", 1, 2000))
    assert payload.index(b"PUBLISH") < payload.index(b"WAIT")
    assert _payload(items, bells)[1] == 4  # no WAIT without durability


def test_a_short_wait_turns_ids_into_typed_errors() -> None:
    items = [XAdd("ns:{a}", "a", b"1"), XAdd("ns:{a}", "a", b"2")]
    ok, refused = _results(items, [b"1-0", rex.ResponseError("WRONGTYPE x")])
    assert refused == []
    results = list(ok)
    confirm(WaitFor(1, 0.5), items, results, 1)  # confirmed: unchanged
    assert results[0] == "1-0"
    confirm(WaitFor(2, 0.5), items, results, 1)
    err = results[0]
    assert isinstance(err, broker.ReplicationTimeoutError)
    assert err.message_id == "1-0" and err.channel == "a" and (err.acked, err.replicas) == (1, 2)
    assert "may or may not survive" in str(err) and "1 of 2 replica(s)" in str(err)
    assert isinstance(results[1], broker.WrongTypeError)  # an entry's own error stays
    refused_wait: list[str | BaseException] = ["2-0"]
    confirm(WaitFor(1, 0.5), items[:1], refused_wait, rex.ResponseError("ERR no WAIT here"))
    assert "refused WAIT" in str(refused_wait[0])


def test_entries_turned_away_are_resent_but_a_replica_is_reported() -> None:
    items = [XAdd("ns:{a}", "a", b"1") for _ in range(3)]
    replies = [
        rex.ResponseError("LOADING Redis is loading the dataset in memory"),
        rex.ResponseError("NOREPLICAS Not enough good replicas to write."),
        rex.ResponseError("READONLY You can't write against a read only replica."),
    ]
    _, refused = _results(items, replies)
    assert refused == [0, 1]  # READONLY through a plain URL: the URL names a replica


def test_what_means_reconnect() -> None:
    demoted = rex.ResponseError(
        "UNBLOCKED force unblock from blocking operation, instance state changed "
        "(master -> replica?)"
    )
    assert routing_error(demoted) == "UNBLOCKED"
    assert routing_error(rex.ResponseError("UNBLOCKED the stream key no longer exists")) is None
    assert routing_error(rex.ResponseError("NOREPLICAS Not enough good replicas")) == "NOREPLICAS"
    assert routing_error(rex.ResponseError("ERR something else")) is None


def test_sentinel_urls() -> None:
    e = parse_endpoint("redis+sentinel://app:pw@h1:26379,[::1]:26380/orders/2")
    assert (e.kind, e.service, e.db) == ("sentinel", "orders", 2)
    assert e.hosts == [("h1", 26379), ("::1", 26380)]
    assert e.node_url == "redis://app:pw@h1:26379/0"
    tls = parse_endpoint("rediss+sentinel://h:1/svc?ssl_ca_certs=/ca.pem")
    assert tls.node_url.startswith("rediss://") and "ssl_ca_certs" in tls.node_url
    with pytest.raises(broker.ConfigurationError, match="names its service"):
        parse_endpoint("redis+sentinel://h:26379")
    with pytest.raises(broker.ConfigurationError) as caught:
        parse_endpoint("redis+sentinel://u:secret@h:26379/svc/x")
    assert "secret" not in str(caught.value)


def test_host_lists_with_ipv6_parse_where_urlsplit_refuses_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Debian 12's Python 3.11.2 refused ``h1:26379,[::1]:26380`` as an "Invalid IPv6 URL" (seen
    in the compose ``tests`` service); the host list is split by the library, not by
    ``urlsplit``. Here ``urlsplit`` is made as strict as that release."""
    import urllib.parse

    import broker._settings as settings

    def strict(url: str, *args: object) -> urllib.parse.SplitResult:
        netloc = url.partition("://")[2].split("/")[0]
        if "[" in netloc and "," in netloc:
            raise ValueError("Invalid IPv6 URL")
        return urllib.parse.urlsplit(url)

    monkeypatch.setattr(settings, "urlsplit", strict)
    e = parse_endpoint("redis+sentinel://app:pw@h1:26379,[::1]:26380/orders/2?protocol=3")
    assert (e.kind, e.service, e.db) == ("sentinel", "orders", 2)
    assert e.hosts == [("h1", 26379), ("::1", 26380)]
    assert e.node_url == "redis://app:pw@h1:26379/0?protocol=3"
    c = parse_endpoint("redis+cluster://[::1]:7000,[::1]:7001")
    assert (c.kind, c.hosts) == ("cluster", [("::1", 7000), ("::1", 7001)])


def test_acks_ride_ahead_of_a_read_only_when_plain() -> None:
    """Plain acks ride ahead of a reader's blocking read; durable ones (``WAIT``) go with the
    ack loop. Riders that landed are counted; failed ones and those of a lost read are queued
    again for the ack loop. Each reader (one per node of a cluster) settles its own riders."""
    from broker._codec import get_codec
    from broker._settle import GroupCalls, Settler
    from broker._stream import Stream

    codec = get_codec("msgpack")
    streams = [Stream(c, f"ns:{{{c}}}", f"ns:{{{c}}}:dead", codec, 1 << 20) for c in "ab"]
    calls = GroupCalls(None, "g", streams)  # type: ignore[arg-type]
    durable = Settler(None, calls, "c", streams, 100, WaitFor(1, 0.1))  # type: ignore[arg-type]
    durable.acks["ns:{a}"] = ["1-0"]
    assert durable.take_riders(frozenset({"ns:{a}"})) is None
    assert durable.acks == {"ns:{a}": ["1-0"]}

    s = Settler(None, calls, "c", streams, 100)  # type: ignore[arg-type]
    s.acks = {"ns:{a}": ["1-0", "2-0"], "ns:{b}": ["3-0"]}
    a = s.take_riders(frozenset({"ns:{a}"}))  # only this reader's streams
    assert a is not None and s.rider_commands(a) == [pack(b"XACK", "ns:{a}", "g", "1-0", "2-0")]
    assert s.acks == {"ns:{b}": ["3-0"]} and s.riding_n == 2 and not s.idle()
    assert ("ns:{a}", "1-0") in s.held()  # a replay skips what is being acked
    b = s.take_riders(frozenset({"ns:{b}"}))  # another node's reader, at the same time
    assert b == {"ns:{b}": ["3-0"]} and s.riding_n == 3
    s.riders_back(b)  # b's read was lost before the replies: queued again, the loop woken
    assert s.acks == {"ns:{b}": ["3-0"]} and s.riding_n == 2 and s.wake.is_set()
    s.room = asyncio.Event()  # the subscription's (given to the ack loop)
    s.riders_landed(a, [2])
    assert s.riding_n == 0 and s.per_channel["a"][0] == 2
    assert s.room.is_set(), "acks that landed no longer count against the room: wake readers"
    s.riders_back(a)  # settled already: nothing queued again
    assert s.acks == {"ns:{b}": ["3-0"]}

    b = s.take_riders(frozenset({"ns:{b}"}))
    assert b is not None
    s.wake.clear()
    s.kicked = False
    s.riders_landed(b, [rex.ResponseError("NOGROUP No such key")])
    assert s.acks == {"ns:{b}": ["3-0"]} and s.wake.is_set() and s.per_channel["b"][0] == 0
