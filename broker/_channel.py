"""A named channel: publishing, retention, bounded-channel back-pressure, dead letters."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from ._codec import Codec, get_codec, pack_headers
from ._errors import (
    ChannelFullError,
    ConfigurationError,
    GroupMissingError,
    RedisCommandError,
    WrongTypeError,
)
from ._names import channel_key, check_channel, check_group, dead_key
from ._publisher import XAdd, send_batch
from ._scripts import REPLAY_DEAD
from ._stream import Stream

if TYPE_CHECKING:
    from ._broker import Broker
    from ._subscription import Subscription
    from ._tail import Tail

__all__ = ["Channel", "ChannelInfo", "ConsumerInfo", "DeadLetter", "GroupInfo", "PendingEntry"]

T = TypeVar("T")
DEAD_PREFIX = b"dead."
_LAG_TTL = 0.05
#: ``info()`` counts a group's lag itself up to this many entries when Redis cannot tell
_INFO_LAG_LIMIT = 10_000
_FULL_ID = re.compile(r"^\d+-\d+$")
#: idle seconds beyond which a pending entry counts as released (see Subscription.aclose)
RELEASED_IDLE = 10**8  # seconds a measured lag is trusted before publish asks again


@dataclasses.dataclass(frozen=True)
class GroupInfo:
    name: str
    consumers: int
    pending: int
    last_delivered_id: str
    #: entries not yet delivered to the group (counted where Redis cannot tell); None only when
    #: Redis cannot tell and more than 10,000 entries follow the group's position
    lag: int | None


@dataclasses.dataclass(frozen=True)
class ChannelInfo:
    name: str
    length: int
    first_id: str | None
    last_id: str | None
    groups: list[GroupInfo]
    dead_letters: int


@dataclasses.dataclass(frozen=True)
class PendingEntry:
    id: str
    consumer: str
    idle: float  # seconds since last delivery
    deliveries: int

    @property
    def released(self) -> bool:
        """Fetched but never handed out, and released by a closing subscription: any
        consumer's next claim takes it at once (its idle time was set to "forever")."""
        return self.idle >= RELEASED_IDLE


@dataclasses.dataclass(frozen=True)
class ConsumerInfo:
    name: str
    pending: int
    idle: float  # seconds since the consumer last read


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """An entry of the dead-letter stream: the original entry and why it died."""

    id: str
    original_id: str
    group: str
    consumer: str
    error: str
    deliveries: int
    fields: dict[bytes, bytes]


class Channel(Generic[T]):
    """A named stream. Obtain one with ``broker.channel(name)``."""

    def __init__(
        self,
        broker: Broker,
        name: str,
        *,
        codec: str | Codec = "msgpack",
        maxlen: int | None = None,
        max_age: float | None = None,
        max_lag: int | None = None,
        on_full: Literal["wait", "raise"] = "wait",
        full_timeout: float | None = None,
    ) -> None:
        self.name = check_channel(name)
        self.broker = broker
        self.codec = get_codec(codec)
        if maxlen is not None and (not isinstance(maxlen, int) or maxlen < 1):
            raise ConfigurationError(f"maxlen must be an int >= 1, got {maxlen!r}")
        if max_age is not None and max_age <= 0:
            raise ConfigurationError(f"max_age must be > 0 seconds, got {max_age!r}")
        if max_lag is not None and (not isinstance(max_lag, int) or max_lag < 1):
            raise ConfigurationError(f"max_lag must be an int >= 1, got {max_lag!r}")
        if on_full not in ("wait", "raise"):
            raise ConfigurationError(f"on_full must be 'wait' or 'raise', got {on_full!r}")
        if full_timeout is not None and full_timeout < 0:
            raise ConfigurationError(f"full_timeout must be >= 0, got {full_timeout!r}")
        self.maxlen = maxlen
        self.max_age = max_age
        self.max_lag = max_lag
        self.on_full = on_full
        self.full_timeout = full_timeout
        self.key = channel_key(broker.namespace, name)
        self.dead_key = dead_key(broker.namespace, name)
        self._stream = Stream(
            self.name, self.key, self.dead_key, self.codec, broker.settings.max_payload
        )
        self._lag_checked = -1e9
        self._lag = 0

    def __repr__(self) -> str:
        return f"<Channel {self.name!r} codec={self.codec.name}>"

    # -- publishing ---------------------------------------------------------------------------

    def _entry(self, data: Any, headers: dict[str, str] | None) -> XAdd:
        payload = self.codec.encode(data)
        h = pack_headers(headers) if headers else None
        minid = None
        if self.max_age is not None:
            # entry ids come from the server's clock, so the age bound must too: a producer
            # whose clock runs ahead would otherwise trim away what it just published
            minid = f"{self.broker.server_time_ms() - int(self.max_age * 1000)}-0"
        return XAdd(self.key, self.name, payload, h, self.maxlen, minid)

    async def publish(self, data: T, *, headers: dict[str, str] | None = None) -> str:
        """Append one message and return its id.

        Concurrent calls (from many tasks) leave in shared pipelines; the order of the calls made
        by one task is kept. On a bounded channel this first waits for the consumers.

        :raises TypeError: if the codec cannot encode ``data`` or headers are not str -> str.
        :raises ChannelFullError: on a bounded channel with ``on_full="raise"``.
        :raises ConnectionLostError: if the server stays unreachable past the deadline.
        """
        item = self._entry(data, headers)
        if self.max_lag is not None:
            await self._wait_for_room()
        return await self.broker.publisher.submit(item)

    async def publish_many(
        self, items: Iterable[T | tuple[T, dict[str, str] | None]], *, batch: int = 1000
    ) -> list[str]:
        """Append many messages in pipelines of ``batch`` entries; returns their ids in order.

        Items are payloads, or ``(payload, headers)`` tuples.

        :raises BrokerError: the first per-entry error, after the whole batch was sent.
        """
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        ids: list[str] = []
        chunk: list[XAdd] = []
        for item in items:
            if (
                isinstance(item, tuple)
                and len(item) == 2
                and (item[1] is None or isinstance(item[1], dict))
            ):
                chunk.append(self._entry(item[0], item[1]))
            else:
                chunk.append(self._entry(item, None))
            if len(chunk) >= batch:
                ids += await self._send(chunk)
                chunk = []
        if chunk:
            ids += await self._send(chunk)
        return ids

    async def _send(self, chunk: list[XAdd]) -> list[str]:
        if self.max_lag is not None:
            await self._wait_for_room(len(chunk))
        results = await send_batch(self.broker.topology, chunk, self.broker.settings.retry)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return [r for r in results if isinstance(r, str)]

    async def _wait_for_room(self, n: int = 1) -> None:
        """Wait until ``n`` more entries keep the slowest group's lag within ``max_lag``.

        The measured lag is reused for ``_LAG_TTL`` seconds, counting this process's own
        publishes on top; producers in other processes are seen at the next measurement.
        """
        assert self.max_lag is not None
        if time.monotonic() - self._lag_checked < _LAG_TTL and self._lag + n <= self.max_lag:
            self._lag += n
            return
        started = time.monotonic()
        pause = 0.005
        while True:
            self._lag = await self.lag()
            self._lag_checked = time.monotonic()
            if self._lag + n <= self.max_lag or (self._lag == 0 and n > self.max_lag):
                self._lag += n
                return
            waited = self._lag_checked - started
            if self.on_full == "raise" or (
                self.full_timeout is not None and waited >= self.full_timeout
            ):
                raise ChannelFullError(
                    f"channel {self.name!r} is full: its slowest group is {self._lag} entries "
                    f"behind (max_lag={self.max_lag})",
                    channel=self.name,
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.1)

    # -- reading ------------------------------------------------------------------------------

    async def streams(self) -> list[Stream]:
        """The Redis streams of this channel (one; a partitioned channel has one per
        partition)."""
        return [self._stream]

    def subscribe(self, group: str, **options: Any) -> Subscription[T]:
        """Read as a member of ``group``; see :class:`Subscription`.

        Example::

            async with ch.subscribe(group="billing") as messages:
                async for msg in messages:
                    await handle(msg.data)
                    msg.ack()
        """
        return self.broker.subscribe([self], group=group, **options)

    def tail(self, **options: Any) -> Tail:
        """Read without a group (nothing acked, nothing pending); see :class:`Tail`."""
        return self.broker.tail([self], **options)

    # -- inspection ---------------------------------------------------------------------------

    async def exists(self) -> bool:
        """Whether the stream exists (a channel exists once published to or subscribed).

        :raises WrongTypeError: if the key holds something other than a stream.
        """
        kind = await self.broker.call(lambda: self.broker.redis.type(self.key), self.name)
        kind = _s(kind)
        if kind not in ("none", "stream"):
            raise WrongTypeError(self.name, self.key)
        return kind == "stream"

    async def info(self) -> ChannelInfo:
        """Length, first and last id, groups (with pending and lag) and dead-letter count."""
        r = self.broker.redis

        async def fetch() -> tuple[Any, Any, int]:
            pipe = r.pipeline(transaction=False)
            pipe.exists(self.key)
            pipe.xlen(self.dead_key)
            exists, dead = await pipe.execute()
            if not exists:
                return None, [], dead
            pipe = r.pipeline(transaction=False)
            pipe.xinfo_stream(self.key)
            pipe.xinfo_groups(self.key)
            stream, groups = await pipe.execute()
            return stream, groups, dead

        stream, groups, dead = await self.broker.call(fetch, self.name)
        if stream is None:
            return ChannelInfo(self.name, 0, None, None, [], dead)
        for g in groups:
            if g.get("lag") is None:  # Redis cannot tell (after deletions): count, bounded
                after = await self._count_after(_s(g["last-delivered-id"]), _INFO_LAG_LIMIT + 1)
                g["lag"] = after if after <= _INFO_LAG_LIMIT else None
        first = stream.get("first-entry")
        last = stream.get("last-entry")
        return ChannelInfo(
            name=self.name,
            length=int(stream["length"]),
            first_id=_s(first[0]) if first else None,
            last_id=_s(last[0]) if last else None,
            groups=[
                GroupInfo(
                    name=_s(g["name"]),
                    consumers=int(g["consumers"]),
                    pending=int(g["pending"]),
                    last_delivered_id=_s(g["last-delivered-id"]),
                    lag=None if g.get("lag") is None else int(g["lag"]),
                )
                for g in groups
            ],
            dead_letters=int(dead),
        )

    async def lag(self, group: str | None = None) -> int:
        """Entries not yet delivered to ``group`` (default: the slowest group; 0 if none).

        Uses ``XINFO GROUPS`` lag (Redis 7); where Redis cannot tell (older servers, or after
        deletions) it counts the entries after the group's last-delivered id, up to
        ``max_lag + 1`` (or 10 000) of them, so the cost stays bounded.
        """
        r = self.broker.redis

        async def measure() -> int:
            try:
                groups = await r.xinfo_groups(self.key)
            except Exception as exc:
                if "no such key" in str(exc).lower():
                    return 0
                raise
            worst = 0
            for g in groups:
                if group is not None and _s(g["name"]) != group:
                    continue
                lag = g.get("lag")
                if lag is None:
                    limit = (self.max_lag or 9_999) + 1
                    lag = await self._count_after(_s(g["last-delivered-id"]), limit)
                worst = max(worst, int(lag))
            return worst

        return int(await self.broker.call(measure, self.name))

    async def _count_after(self, last_id: str, limit: int) -> int:
        """Entries after ``last_id``, counting at most ``limit`` (one bounded ``XRANGE``)."""
        return len(await self.broker.redis.xrange(self.key, min=f"({last_id}", count=limit))

    # -- groups -------------------------------------------------------------------------------

    async def create_group(self, group: str, start: str = "new") -> bool:
        """Create ``group`` (and the stream); False if it existed. ``start``: new, all or an id."""
        check_group(group)
        pos = _start_id(start)

        async def create() -> bool:
            try:
                await self.broker.redis.xgroup_create(self.key, group, id=pos, mkstream=True)
            except Exception as exc:
                if str(exc).startswith("BUSYGROUP"):
                    return False
                raise
            return True

        return bool(await self.broker.call(create, self.name))

    async def reset_group(self, group: str, start: str = "new") -> None:
        """Move ``group``'s position (``XGROUP SETID``); pending entries stay pending."""
        pos = _start_id(start)
        await self._group_call(group, lambda: self.broker.redis.xgroup_setid(self.key, group, pos))

    async def delete_group(self, group: str) -> bool:
        """Delete ``group`` and its pending list; False if there was no such group (or stream)."""
        try:
            return bool(
                await self.broker.call(
                    lambda: self.broker.redis.xgroup_destroy(self.key, group), self.name
                )
            )
        except RedisCommandError as exc:
            if "requires the key to exist" in str(exc):
                return False
            raise

    async def consumers(self, group: str) -> list[ConsumerInfo]:
        rows = await self._group_call(
            group, lambda: self.broker.redis.xinfo_consumers(self.key, group)
        )
        return [ConsumerInfo(_s(c["name"]), int(c["pending"]), int(c["idle"]) / 1000) for c in rows]

    async def pending(
        self, group: str, count: int = 100, consumer: str | None = None
    ) -> list[PendingEntry]:
        """The oldest ``count`` pending entries of ``group`` (optionally of one consumer)."""
        rows = await self._group_call(
            group,
            lambda: self.broker.redis.xpending_range(
                self.key, group, min="-", max="+", count=count, consumername=consumer
            ),
        )
        return [
            PendingEntry(
                _s(r["message_id"]),
                _s(r["consumer"]),
                int(r["time_since_delivered"]) / 1000,
                int(r["times_delivered"]),
            )
            for r in rows
        ]

    async def _group_call(self, group: str, fn: Any) -> Any:
        try:
            return await self.broker.call(fn, self.name)
        except RedisCommandError as exc:
            if "NOGROUP" in str(exc) or "no such key" in str(exc).lower():
                raise GroupMissingError(self.name, group) from exc
            raise

    # -- dead letters -------------------------------------------------------------------------

    async def dead_letters(self, count: int = 100, start: str = "-") -> list[DeadLetter]:
        """The oldest ``count`` dead letters from ``start``."""
        rows = await self.broker.call(
            lambda: self.broker.redis.xrange(self.dead_key, min=start, count=count), self.name
        )
        out = []
        for entry_id, fields in rows:
            meta = {
                k[len(DEAD_PREFIX) :].decode(): v
                for k, v in fields.items()
                if k.startswith(DEAD_PREFIX)
            }
            out.append(
                DeadLetter(
                    id=_s(entry_id),
                    original_id=_s(meta.get("id", b"")),
                    group=_s(meta.get("group", b"")),
                    consumer=_s(meta.get("consumer", b"")),
                    error=_s(meta.get("error", b"")),
                    deliveries=int(meta.get("deliveries", b"0") or 0),
                    fields={k: v for k, v in fields.items() if not k.startswith(DEAD_PREFIX)},
                )
            )
        return out

    async def replay_dead(self, ids: Iterable[str] | None = None) -> list[str]:
        """Move dead letters back to the channel (all, or the given dead-letter ids).

        Each move is atomic (``XADD`` to the channel and ``XDEL`` from the dead letters in one
        script), so replaying the same entry twice appends it once. Returns the new ids.
        """
        if ids is None:
            ids = [d.id for d in await self.dead_letters(count=1_000_000)]
        ids = list(ids)
        bad = [i for i in ids if not isinstance(i, str) or not _FULL_ID.match(i)]
        if bad:
            raise ConfigurationError(
                f"invalid dead-letter id {bad[0]!r}: give full entry ids like 1700000000000-0 "
                "(see `broker dead list`)"
            )
        out: list[str] = []
        for dead_id in ids:
            new_id = await self.broker.call(
                lambda d=dead_id: REPLAY_DEAD(self.broker.redis, [self.dead_key, self.key], [d]),
                self.name,
            )
            if new_id:
                out.append(_s(new_id))
        return out

    async def purge_dead(self) -> int:
        """Delete every dead letter; returns how many there were."""
        r = self.broker.redis

        async def purge() -> int:
            pipe = r.pipeline(transaction=True)
            pipe.xlen(self.dead_key)
            pipe.delete(self.dead_key)
            n, _ = await pipe.execute()
            return int(n)

        return int(await self.broker.call(purge, self.name))

    async def delete(self) -> None:
        """Delete the stream, its groups and its dead letters."""
        await self.broker.call(lambda: self.broker.redis.delete(self.key, self.dead_key), self.name)


def _s(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _start_id(start: str) -> str:
    if start in ("new", "$"):
        return "$"
    if start in ("all", "beginning", "0"):
        return "0"
    from ._tail import parse_position

    return parse_position(start)
