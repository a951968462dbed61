"""Position parsing (no server)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from broker.cli._time import parse_position, to_id

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1714564800123-7", "1714564800123-7"),
        ("1714564800123", "1714564800123-0"),
        ("0", "0-0"),
        ("-30s", NOW - timedelta(seconds=30)),
        ("-5m", NOW - timedelta(minutes=5)),
        ("-2h", NOW - timedelta(hours=2)),
        ("-1d", NOW - timedelta(days=1)),
        ("-1w", NOW - timedelta(weeks=1)),
        ("-1h30m", NOW - timedelta(minutes=90)),
        ("5m", NOW - timedelta(minutes=5)),
        ("-1.5s", NOW - timedelta(seconds=1.5)),
        ("2024-05-01T12:00:00Z", NOW),
        ("2024-05-01T14:00:00+02:00", NOW),
        ("2024-05-01 12:00:00.250+00:00", NOW + timedelta(milliseconds=250)),
    ],
)
def test_positions(text, expected):
    assert parse_position(text, now=NOW) == expected


def test_naive_iso_is_local_time():
    got = parse_position("2024-05-01T12:00:00")
    assert isinstance(got, datetime) and got.tzinfo is not None
    assert got.replace(tzinfo=None) == datetime(2024, 5, 1, 12)


@pytest.mark.parametrize(
    "text", ["", "abc", "-5", "-5x", "1-2-3", "2024-13-45", "1e5", "99999999999999999999999"]
)
def test_rejects(text):
    with pytest.raises(ValueError, match="-5m"):
        parse_position(text, now=NOW)


def test_to_id():
    assert to_id("5-1") == "5-1"
    assert to_id(NOW) == "1714564800000-0"
    assert to_id(datetime(1960, 1, 1, tzinfo=UTC)) == "0-0"
