"""Positions in a channel from the command line: entry ids, ISO times and relative times.

``1714564800123-0`` or ``1714564800123`` is an entry id (milliseconds since the epoch, then a
sequence number); ``2024-05-01T12:00:00Z`` (or any ISO 8601 time; without a zone it is local
time) and ``-30s``, ``-5m``, ``-2h``, ``-1d``, ``-1w``, ``-1h30m`` (that long ago) are times.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import click

__all__ = ["HINT", "PositionType", "parse_position", "to_id"]

HINT = (
    "give an entry id (1714564800123-0), an ISO time (2024-05-01T12:00:00Z) "
    "or a time ago (-30s, -5m, -2h, -1d)"
)
_ID_RE = re.compile(r"^(\d{1,20})(?:-(\d{1,20}))?$")
_AGO_RE = re.compile(r"^-?(?:\d+(?:\.\d+)?(?:ms|s|m|h|d|w))+$")
_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_MAX = 2**64 - 1


def parse_position(text: str, now: datetime | None = None) -> str | datetime:
    """An entry id (``"ms-seq"``) or an aware datetime.

    :raises ValueError: with :data:`HINT` when ``text`` is neither.
    """
    text = text.strip()
    m = _ID_RE.match(text)
    if m:
        ms, seq = int(m[1]), int(m[2] or 0)
        if ms > _MAX or seq > _MAX:
            raise ValueError(f"entry id {text!r} is out of range; {HINT}")
        return f"{ms}-{seq}"
    if _AGO_RE.match(text):
        seconds = sum(float(n) * _UNIT[u] for n, u in _PART_RE.findall(text))
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an entry id or a time; {HINT}") from None
    return when if when.tzinfo is not None else when.astimezone()


def to_id(position: str | datetime) -> str:
    """The entry id of a position: a datetime becomes the first id of its millisecond."""
    if isinstance(position, str):
        return position
    return f"{max(0, int(position.timestamp() * 1000))}-0"


class PositionType(click.ParamType[str, Any]):
    """A click type for ``--from``/``--until``/``--start``: converts to an entry id.

    ``keywords`` (e.g. ``new``, ``all``) pass through unchanged.
    """

    name = "ID|TIME"

    def __init__(self, keywords: Iterable[str] = ()) -> None:
        self.keywords = tuple(keywords)
        if self.keywords:
            self.name = "|".join((*self.keywords, "ID", "TIME"))

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        if text in self.keywords:
            return text
        try:
            return to_id(parse_position(text))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
