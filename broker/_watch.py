"""Watched values: a latest-value channel that readers follow (after ``tokio::sync::watch``).

``broker.watch("config")`` names a value on the server. ``set`` replaces it and returns its new
version; ``get`` reads it; ``subscribe`` yields the current value, then each newer one, always
skipping to the newest: a reader slower than the writer gets the newest value when it asks,
never a queue of old ones (at most one value is held per reader), and never an older version
after a newer one.

Keys (one hash slot, the name's hash tag; ``watch:`` keeps them apart from channel keys):

- ``<namespace>:watch:{<name>}``: a hash ``v`` (version), ``d`` (the value, encoded by the
  codec) and ``w`` (the id of the write), with a TTL when set with ``ttl``. It is also the
  pub/sub channel of the changes.
- ``<namespace>:watch:{<name>}:version``: the version counter. It outlives ``delete`` and
  expiry, so versions only ever grow for a name (``delete(forget=True)`` removes it too).

Every change is one Lua script: the compare, the write and the ``PUBLISH`` (``SPUBLISH`` on a
cluster) of ``<version>:<kind>:<value>``, the value only when it is small (readers then need no
round trip). Pub/sub is at-most-once, so a reader re-reads the value after every gap (its
start, a reconnect of the broker's pub/sub hub, a slot move): it ends on the newest value even
if it missed every message.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Generic, TypeVar

from ._codec import Codec, get_codec
from ._errors import ClosedError, ConfigurationError, VersionConflictError
from ._names import check_watch_name
from ._pubsub import Listener
from ._resource import AsyncResource
from ._scripts import WATCH_DELETE, WATCH_SET

if TYPE_CHECKING:
    from ._broker import Broker

__all__ = [
    "INLINE_LIMIT",
    "Version",
    "Watch",
    "WatchStatistics",
    "WatchSubscription",
    "WatchTotals",
    "watch_key",
]

log = logging.getLogger("broker.watch")
T = TypeVar("T")

#: values up to this many encoded bytes travel in the change message itself
INLINE_LIMIT = 8 * 1024

_SET, _INLINE, _DELETED = b"2", b"1", b"0"


def watch_key(namespace: str, name: str) -> str:
    """The key (and pub/sub channel) of the value ``name``."""
    return f"{namespace}:watch:{{{name}}}"


def version_key(namespace: str, name: str) -> str:
    """The version counter of ``name`` (same hash slot as its value)."""
    return f"{namespace}:watch:{{{name}}}:version"


@dataclasses.dataclass(frozen=True, slots=True)
class Version(Generic[T]):
    """A value and its version (versions of a name grow by one with each set, from 1)."""

    value: T
    version: int


@dataclasses.dataclass(frozen=True, slots=True)
class WatchStatistics:
    """What a reader saw: ``yielded`` values, change ``messages`` received, ``rereads`` of the
    server (at the start, after gaps, for values too large to travel in a message), the
    ``version`` last yielded (0: none yet) and whether a newer value is ``pending``."""

    yielded: int
    messages: int
    rereads: int
    version: int
    pending: bool


@dataclasses.dataclass(frozen=True, slots=True)
class WatchTotals:
    """The watched values of a broker (``broker.watch_statistics()``): ``sets`` and
    ``deletes`` that changed a value, compare-and-set ``conflicts``, ``readers`` open now, the
    values they ``yielded`` and their ``rereads`` of the server (after gaps, for large
    values). Exported as metrics (``broker_watch_*``)."""

    sets: int
    deletes: int
    conflicts: int
    readers: int
    yielded: int
    rereads: int

    @classmethod
    def counters(cls) -> dict[str, int]:
        """Zeroed counts, one per field (what a broker increments)."""
        return dict.fromkeys((f.name for f in dataclasses.fields(cls)), 0)


def _check_version(if_version: int | None) -> None:
    if if_version is None:
        return
    if isinstance(if_version, bool) or not isinstance(if_version, int) or if_version < 0:
        raise ConfigurationError(
            f"if_version must be an int >= 0 (0: only if no value is set), got {if_version!r}"
        )


def _ttl_ms(ttl: float | None) -> int | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl > 0:
        raise ConfigurationError(f"ttl must be a number of seconds > 0, got {ttl!r}")
    return max(1, round(ttl * 1000))


class Watch(Generic[T]):
    """A watched value by name (cheap; nothing is sent until used). Obtain with
    ``broker.watch(name)``.

    Example::

        config = broker.watch("config")
        v = await config.set({"rate": 10})
        async with config.subscribe() as values:
            async for current in values:
                apply(current.value)
    """

    def __init__(self, broker: Broker, name: str, *, codec: str | Codec = "msgpack") -> None:
        self.broker = broker
        self.name = check_watch_name(name)
        self.codec = get_codec(codec)
        self.key = watch_key(broker.namespace, name)
        self.version_key = version_key(broker.namespace, name)

    def __repr__(self) -> str:
        return f"<Watch {self.name!r}>"

    async def set(
        self, value: T, *, if_version: int | None = None, ttl: float | None = None
    ) -> int:
        """Replace the value and tell every reader; returns the new version.

        ``if_version`` makes it a compare-and-set: the value is replaced only if its current
        version is that one (0: only if no value is set, e.g. to take a free leadership).
        ``ttl`` (seconds) makes the value expire unless set again in time (a heartbeat); a set
        without ``ttl`` keeps the value until it is replaced or deleted. A set retried after a
        lost connection is applied once (it carries a write id).

        :raises VersionConflictError: if ``if_version`` is not the current version (it carries
            the current one).
        :raises ConfigurationError: if ``if_version < 0`` or ``ttl <= 0``.
        :raises TypeError: if the codec cannot encode ``value``.
        """
        _check_version(if_version)
        ttl_ms = _ttl_ms(ttl)
        data = self.codec.encode(value)
        b = self.broker
        args = [
            data,
            "" if if_version is None else if_version,
            "" if ttl_ms is None else ttl_ms,
            INLINE_LIMIT,
            "SPUBLISH" if b.cluster else "PUBLISH",
            os.urandom(8).hex(),  # the write id: a retry after a lost reply is applied once
        ]
        keys = [self.key, self.version_key]
        ok, version = await b.call(lambda: WATCH_SET.on_wire(b.topology, keys, args))
        if not ok:
            b._watch_counts["conflicts"] += 1
            raise VersionConflictError(self.name, expected=if_version, current=int(version))
        b._watch_counts["sets"] += 1
        return int(version)

    async def get(self) -> Version[T] | None:
        """The current value and its version; None when no value is set (never set, deleted
        or expired).

        :raises ValueError: if the stored value cannot be decoded with this watch's codec.
        """
        found = await self._read()
        if found is None:
            return None
        version, raw = found
        return Version(self.codec.decode(raw), version)

    async def version(self) -> int:
        """The last version given out for this name (0: never set); it outlives ``delete``."""
        raw = await self.broker.call(lambda: self.broker.redis.get(self.version_key))
        return 0 if raw is None else int(raw)

    async def delete(self, *, if_version: int | None = None, forget: bool = False) -> bool:
        """Delete the value; True if there was one. Readers are told, and yield nothing for it:
        they wait for the next set. The version counter stays (the next set gets a newer
        version) unless ``forget``, which removes it too (versions start again at 1).

        :raises VersionConflictError: if ``if_version`` is given and a value of another version
            is set (e.g. a leader that releases only its own term); with no value set there is
            nothing to delete: False.
        """
        _check_version(if_version)
        b = self.broker
        keys = [self.key, self.version_key]
        args = [
            "" if if_version is None else if_version,
            "1" if forget else "",
            "SPUBLISH" if b.cluster else "PUBLISH",
        ]
        ok, current = await b.call(lambda: WATCH_DELETE.on_wire(b.topology, keys, args))
        if ok < 0:
            b._watch_counts["conflicts"] += 1
            raise VersionConflictError(self.name, expected=if_version, current=int(current))
        if ok:
            b._watch_counts["deletes"] += 1
        return bool(ok)

    def subscribe(self) -> WatchSubscription[T]:
        """Follow the value: ``async with w.subscribe() as values: async for v in values:``.

        Yields the current value at once (when there is one), then each newer one; a slow
        reader skips to the newest. See :class:`WatchSubscription`.
        """
        return WatchSubscription(self)

    async def _read(self) -> tuple[int, bytes] | None:
        r = self.broker.redis
        version, raw = await self.broker.call(lambda: r.hmget(self.key, ["v", "d"]))
        if version is None or raw is None:
            return None
        return int(version), bytes(raw)


class WatchSubscription(AsyncResource, Generic[T]):
    """The values of a :class:`Watch`, newest first-come: an async iterator of
    :class:`Version`.

    Guarantees: the first value is the current one (if any); versions yielded only grow; at
    most one value waits for the reader (the newest known), so a slow reader skips the ones it
    was too slow for; after any gap (the start, a reconnect, a slot move) the value is read
    from the server, so the reader ends on the newest even if it missed every message. A
    deleted or expired value yields nothing: the reader waits for the next set. A value that
    the codec cannot decode is logged and skipped.

    It holds no task and no connection of its own: it listens on the broker's pub/sub hub.
    """

    def __init__(self, watch: Watch[T]) -> None:
        self.watch = watch
        self._listener = Listener(watch.key, self._on_message, self._on_gap)
        self._changed = asyncio.Event()
        #: the newest (version, payload) announced with its value and not yet yielded
        self._pending: tuple[int, bytes] | None = None
        #: the newest version announced (or read); a re-read is due while it is ahead of both
        #: the last yielded one and the pending one
        self._announced = 0
        #: gaps seen (the start counts as one) and gaps covered by a finished re-read: a
        #: re-read is due while they differ (a cancelled re-read leaves it due)
        self._gaps = 1
        self._covered = 0
        self._last = 0
        self._entered = False
        self._closed = False
        self._messages = 0
        self._rereads = 0
        self._yielded = 0
        self._counted = False  # among the broker's readers

    async def __aenter__(self) -> WatchSubscription[T]:
        if self._entered:
            raise ClosedError("a watch subscription can be entered once; subscribe again")
        self._entered = True
        b = self.watch.broker
        await b._pubsub_hub().add(self._listener)
        b._watch_counts["readers"] += 1
        self._counted = True
        # subscribed: every change from now on is announced; the one before is read on the
        # first __anext__ (self._reread)
        return self

    async def aclose(self) -> None:
        """Stop listening (the hub unsubscribes with the channel's last listener). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._changed.set()  # a reader waiting in another task ends
        if self._counted:
            self.watch.broker._watch_counts["readers"] -= 1
            self._counted = False
        if self._entered:
            await self.watch.broker._pubsub_hub().remove(self._listener)

    def statistics(self) -> WatchStatistics:
        return WatchStatistics(
            yielded=self._yielded,
            messages=self._messages,
            rereads=self._rereads,
            version=self._last,
            pending=self._pending is not None
            or self._gaps != self._covered
            or self._announced > self._last,
        )

    # -- the hub's callbacks --------------------------------------------------------------------

    def _on_message(self, data: bytes) -> None:
        self._messages += 1
        head, _, rest = data.partition(b":")
        kind, _, payload = rest.partition(b":")
        try:
            version = int(head)
        except ValueError:
            log.warning("watch %s: ignoring a malformed change message", self.watch.name)
            return
        if kind == _DELETED:
            # the value announced, if not newer, is gone: yield nothing for it
            if self._pending is not None and self._pending[0] <= version:
                self._pending = None
            if self._announced <= version:
                self._announced = 0
            return
        if version <= self._last:
            return
        if kind == _INLINE:
            if self._pending is None or version > self._pending[0]:
                self._pending = (version, payload)
        else:  # too large to travel: read it from the server when the reader asks
            self._announced = max(self._announced, version)
        self._changed.set()

    async def _on_gap(self) -> None:
        self._gaps += 1
        self._changed.set()

    # -- iteration ------------------------------------------------------------------------------

    def __aiter__(self) -> WatchSubscription[T]:
        return self

    async def __anext__(self) -> Version[T]:
        if not self._entered:
            raise ClosedError("enter the subscription first: `async with w.subscribe() as v:`")
        while not self._closed:
            self._changed.clear()
            pending = self._pending
            newest_pending = 0 if pending is None else pending[0]
            if self._gaps != self._covered or self._announced > max(self._last, newest_pending):
                gaps, announced = self._gaps, self._announced
                self._rereads += 1
                self.watch.broker._watch_counts["rereads"] += 1
                found = await self.watch._read()
                self._covered = gaps
                if self._announced <= announced:
                    self._announced = 0  # the read saw that one (or its deletion)
                # a message may have brought a newer value during the read
                pending = self._pending
                if found is not None and (pending is None or found[0] > pending[0]):
                    pending = found
            self._pending = None
            if pending is None or pending[0] <= self._last:
                if self._gaps == self._covered:
                    await self._changed.wait()
                continue
            version, raw = pending
            self._last = version
            try:
                value = self.watch.codec.decode(raw)
            except ValueError as exc:
                log.warning("watch %s: skipping version %d: %s", self.watch.name, version, exc)
                continue
            self._yielded += 1
            self.watch.broker._watch_counts["yielded"] += 1
            return Version(value, version)
        raise StopAsyncIteration
