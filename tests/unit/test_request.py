"""The pure parts of request/reply: reply addresses, error names, XREAD replies, the errors."""

from __future__ import annotations

import pytest

import broker
from broker._message import Message
from broker._names import channel_from_key, inbox_key
from broker._request import REPLY_ID, REPLY_TO, _entries, error_type, reply_address

INBOX = inbox_key("ns", "ab" * 16)


def _msg(headers: dict[str, str]) -> Message[int]:
    return Message("1-0", "c", 1, headers)


def test_inbox_key_is_never_a_channel() -> None:
    assert INBOX == "ns:{reply~" + "ab" * 16 + "}"
    assert channel_from_key("ns", INBOX) is None
    with pytest.raises(broker.ConfigurationError):
        broker.Broker(broker.Settings()).channel("reply~" + "ab" * 16)


def test_reply_address_only_for_inbox_keys() -> None:
    assert reply_address(_msg({REPLY_TO: INBOX, REPLY_ID: "7"})) == (INBOX, "7")
    assert _msg({REPLY_TO: INBOX, REPLY_ID: "7"}).is_request
    for headers in (
        {},
        {REPLY_TO: INBOX},  # no correlation id
        {REPLY_TO: "ns:{orders}", REPLY_ID: "1"},  # a channel, not an inbox
        {REPLY_TO: INBOX + "x", REPLY_ID: "1"},
        {REPLY_TO: "ns:{reply~" + "AB" * 16 + "}", REPLY_ID: "1"},
    ):
        assert reply_address(_msg(headers)) is None, headers
        assert not _msg(headers).is_request
        assert _msg(headers).reply_to is None, headers  # never an address it won't answer
    assert _msg({REPLY_TO: INBOX, REPLY_ID: "7"}).reply_to == INBOX


class Custom(Exception):
    pass


def test_error_type_names() -> None:
    assert error_type(ValueError("x")) == "ValueError"
    assert error_type(Custom()) == f"{__name__}.Custom"


def test_xread_replies_resp2_and_resp3() -> None:
    entries = [[b"1-0", [b"c", b"1", b"d", b"\x01"]], [b"2-0", None]]
    assert _entries([[b"k", entries]]) == [("1-0", [b"c", b"1", b"d", b"\x01"])]
    assert _entries({b"k": entries}) == [("1-0", [b"c", b"1", b"d", b"\x01"])]
    assert _entries(None) == []


def test_errors() -> None:
    timeout = broker.RequestTimeoutError("c", 1.5, "3")
    assert isinstance(timeout, TimeoutError) and isinstance(timeout, broker.BrokerError)
    assert "within 1.5s" in str(timeout) and timeout.correlation_id == "3"
    remote = broker.RemoteError("ValueError", "bad")
    assert (remote.type, remote.text) == ("ValueError", "bad")
    assert str(remote) == "the responder raised ValueError: bad"


def test_reply_ttl_setting() -> None:
    assert broker.Settings().reply_ttl == 60.0
    with pytest.raises(broker.ConfigurationError, match="reply_ttl"):
        broker.Settings(reply_ttl=0)
