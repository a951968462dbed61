"""Read-only tails: ``XRANGE``/``XREAD`` without a group, so nothing is acked or left pending."""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ._errors import ConfigurationError
from ._message import Message
from ._resource import AsyncResource
from ._subscription import decode_entry

if TYPE_CHECKING:
    from ._broker import Broker
    from ._channel import Channel

__all__ = ["Tail", "parse_position"]

_ID_RE = re.compile(r"^\d+(-\d+)?$")


def parse_position(value: str | datetime) -> str:
    """An entry id from an id (``1700000000000-0`` or ``1700000000000``) or a datetime.

    :raises ConfigurationError: on anything else.
    """
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ConfigurationError("give an aware datetime (with a timezone), e.g. UTC")
        return f"{int(value.timestamp() * 1000)}-0"
    if isinstance(value, str) and _ID_RE.match(value):
        return value if "-" in value else f"{value}-0"
    raise ConfigurationError(
        f"invalid position {value!r}: give an entry id like 1700000000000-0 or a datetime"
    )


def _id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Tail(AsyncResource):
    """Merged, read-only view of channels, in id order within each read.

    :param start: ``"new"`` (entries added after the tail starts), ``"beginning"``, an entry id
        or an aware datetime (inclusive).
    :param last: start with the last ``last`` entries of each channel (overrides ``start``).
    :param until: stop after this id or datetime (inclusive).
    :param follow: keep waiting for new entries; otherwise end at the end of every channel.
    :param count: stop after this many messages.

    The position always continues from the last id seen (never ``$`` again), so nothing added
    between two reads is missed. ``gaps`` maps a channel to its first id when the start point
    was older than entries already trimmed.
    """

    def __init__(
        self,
        broker: Broker,
        channels: Sequence[Channel[Any]],
        *,
        start: str | datetime = "new",
        last: int | None = None,
        until: str | datetime | None = None,
        follow: bool = True,
        count: int | None = None,
        block: float = 1.0,
        batch: int = 100,
    ) -> None:
        if last is not None and (not isinstance(last, int) or last < 0):
            raise ConfigurationError(f"last must be an int >= 0, got {last!r}")
        if count is not None and (not isinstance(count, int) or count < 1):
            raise ConfigurationError(f"count must be an int >= 1, got {count!r}")
        if batch < 1 or block <= 0:
            raise ConfigurationError("batch must be >= 1 and block > 0")
        self.broker = broker
        self.channels = list(channels)
        self._by_key = {c.key.encode(): c for c in self.channels}
        self._start: str = (
            start
            if isinstance(start, str) and start in ("new", "beginning")
            else parse_position(start)
        )
        self._last = last
        self._until = None if until is None else _id_tuple(parse_position(until))
        self.follow = follow
        self._count = count
        self._block = int(block * 1000)
        self._batch = batch
        self._cursors: dict[str, str] = {}
        self._inclusive: set[str] = set()
        self._ready: collections.deque[Message[Any]] = collections.deque()
        self._done: set[str] = set()
        self._seen = 0
        self._started = False
        self.gaps: dict[str, str] = {}

    async def __aenter__(self) -> Tail:
        await self._begin()
        return self

    async def aclose(self) -> None:
        """Nothing to release (a tail holds no tasks); present for symmetry."""

    def __aiter__(self) -> Tail:
        return self

    async def _begin(self) -> None:
        if self._started:
            return
        self._started = True
        r = self.broker.redis

        async def resolve() -> None:
            for ch in self.channels:
                if self._last:
                    # one read: the cursor is the newest of these rows, so nothing added
                    # between two reads can be skipped
                    rows = await r.xrevrange(ch.key, count=self._last)
                    self._cursors[ch.name] = rows[0][0].decode() if rows else "0-0"
                    self._ready.extend(self._decode(ch, e) for e in reversed(rows))
                elif self._last == 0 or self._start == "new":
                    newest = await r.xrevrange(ch.key, count=1)
                    self._cursors[ch.name] = newest[0][0].decode() if newest else "0-0"
                elif self._start == "beginning":
                    self._cursors[ch.name] = "0-0"
                else:
                    self._cursors[ch.name] = self._start
                    self._inclusive.add(ch.name)
                    await self._check_gap(ch, self._start)

        await self.broker.call(resolve)
        self._ready = collections.deque(sorted(self._ready, key=lambda m: _id_tuple(m.id)))

    async def _check_gap(self, ch: Channel[Any], start: str) -> None:
        """Note a gap when entries at or after ``start`` were deleted or trimmed away."""
        try:
            info = await self.broker.redis.xinfo_stream(ch.key)
        except Exception:  # no such key: nothing was trimmed
            return
        first = info.get("first-entry")
        first_id = first[0].decode() if first else None
        deleted = info.get("max-deleted-entry-id")
        deleted_id = deleted.decode() if isinstance(deleted, bytes) else deleted
        # XDEL moves max-deleted-entry-id; XTRIM (and MAXLEN/MINID) only leave fewer entries
        # than were ever added (Redis 7 counts them in entries-added)
        by_delete = deleted_id not in (None, "0-0") and _id_tuple(start) <= _id_tuple(deleted_id)
        added = info.get("entries-added")
        trimmed = added is not None and int(added) > int(info["length"])  # unknown before 7.0
        by_trim = first_id is not None and _id_tuple(start) < _id_tuple(first_id) and trimmed
        if by_delete or by_trim:
            self.gaps[ch.name] = first_id or "(empty)"

    async def __anext__(self) -> Message[Any]:
        await self._begin()
        while True:
            if self._count is not None and self._seen >= self._count:
                raise StopAsyncIteration
            if self._ready:
                msg = self._ready.popleft()
                if self._until is not None and _id_tuple(msg.id) > self._until:
                    self._done.add(msg.channel)
                    continue
                self._cursors[msg.channel] = msg.id
                self._inclusive.discard(msg.channel)
                self._seen += 1
                return msg
            active = [c for c in self.channels if c.name not in self._done]
            if not active:
                raise StopAsyncIteration
            if await self._catch_up(active):
                continue
            if not self.follow:
                raise StopAsyncIteration
            await self._wait_new(active)

    async def _catch_up(self, active: list[Channel[Any]]) -> bool:
        """One ``XRANGE`` page per channel; False when every channel is at its end."""
        r = self.broker.redis

        async def page() -> list[Any]:
            pipe = r.pipeline(transaction=False)
            for ch in active:
                cursor = self._cursors[ch.name]
                low = cursor if ch.name in self._inclusive else f"({cursor}"
                pipe.xrange(ch.key, min=low, count=self._batch)
            return list(await pipe.execute())

        found = False
        pages = await self.broker.call(page)
        merged: list[Message[Any]] = []
        for ch, rows in zip(active, pages, strict=True):
            if rows:
                found = True
                merged.extend(self._decode(ch, e) for e in rows)
        merged.sort(key=lambda m: _id_tuple(m.id))
        self._ready.extend(merged)
        return found

    async def _wait_new(self, active: list[Channel[Any]]) -> None:
        r = self.broker.redis
        streams = {ch.key: self._cursors[ch.name] for ch in active}
        reply = await self.broker.call(
            lambda: r.xread(streams, count=self._batch, block=self._block)
        )
        merged: list[Message[Any]] = []
        for key, rows in reply or []:
            merged.extend(self._decode(self._by_key[key], e) for e in rows)
        merged.sort(key=lambda m: _id_tuple(m.id))
        self._ready.extend(merged)

    def _decode(self, ch: Channel[Any], entry: Any) -> Message[Any]:
        return decode_entry(ch, entry[0].decode(), entry[1])
