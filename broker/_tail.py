"""Read-only tails: ``XRANGE``/``XREAD`` without a group, so nothing is acked or left pending."""

from __future__ import annotations

import asyncio
import collections
import re
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ._decode import decode_entry
from ._errors import ConfigurationError
from ._message import Message
from ._resource import AsyncResource
from ._retry import retrying
from ._stream import Stream
from ._topology import Link, slot_of

if TYPE_CHECKING:
    from ._subscription import StreamSource

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
        broker: Link,
        channels: Sequence[StreamSource],
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
        self.streams: list[Stream] = []
        self._by_key: dict[bytes, Stream] = {}
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
        for ch in self.channels:
            self.streams += await ch.streams(record=False)
        self._by_key = {s.key.encode(): s for s in self.streams}

        async def resolve() -> None:
            for st in self.streams:
                if self._last:
                    # one read: the cursor is the newest of these rows, so nothing added
                    # between two reads can be skipped
                    rows = await r.xrevrange(st.key, count=self._last)
                    self._cursors[st.key] = rows[0][0].decode() if rows else "0-0"
                    self._ready.extend(self._decode(st, e) for e in reversed(rows))
                elif self._last == 0 or self._start == "new":
                    newest = await r.xrevrange(st.key, count=1)
                    self._cursors[st.key] = newest[0][0].decode() if newest else "0-0"
                elif self._start == "beginning":
                    self._cursors[st.key] = "0-0"
                else:
                    self._cursors[st.key] = self._start
                    self._inclusive.add(st.key)
                    await self._check_gap(st, self._start)

        await self._call(resolve)
        self._ready = collections.deque(sorted(self._ready, key=lambda m: _id_tuple(m.id)))

    async def _call(self, fn: Any) -> Any:
        return await retrying(fn, self.broker.settings.retry)

    async def _check_gap(self, st: Stream, start: str) -> None:
        """Note a gap when entries at or after ``start`` were deleted or trimmed away."""
        try:
            info = await self.broker.redis.xinfo_stream(st.key)
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
            name = st.channel if st.partition is None else f"{st.channel}#{st.partition}"
            self.gaps[name] = first_id or "(empty)"

    async def __anext__(self) -> Message[Any]:
        await self._begin()
        while True:
            if self._count is not None and self._seen >= self._count:
                raise StopAsyncIteration
            if self._ready:
                msg = self._ready.popleft()
                key = msg._stream.key if msg._stream else msg.channel
                if self._until is not None and _id_tuple(msg.id) > self._until:
                    self._done.add(key)
                    continue
                self._cursors[key] = msg.id
                self._inclusive.discard(key)
                self._seen += 1
                return msg
            active = [s for s in self.streams if s.key not in self._done]
            if not active:
                raise StopAsyncIteration
            if await self._catch_up(active):
                continue
            if not self.follow:
                raise StopAsyncIteration
            await self._wait_new(active)

    async def _catch_up(self, active: list[Stream]) -> bool:
        """One ``XRANGE`` page per stream; False when every stream is at its end."""
        r = self.broker.redis

        async def page() -> list[Any]:
            pipe = r.pipeline(transaction=False)
            for st in active:
                cursor = self._cursors[st.key]
                low = cursor if st.key in self._inclusive else f"({cursor}"
                pipe.xrange(st.key, min=low, count=self._batch)
            return list(await pipe.execute())

        found = False
        pages = await self._call(page)
        merged: list[Message[Any]] = []
        for st, rows in zip(active, pages, strict=True):
            if rows:
                found = True
                merged.extend(self._decode(st, e) for e in rows)
        merged.sort(key=lambda m: _id_tuple(m.id))
        self._ready.extend(merged)
        return found

    async def _wait_new(self, active: list[Stream]) -> None:
        """Wait for new entries: one blocking ``XREAD`` when the streams can be read together
        (one server, or one slot of a cluster); otherwise (streams in several slots, which no
        single command may name) poll them together, backing off while nothing comes."""
        r = self.broker.redis
        if self.broker.topology.single is not None or len({slot_of(s.key) for s in active}) == 1:
            streams = {st.key: self._cursors[st.key] for st in active}
            reply = await self._call(lambda: r.xread(streams, count=self._batch, block=self._block))
        else:
            reply = []
            pause = 0.01
            waited = 0.0
            while not reply and waited * 1000 < self._block:

                async def poll() -> list[Any]:
                    pipe = r.pipeline(transaction=False)
                    for st in active:
                        pipe.xread({st.key: self._cursors[st.key]}, count=self._batch)
                    return [x for res in await pipe.execute() for x in (res or [])]

                reply = await self._call(poll)
                if not reply:
                    await asyncio.sleep(pause)
                    waited += pause
                    pause = min(pause * 2, 0.25)
        merged: list[Message[Any]] = []
        for key, rows in _items(reply):
            merged.extend(self._decode(self._by_key[key], e) for e in rows)
        merged.sort(key=lambda m: _id_tuple(m.id))
        self._ready.extend(merged)

    def _decode(self, st: Stream, entry: Any) -> Message[Any]:
        return decode_entry(st, entry[0].decode(), entry[1])


def _items(reply: Any) -> list[tuple[bytes, Any]]:
    """``XREAD``'s reply as ``[(key, rows)]``: RESP2 gives a list of pairs, RESP3 a map."""
    if isinstance(reply, dict):
        return list(reply.items())
    return [(k, v) for k, v in (reply or [])]
