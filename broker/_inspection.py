"""Inspection, group administration and dead letters of a channel, over its streams (one, or one
per partition; a partitioned channel answers as one channel: counts are summed, positions are
the newest, and each dead letter or pending entry says its partition)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ._errors import ConfigurationError, GroupMissingError, RedisCommandError, WrongTypeError
from ._names import check_group
from ._partitions import meta_key
from ._scripts import REPLAY_DEAD
from ._stream import Stream

if TYPE_CHECKING:
    from ._broker import Broker

__all__ = [
    "ChannelInfo",
    "ChannelInspection",
    "ConsumerInfo",
    "DeadLetter",
    "GroupInfo",
    "PendingEntry",
]

DEAD_PREFIX = b"dead."
_FULL_ID = re.compile(r"^\d+-\d+$")
#: idle seconds beyond which a pending entry counts as released (see Subscription.aclose)
RELEASED_IDLE = 10**8
#: ``info()`` counts a group's lag itself up to this many entries when Redis cannot tell
_INFO_LAG_LIMIT = 10_000


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
    #: 1 for an unpartitioned channel
    partitions: int = 1


@dataclasses.dataclass(frozen=True)
class PendingEntry:
    id: str
    consumer: str
    idle: float  # seconds since last delivery
    deliveries: int
    partition: int | None = None

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
    partition: int | None = None


class ChannelInspection:
    """The administrative half of :class:`Channel` (see the module)."""

    name: str
    key: str
    dead_key: str
    broker: Broker

    async def streams(self, *, record: bool = True) -> list[Stream]:
        raise NotImplementedError  # Channel's

    async def _known_streams(self) -> list[Stream]:
        """The streams without recording anything: inspecting a channel creates nothing."""
        return await self.streams(record=False)

    async def exists(self) -> bool:
        """Whether the channel exists (once published to or subscribed).

        :raises WrongTypeError: if a key of the channel holds something other than a stream.
        """
        for s in await self._known_streams():
            kind = _s(await self.broker.call(lambda s=s: self.broker.redis.type(s.key), self.name))
            if kind not in ("none", "stream"):
                raise WrongTypeError(self.name, s.key)
            if kind == "stream":
                return True
        return False

    async def info(self) -> ChannelInfo:
        """Length, first and last id, groups (with pending and lag) and dead-letter count."""
        streams = await self._known_streams()
        parts = [await self._stream_info(s) for s in streams]
        dead = sum(p[2] for p in parts)
        present = [p for p in parts if p[0] is not None]
        if not present:
            return ChannelInfo(self.name, 0, None, None, [], dead, len(streams))
        firsts = [p[0]["first"] for p in present if p[0]["first"]]
        lasts = [p[0]["last"] for p in present if p[0]["last"]]
        groups: dict[str, list[GroupInfo]] = {}
        for p in present:
            for g in p[1]:
                groups.setdefault(g.name, []).append(g)
        return ChannelInfo(
            name=self.name,
            length=sum(p[0]["length"] for p in present),
            first_id=min(firsts, key=_id_tuple) if firsts else None,
            last_id=max(lasts, key=_id_tuple) if lasts else None,
            groups=[_merge(name, gs) for name, gs in groups.items()],
            dead_letters=dead,
            partitions=len(streams),
        )

    async def _stream_info(self, s: Stream) -> tuple[Any, list[GroupInfo], int]:
        r = self.broker.redis

        async def fetch() -> tuple[Any, Any, int]:
            pipe = r.pipeline(transaction=False)
            pipe.exists(s.key)
            pipe.xlen(s.dead_key)
            exists, dead = await pipe.execute()
            if not exists:
                return None, [], dead
            pipe = r.pipeline(transaction=False)
            pipe.xinfo_stream(s.key)
            pipe.xinfo_groups(s.key)
            stream, groups = await pipe.execute()
            return stream, groups, dead

        stream, groups, dead = await self.broker.call(fetch, self.name)
        if stream is None:
            return None, [], int(dead)
        out = []
        for g in groups:
            lag = g.get("lag")
            if lag is None:  # Redis cannot tell (after deletions): count, bounded
                after = await self._count_after(s, _s(g["last-delivered-id"]), _INFO_LAG_LIMIT + 1)
                lag = after if after <= _INFO_LAG_LIMIT else None
            out.append(
                GroupInfo(
                    name=_s(g["name"]),
                    consumers=int(g["consumers"]),
                    pending=int(g["pending"]),
                    last_delivered_id=_s(g["last-delivered-id"]),
                    lag=None if lag is None else int(lag),
                )
            )
        first = stream.get("first-entry")
        last = stream.get("last-entry")
        summary = {
            "length": int(stream["length"]),
            "first": _s(first[0]) if first else None,
            "last": _s(last[0]) if last else None,
        }
        return summary, out, int(dead)

    async def lag(self, group: str | None = None) -> int:
        """Entries not yet delivered to ``group`` (default: the slowest group; 0 if none),
        summed over the partitions.

        Uses ``XINFO GROUPS`` lag; where Redis cannot tell (after deletions) it counts the
        entries after the group's last-delivered id, up to ``max_lag + 1`` (or 10 000) of them,
        so the cost stays bounded.
        """
        r = self.broker.redis
        limit = (getattr(self, "max_lag", None) or 9_999) + 1
        per_group: dict[str, int] = {}
        for s in await self._known_streams():

            async def measure(s: Stream = s) -> dict[str, int]:
                try:
                    groups = await r.xinfo_groups(s.key)
                except Exception as exc:
                    if "no such key" in str(exc).lower():
                        return {}
                    raise
                out = {}
                for g in groups:
                    name = _s(g["name"])
                    if group is not None and name != group:
                        continue
                    lag = g.get("lag")
                    if lag is None:
                        lag = await self._count_after(s, _s(g["last-delivered-id"]), limit)
                    out[name] = int(lag)
                return out

            for name, lag in (await self.broker.call(measure, self.name)).items():
                per_group[name] = per_group.get(name, 0) + lag
        return max(per_group.values(), default=0)

    async def _count_after(self, s: Stream, last_id: str, limit: int) -> int:
        """Entries after ``last_id``, counting at most ``limit`` (one bounded ``XRANGE``)."""
        return len(await self.broker.redis.xrange(s.key, min=f"({last_id}", count=limit))

    # -- groups -------------------------------------------------------------------------------

    async def create_group(self, group: str, start: str = "new") -> bool:
        """Create ``group`` (and the streams); False if it existed. ``start``: new, all or an
        id."""
        check_group(group)
        pos = _start_id(start)
        created = False
        for s in await self.streams():

            async def create(s: Stream = s) -> bool:
                try:
                    await self.broker.redis.xgroup_create(s.key, group, id=pos, mkstream=True)
                except Exception as exc:
                    if str(exc).startswith("BUSYGROUP"):
                        return False
                    raise
                return True

            created = bool(await self.broker.call(create, self.name)) or created
        return created

    async def reset_group(self, group: str, start: str = "new") -> None:
        """Move ``group``'s position (``XGROUP SETID``); pending entries stay pending."""
        pos = _start_id(start)
        for s in await self._known_streams():
            await self._group_call(
                group, lambda s=s: self.broker.redis.xgroup_setid(s.key, group, pos)
            )

    async def delete_group(self, group: str) -> bool:
        """Delete ``group`` and its pending list; False if there was no such group (or stream)."""
        deleted = False
        for s in await self._known_streams():
            try:
                deleted = (
                    bool(
                        await self.broker.call(
                            lambda s=s: self.broker.redis.xgroup_destroy(s.key, group), self.name
                        )
                    )
                    or deleted
                )
            except RedisCommandError as exc:
                if "requires the key to exist" not in str(exc):
                    raise
        return deleted

    async def consumers(self, group: str) -> list[ConsumerInfo]:
        """The group's consumers (on a partitioned channel, each once: pending summed, the
        least idle time)."""
        merged: dict[str, ConsumerInfo] = {}
        for s in await self._known_streams():
            rows = await self._group_call(
                group, lambda s=s: self.broker.redis.xinfo_consumers(s.key, group)
            )
            for c in rows:
                info = ConsumerInfo(_s(c["name"]), int(c["pending"]), int(c["idle"]) / 1000)
                old = merged.get(info.name)
                if old is not None:
                    info = ConsumerInfo(
                        info.name, old.pending + info.pending, min(old.idle, info.idle)
                    )
                merged[info.name] = info
        return list(merged.values())

    async def pending(
        self, group: str, count: int = 100, consumer: str | None = None
    ) -> list[PendingEntry]:
        """The oldest ``count`` pending entries of ``group`` (optionally of one consumer)."""
        out: list[PendingEntry] = []
        for s in await self._known_streams():
            rows = await self._group_call(
                group,
                lambda s=s: self.broker.redis.xpending_range(
                    s.key, group, min="-", max="+", count=count, consumername=consumer
                ),
            )
            out += [
                PendingEntry(
                    _s(r["message_id"]),
                    _s(r["consumer"]),
                    int(r["time_since_delivered"]) / 1000,
                    int(r["times_delivered"]),
                    s.partition,
                )
                for r in rows
            ]
        return sorted(out, key=lambda e: _id_tuple(e.id))[:count]

    async def _group_call(self, group: str, fn: Any) -> Any:
        try:
            return await self.broker.call(fn, self.name)
        except RedisCommandError as exc:
            if "NOGROUP" in str(exc) or "no such key" in str(exc).lower():
                raise GroupMissingError(self.name, group) from exc
            raise

    # -- dead letters -------------------------------------------------------------------------

    async def dead_letters(self, count: int = 100, start: str = "-") -> list[DeadLetter]:
        """The oldest ``count`` dead letters from ``start`` (over every partition)."""
        out: list[DeadLetter] = []
        for s in await self._known_streams():
            rows = await self.broker.call(
                lambda s=s: self.broker.redis.xrange(s.dead_key, min=start, count=count), self.name
            )
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
                        partition=s.partition,
                    )
                )
        return sorted(out, key=lambda d: _id_tuple(d.id))[:count]

    async def replay_dead(self, ids: Iterable[str] | None = None) -> list[str]:
        """Move dead letters back to the channel (all, or the given dead-letter ids).

        Each move is atomic (``XADD`` to the stream and ``XDEL`` from its dead letters in one
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
        streams = await self._known_streams()
        out: list[str] = []
        for dead_id in ids:
            for s in streams:  # a partition's dead letters are its own: try each
                new_id = await self.broker.call(
                    lambda s=s, d=dead_id: REPLAY_DEAD(self.broker.redis, [s.dead_key, s.key], [d]),
                    self.name,
                )
                if new_id:
                    out.append(_s(new_id))
                    break
        return out

    async def purge_dead(self) -> int:
        """Delete every dead letter; returns how many there were."""
        r = self.broker.redis
        total = 0
        for s in await self._known_streams():

            async def purge(s: Stream = s) -> int:
                pipe = r.pipeline(transaction=True)
                pipe.xlen(s.dead_key)
                pipe.delete(s.dead_key)
                n, _ = await pipe.execute()
                return int(n)

            total += int(await self.broker.call(purge, self.name))
        return total

    async def delete(self) -> None:
        """Delete the streams, their groups and dead letters, and the partition record."""
        b = self.broker
        for s in await self._known_streams():
            await b.call(lambda s=s: b.redis.delete(s.key, s.dead_key), self.name)
        await b.call(lambda: b.redis.delete(meta_key(b.namespace, self.name)), self.name)
        b._partitions.pop(self.name, None)


def _merge(name: str, parts: list[GroupInfo]) -> GroupInfo:
    lags = [g.lag for g in parts]
    return GroupInfo(
        name=name,
        consumers=max(g.consumers for g in parts),
        pending=sum(g.pending for g in parts),
        last_delivered_id=max((g.last_delivered_id for g in parts), key=_id_tuple),
        lag=None if None in lags else sum(lag for lag in lags if lag is not None),
    )


def _s(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _id_tuple(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms or 0), int(seq or 0)


def _start_id(start: str) -> str:
    if start in ("new", "$"):
        return "$"
    if start in ("all", "beginning", "0"):
        return "0"
    from ._tail import parse_position

    return parse_position(start)
