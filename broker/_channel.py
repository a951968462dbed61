"""A named channel: publishing (by key to partitions), retention, bounded-channel back-pressure.

Inspection, group administration and dead letters are in :mod:`._inspection` (a mixin): they
work over the channel's streams, one or one per partition.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from . import _observe
from ._codec import Codec, get_codec, pack_headers
from ._durable import WaitFor, durability
from ._errors import ChannelFullError, ConfigurationError
from ._inspection import (
    ChannelInfo,
    ChannelInspection,
    ConsumerInfo,
    DeadLetter,
    GroupInfo,
    PendingEntry,
)
from ._names import channel_key, check_channel, dead_key
from ._partitions import check_partitions, partition_for, partition_key, record_partitions
from ._publisher import XAdd, send_batch
from ._stream import Stream

if TYPE_CHECKING:
    from ._broker import Broker
    from ._subscription import Subscription
    from ._tail import Tail

__all__ = ["Channel", "ChannelInfo", "ConsumerInfo", "DeadLetter", "GroupInfo", "PendingEntry"]

T = TypeVar("T")
_LAG_TTL = 0.05  # seconds a measured lag is trusted before publish asks again


class Channel(ChannelInspection, Generic[T]):
    """A named stream, or P streams for a partitioned channel. Obtain one with
    ``broker.channel(name)``."""

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
        partitions: int | None = None,
        replicas: int = 0,
        replica_timeout: float = 5.0,
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
        self.asked_partitions = check_partitions(partitions)
        #: publishes return once this many replicas have them (``WAIT``); 0: the master's word
        self.replicas = replicas
        self.replica_timeout = replica_timeout
        self._wait = durability(replicas, replica_timeout)
        self.maxlen = maxlen
        self.max_age = max_age
        self.max_lag = max_lag
        self.on_full = on_full
        self.full_timeout = full_timeout
        #: the stream of an unpartitioned channel (and the hash tag of every key it has)
        self.key = channel_key(broker.namespace, name)
        self.dead_key = dead_key(broker.namespace, name)
        #: the channel's streams, once known (see :meth:`streams`)
        self._streams: list[Stream] | None = None
        self._resolving: asyncio.Future[list[Stream]] | None = None
        self._turn = itertools.count()
        self._lag_checked = -1e9
        self._lag = 0

    def __repr__(self) -> str:
        parts = (
            ""
            if not self._streams or len(self._streams) == 1
            else f" partitions={len(self._streams)}"
        )
        return f"<Channel {self.name!r} codec={self.codec.name}{parts}>"

    # -- streams ------------------------------------------------------------------------------

    async def streams(self, *, record: bool = True) -> list[Stream]:
        """The Redis streams of this channel: one, or one per partition.

        The partition count is read from the server (recorded by whoever used the channel
        first; see :mod:`._partitions`), once per broker. ``record=False`` (inspection, tails)
        records nothing for a channel never used.

        :raises ConfigurationError: if ``partitions=`` differs from the recorded count.
        """
        if self._streams is not None:
            return self._streams
        if not record:
            return await self._resolve(False)
        # concurrent first publishes share one resolution (and resume together, so they
        # still leave in one pipeline)
        pending = self._resolving
        if pending is not None:
            return await asyncio.shield(pending)
        pending = self._resolving = asyncio.get_running_loop().create_future()
        try:
            streams = await self._resolve(True)
        except BaseException as exc:
            self._resolving = None
            if isinstance(exc, Exception):
                pending.set_exception(exc)
                pending.exception()  # retrieved: the waiters (if any) get it too
            else:
                pending.cancel()
            raise
        self._streams = streams
        pending.set_result(streams)
        return streams

    @property
    def partitions(self) -> int | None:
        """The partition count, once known (after the first publish or subscribe)."""
        return None if self._streams is None else len(self._streams)

    async def _resolve(self, record: bool) -> list[Stream]:
        b = self.broker
        known = b._partitions.get(self.name)
        if known is None or (self.asked_partitions is not None and known != self.asked_partitions):
            found = await b.call(
                lambda: record_partitions(
                    b.redis, b.namespace, self.name, self.asked_partitions, self.key, write=record
                ),
                self.name,
            )
            if record:
                b._partitions[self.name] = found
            known = found
        limit = b.settings.max_payload
        if known == 1:
            return [Stream(self.name, self.key, self.dead_key, self.codec, limit)]
        out = []
        for p in range(known):
            key = partition_key(b.namespace, self.name, p)
            out.append(Stream(self.name, key, f"{key}:dead", self.codec, limit, p))
        return out

    # -- publishing ---------------------------------------------------------------------------

    def _entry(
        self,
        streams: list[Stream],
        data: Any,
        headers: dict[str, str] | None,
        key: Any,
        turn: int,
        wait: WaitFor | None,
    ) -> XAdd:
        payload = self.codec.encode(data)
        h = pack_headers(headers) if headers else None
        minid = None
        if self.max_age is not None:
            # entry ids come from the server's clock, so the age bound must too: a producer
            # whose clock runs ahead would otherwise trim away what it just published
            minid = f"{self.broker.server_time_ms() - int(self.max_age * 1000)}-0"
        n = len(streams)
        if n == 1:
            stream = streams[0]
            maxlen = self.maxlen
        else:
            part = partition_for(key, n) if key is not None else turn % n
            stream = streams[part]
            maxlen = None if self.maxlen is None else max(1, self.maxlen // n)
        return XAdd(stream.key, self.name, payload, h, maxlen, minid, wait)

    def _waiting(self, replicas: int | None) -> WaitFor | None:
        """What a publish waits for: the channel's, or ``replicas`` for this one."""
        return self._wait if replicas is None else durability(replicas, self.replica_timeout)

    async def publish(
        self,
        data: T,
        *,
        headers: dict[str, str] | None = None,
        key: str | bytes | int | None = None,
        replicas: int | None = None,
    ) -> str:
        """Append one message and return its id.

        On a partitioned channel, ``key`` chooses the partition (the same key, the same
        partition: per-key order holds); without one, publishes go to the partitions in turn.
        Concurrent calls (from many tasks) leave in shared pipelines; the order of the calls made
        by one task is kept. On a bounded channel this first waits for the consumers.
        ``replicas`` overrides the channel's for this message: return only once that many
        replicas have it (``WAIT``; 0: once the master has it).

        :raises TypeError: if the codec cannot encode ``data`` or headers are not str -> str.
        :raises ChannelFullError: on a bounded channel with ``on_full="raise"``.
        :raises ReplicationTimeoutError: if fewer replicas confirmed it within
            ``replica_timeout`` (it is on the master: it may or may not survive a failover).
        :raises ConnectionLostError: if the server stays unreachable past the deadline.
        """
        if _observe.observing():  # metrics on, or the application uses OpenTelemetry
            return await _observe.publish(self, data, headers, key, replicas)
        # the body of _publish, inline: the hot path pays no extra coroutine
        streams = self._streams
        if streams is None:
            streams = await self.streams()
        wait = self._wait if replicas is None else self._waiting(replicas)
        item = self._entry(streams, data, headers, key, next(self._turn), wait)
        if self.max_lag is not None:
            await self._wait_for_room()
        return await self.broker.publisher.submit(item)

    async def _publish(
        self,
        data: T,
        headers: dict[str, str] | None,
        key: str | bytes | int | None,
        replicas: int | None = None,
    ) -> str:
        streams = self._streams
        if streams is None:
            streams = await self.streams()
        item = self._entry(streams, data, headers, key, next(self._turn), self._waiting(replicas))
        if self.max_lag is not None:
            await self._wait_for_room()
        return await self.broker.publisher.submit(item)

    async def request(
        self,
        data: T,
        *,
        timeout: float = 5.0,  # noqa: ASYNC109 - the answer's deadline, not a call's
        headers: dict[str, str] | None = None,
        key: str | bytes | int | None = None,
    ) -> Any:
        """Publish ``data`` as a request and return the one answer (``oneshot``).

        The message is an ordinary one (at-least-once, retried, dead-lettered) whose headers
        carry this broker's inbox and a correlation id; a consumer's handler answers with its
        return value (decoded from msgpack here). The first answer wins: a second one (a
        retried request) or a late one is dropped and counted (:meth:`Broker.request_statistics`).

        Example::

            total = await b.channel("prices").request({"sku": "A1", "qty": 3}, timeout=2.0)

        :raises RequestTimeoutError: if no answer came within ``timeout`` seconds (the
            publish included).
        :raises RemoteError: if the responder's handler raised (``.type``, ``.text``).
        :raises ValueError: on a timeout <= 0, or headers ``reply-to``/``reply-id``.
        """
        from ._request import request

        return await request(self, data, timeout, headers, key)

    async def publish_many(
        self,
        items: Iterable[T | tuple[T, dict[str, str] | None]],
        *,
        batch: int = 1000,
        key: Callable[[T], str | bytes | int] | None = None,
        replicas: int | None = None,
    ) -> list[str]:
        """Append many messages in pipelines of ``batch`` entries; returns their ids in order.

        Items are payloads, or ``(payload, headers)`` tuples. On a partitioned channel,
        ``key(payload)`` chooses each message's partition; without it, each batch goes to the
        next partition in turn. ``replicas``: as for :meth:`publish` (one ``WAIT`` per batch
        per node).

        :raises BrokerError: the first per-entry error, after the whole batch was sent (a
            :class:`ReplicationTimeoutError` names the first entry not confirmed; the batches
            before it were).
        """
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if _observe.observing():
            return await _observe.publish_many(self, items, batch, key, replicas)
        return await self._publish_many(items, batch, key, None, replicas)

    async def _publish_many(
        self,
        items: Iterable[T | tuple[T, dict[str, str] | None]],
        batch: int,
        key: Callable[[T], str | bytes | int] | None,
        inject: Callable[[dict[str, str] | None], dict[str, str] | None] | None,
        replicas: int | None = None,
    ) -> list[str]:
        wait = self._waiting(replicas)
        streams = await self.streams()
        ids: list[str] = []
        chunk: list[XAdd] = []
        turn = next(self._turn)
        for item in items:
            if (
                isinstance(item, tuple)
                and len(item) == 2
                and (item[1] is None or isinstance(item[1], dict))
            ):
                data, headers = item[0], item[1]
            else:
                data, headers = item, None
            if inject is not None:  # a trace context for every message
                headers = inject(headers)
            k = None if key is None else key(data)
            chunk.append(self._entry(streams, data, headers, k, turn, wait))
            if len(chunk) >= batch:
                ids += await self._send(chunk, wait)
                chunk = []
                turn = next(self._turn)
        if chunk:
            ids += await self._send(chunk, wait)
        return ids

    async def _send(self, chunk: list[XAdd], wait: WaitFor | None) -> list[str]:
        if self.max_lag is not None:
            await self._wait_for_room(len(chunk))
        b = self.broker
        results = await send_batch(b.topology, chunk, b.settings.retry, b.bells, wait)
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
