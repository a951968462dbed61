"""Output helpers (no server)."""

from __future__ import annotations

import json

import click
import msgpack
import pytest

from broker import Message
from broker.cli._format import check_template, duration, jsonable, message_record, table


def test_jsonable_makes_bytes_explicit():
    value = {b"k": [b"\x00", 1.5, float("nan"), (1, 2)], 3: msgpack.ExtType(1, b"x"), "s": "é"}
    out = jsonable(value)
    assert out == {
        "k": [{"$base64": "AA=="}, 1.5, "nan", [1, 2]],
        "3": {"$ext": 1, "$base64": "eA=="},
        "s": "é",
    }
    json.dumps(out, allow_nan=False)


def test_record_of_an_undecodable_message():
    msg = Message("1714564800123-0", "c", None, {}, error="msgpack: bad", fields={b"d": b"\xc1"})
    assert message_record(msg) == {
        "channel": "c",
        "id": "1714564800123-0",
        "timestamp": "2024-05-01T12:00:00.123Z",
        "headers": {},
        "data": None,
        "error": "msgpack: bad",
        "fields": {"d": {"$base64": "wQ=="}},
    }


def test_template_tokens():
    assert check_template("{channel} {id:>20} {data!r}") == "{channel} {id:>20} {data!r}"
    for bad in ("{nope}", "{}", "{data[0]}", "{channel"):
        with pytest.raises(click.BadParameter):
            check_template(bad)


def test_duration_and_table():
    assert [duration(s) for s in (0.25, 3.21, 312, 7380, 273600)] == [
        "250ms",
        "3.2s",
        "5m12s",
        "2h03m",
        "3d04h",
    ]
    assert table(["A", "BB"], [["xxx", "y"]]) == ["A    BB", "xxx  y"]
