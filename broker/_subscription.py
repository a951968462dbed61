"""Group consumption: one subscription reads one or more channels as a consumer-group member.

A subscription is made of three parts, each in its own module:

- the **readers** (:mod:`._reader`), one per node of the streams read (per slot on a cluster):
  own pending entries first, then claims, then new entries;
- the **ledger** (:mod:`._ledger`) of what it holds and has not settled: buffered, in flight,
  waiting for a retry; it bounds memory and the pending list (``prefetch``), keeps held entries
  fresh and releases what was never handed out;
- the **settlements** (:mod:`._settle`): acks, idle resets and dead letters in batches, one
  payload per node.

This module is the face of the three: the iteration, ``chunks``, ``ack``/``nack``, the lifetime,
and the supervision of the readers (regrouped when a cluster's slot map changes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar

from ._durable import durability
from ._errors import BrokerError, ClosedError, ConfigurationError, ConnectionLostError
from ._ledger import Ledger
from ._message import Message
from ._names import check_group, host_label
from ._observe import subscription_closed
from ._reader import Reader, ReadOptions, reader_groups
from ._resource import AsyncResource, cancel_all, cancel_and_wait
from ._scripts import PRUNE_CONSUMER
from ._settle import GroupCalls, Settler
from ._stream import Stream
from ._topology import Link
from ._wire import Wire

if TYPE_CHECKING:
    from ._stop import StopToken

__all__ = [
    "ChannelStatistics",
    "StreamSource",
    "Subscription",
    "SubscriptionStatistics",
    "default_consumer_name",
]

log = logging.getLogger("broker.subscription")
T = TypeVar("T")


def default_consumer_name() -> str:
    """``<host>-<pid>``: unique per process. Pass a stable name per worker slot to have a
    restarted process replay its own pending entries at once."""
    return f"{host_label()}-{os.getpid()}"


class StreamSource(Protocol):
    """What a subscription reads: a channel, which knows its streams (one per partition)."""

    name: str

    async def streams(self, *, record: bool = True) -> list[Stream]: ...


@dataclasses.dataclass(frozen=True)
class ChannelStatistics:
    """One channel's share of a subscription's counts (see ``channel_statistics()``)."""

    buffered: int
    in_flight: int
    retrying: int
    delivered: int
    acked: int
    nacked: int
    dead_lettered: int
    claimed: int
    released: int
    trimmed: int


@dataclasses.dataclass(frozen=True)
class SubscriptionStatistics:
    buffered: int
    in_flight: int
    retrying: int
    pending_acks: int
    delivered: int
    acked: int
    nacked: int
    dead_lettered: int
    claimed: int
    released: int
    trimmed: int
    reconnects: int


class Subscription(AsyncResource, Generic[T]):
    """Consume channels as a member of a consumer group (at-least-once).

    Use as ``async with broker.subscribe(["a", "b"], group="g") as messages: async for msg in
    messages: ...; msg.ack()``.

    :param group: the consumer group; created on first use (with the stream, ``MKSTREAM``).
    :param consumer: this member's name; default ``<host>-<pid>``. A stable name per worker slot
        makes a restarted process replay its own pending entries at once.
    :param start: where a new group starts: ``"new"`` (only entries added from now on),
        ``"all"`` (the whole history) or an entry id.
    :param prefetch: bound on messages held by this subscription (buffered, in flight, waiting
        for retry or for their ack to be sent).
    :param claim_idle: seconds after which another consumer's pending entry is claimed.
    :param max_deliveries: deliveries after which a failing message goes to the dead letters.
    :param retry_delay: first backoff of ``nack()`` without a delay; doubles up to ``retry_max``.
    :param prune_idle: consumers with nothing pending and idle this long are deleted.
    :param replicas: acks and dead-letter moves wait until that many replicas have them
        (``WAIT``, at most ``replica_timeout`` seconds; a shortfall is logged: after a failover
        such a message may be delivered again). Fewer duplicates after a failover, never fewer
        losses: an ack lost with its master only means a redelivery.
    """

    def __init__(
        self,
        link: Link,
        channels: Sequence[StreamSource],
        *,
        group: str,
        consumer: str | None = None,
        start: Literal["new", "all"] | str = "new",
        prefetch: int = 16,
        block: float = 1.0,
        claim_idle: float = 60.0,
        claim_interval: float = 1.0,
        max_deliveries: int = 5,
        retry_delay: float = 1.0,
        retry_max: float = 60.0,
        prune_idle: float = 3600.0,
        dead_maxlen: int = 100_000,
        replicas: int = 0,
        replica_timeout: float = 5.0,
    ) -> None:
        self.link = link
        self.group = check_group(group)
        self.consumer = check_group(consumer if consumer is not None else default_consumer_name())
        if start not in ("new", "all") and not re.fullmatch(r"\d+(-\d+)?", start):
            raise ConfigurationError(f"start must be 'new', 'all' or an entry id, got {start!r}")
        for name, value, low in (
            ("prefetch", prefetch, 1),
            ("max_deliveries", max_deliveries, 1),
            ("dead_maxlen", dead_maxlen, 1),
        ):
            if not isinstance(value, int) or value < low:
                raise ConfigurationError(f"{name} must be an int >= {low}, got {value!r}")
        for name, fvalue in (
            ("block", block),
            ("claim_idle", claim_idle),
            ("claim_interval", claim_interval),
            ("retry_max", retry_max),
            ("prune_idle", prune_idle),
        ):
            if not fvalue > 0:
                raise ConfigurationError(f"{name} must be > 0 seconds, got {fvalue!r}")
        if retry_delay < 0:
            raise ConfigurationError(f"retry_delay must be >= 0 seconds, got {retry_delay!r}")
        self.channels = list(channels)
        self.start = {"new": "$", "all": "0"}.get(start, start)
        self.prefetch = prefetch
        self.block = block
        self.claim_idle = claim_idle
        self.claim_interval = claim_interval
        self.max_deliveries = max_deliveries
        self.retry_delay = retry_delay
        self.retry_max = retry_max
        self.prune_idle = prune_idle
        self.dead_maxlen = dead_maxlen
        self._wait = durability(replicas, replica_timeout)
        self.streams: list[Stream] = []
        self._ledger: Ledger[T] | None = None
        self._settler: Settler | None = None
        # the hot paths read these directly (the ledger's containers, never replaced)
        self._buffer: Any = ()
        self._inflight: dict[Message[T], bool] = {}
        self._readers: list[Reader] = []
        self._reconnects = 0
        self._acked = 0
        self._error: BaseException | None = None
        self._stopped = False
        self._entered = False
        self._closed = False
        self._tasks: asyncio.TaskGroup | None = None
        self._fetch_task: asyncio.Task[None] | None = None
        self._winding: asyncio.Task[None] | None = None
        self._aux: list[asyncio.Task[None]] = []

    def __repr__(self) -> str:
        names = ",".join(c.name for c in self.channels)
        return f"<Subscription {names} group={self.group!r} consumer={self.consumer!r}>"

    @property
    def broker(self) -> Link:
        """The connections this subscription uses (the broker that made it)."""
        return self.link

    # -- lifetime -----------------------------------------------------------------------------

    async def __aenter__(self) -> Subscription[T]:
        if self._entered:
            raise ClosedError("a Subscription can be entered once; subscribe again")
        self._entered = True
        streams: list[Stream] = []
        for ch in self.channels:
            streams += await ch.streams()
        self.streams = streams
        calls = GroupCalls(self.link, self.group, streams)
        self._calls = calls
        settler = Settler(self.link, calls, self.consumer, streams, self.dead_maxlen, self._wait)
        ledger: Ledger[T] = Ledger(
            self.link,
            calls,
            settler,
            consumer=self.consumer,
            prefetch=self.prefetch,
            claim_idle=self.claim_idle,
            streams=streams,
        )
        ledger.owner = self
        self._settler, self._ledger = settler, ledger
        self._buffer, self._inflight = ledger.buffer, ledger.inflight
        await self._setup()
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        self._fetch_task = self._tasks.create_task(
            self._guard(self._supervise), name=f"{self!r} readers"
        )
        for name, loop in (
            ("acks", lambda: settler.loop(ledger.room)),
            ("retries", ledger.retry_loop),
            ("keep fresh", ledger.keep_fresh_loop),
        ):
            self._aux.append(self._tasks.create_task(self._guard(loop), name=f"{self!r} {name}"))
        return self

    async def aclose(self) -> None:
        """Stop reading, release what was fetched but not handed out, flush acks. Idempotent.

        Messages handed out and not yet acked stay pending (at-least-once): they are replayed
        when this consumer name subscribes again, or claimed by others after ``claim_idle``.
        """
        if self._closed:
            return
        self._closed = True
        self.stop()
        tasks = self._tasks
        if tasks is None:
            return
        ledger = self._ledger
        assert ledger is not None
        # one budget for the whole close: a stalled server must not hold it once per step
        settings = self.link.settings
        budget = settings.reconnect_deadline + settings.connect_timeout
        try:
            async with asyncio.timeout(budget):
                if self._winding is not None:
                    await asyncio.wait([self._winding])
                for t in self._aux[1:]:  # no more retries or keep-fresh (the ack loop is first)
                    await cancel_and_wait(t)
                if self._error is None:
                    try:
                        # what was nacked or re-claimed for a retry after the stop: release it
                        await ledger.release_unhanded()
                        await self.flush()
                    except BrokerError as exc:
                        log.warning("%r: closing with acks not sent or entries held: %s", self, exc)
        except TimeoutError:
            log.warning(
                "%r: closed without an answer from the server within %.1fs; unsent acks and "
                "unreleased entries stay pending (delivered again: at-least-once)",
                self,
                budget,
            )
        finally:
            if self._winding is not None:
                await cancel_and_wait(self._winding)
            for t in self._aux:
                await cancel_and_wait(t)
            await tasks.__aexit__(None, None, None)
            self._tasks = None
            subscription_closed(self)

    def stop(self) -> None:
        """End the iteration between messages (cooperative; safe from any task).

        Nothing more is handed out; a handler already running may still ack or nack its
        message. Messages fetched but not handed out are released to other consumers at once.
        """
        if self._stopped:
            return
        self._stopped = True
        if self._ledger is not None:
            self._ledger.wake()
            self._ledger.make_room()
        if self._tasks is not None:
            try:
                self._winding = self._tasks.create_task(self._wind_down(), name=f"{self!r} stop")
            except RuntimeError:  # the task group is already shutting down
                self._winding = None

    async def _wind_down(self) -> None:
        """Stop reading, then release what was fetched but not handed out (at once, not at
        close: other consumers can take it while this one finishes its handlers)."""
        if self._fetch_task is not None:
            await cancel_and_wait(self._fetch_task)
        if self._error is not None:
            return  # the server is gone or the group deleted: the entries stay pending
        assert self._ledger is not None
        try:
            await self._ledger.release_unhanded()
        except BrokerError as exc:
            log.warning("%r: could not release fetched messages: %s", self, exc)

    @property
    def stopped(self) -> bool:
        return self._stopped

    # -- iteration ----------------------------------------------------------------------------

    def __aiter__(self) -> Subscription[T]:
        return self

    async def __anext__(self) -> Message[T]:
        while True:
            if self._buffer and not self._stopped:  # the hot path: a message in hand already
                msg: Message[T] = self._buffer.popleft()
                self._inflight[msg] = True
                return msg
            if not self._entered:
                raise ClosedError(
                    "enter the subscription first: `async with ch.subscribe(...) as m`"
                )
            if self._error is not None:
                raise self._error
            if self._stopped:
                raise StopAsyncIteration
            assert self._ledger is not None
            await self._ledger.wait_readable(None)

    def chunks(self, size: int, *, timeout: float | None = None) -> AsyncIterator[list[Message[T]]]:
        """Batches of at most ``size`` messages: emitted when full, or ``timeout`` seconds after
        the batch's first message, or at the end; never empty. Ack a batch with
        ``messages.ack(batch)`` (one ``XACK`` per stream).

        :raises ValueError: if ``size < 1`` or ``timeout <= 0``.
        """
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an int >= 1, got {size!r}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout!r}")
        if size > self.prefetch:
            raise ValueError(
                f"size ({size}) exceeds prefetch ({self.prefetch}); subscribe with prefetch >= size"
            )
        return self._chunks(size, timeout)

    async def _chunks(self, size: int, wait: float | None) -> AsyncIterator[list[Message[T]]]:
        while True:
            try:
                first = await self.__anext__()
            except StopAsyncIteration:
                return
            batch = [first]
            deadline = None if wait is None else time.monotonic() + wait
            try:
                await self._fill(batch, size, deadline)
            except BaseException:
                # cancelled while filling: hand the batch back, in order, as if never taken
                for msg in reversed(batch):
                    if self._inflight.pop(msg, False):
                        self._buffer.appendleft(msg)
                assert self._ledger is not None
                self._ledger.wake(len(self._buffer))  # another reader may be waiting for these
                raise
            yield batch

    async def _fill(self, batch: list[Message[T]], size: int, deadline: float | None) -> None:
        buffer, inflight = self._buffer, self._inflight
        assert self._ledger is not None
        while len(batch) < size:
            if buffer and not self._stopped:
                for _ in range(min(size - len(batch), len(buffer))):
                    msg = buffer.popleft()
                    inflight[msg] = True
                    batch.append(msg)
                continue
            if self._stopped or self._error is not None:
                return
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            try:
                await self._ledger.wait_readable(remaining)
            except TimeoutError:
                return

    async def consume(
        self,
        handler: Callable[[Message[T]], Awaitable[Any]],
        *,
        concurrency: int = 1,
        group_concurrency: int | None = None,
        lease: float = 30.0,
        stop: StopToken | None = None,
    ) -> None:
        """Run ``handler`` on every message with at most ``concurrency`` in flight here and at
        most ``group_concurrency`` across every consumer of the group (a Redis lease semaphore
        whose leases expire ``lease`` seconds after a holder dies). Acks on return, nacks on
        error; returns when the subscription stops (``stop`` token or :meth:`stop`).

        :raises ValueError: on a limit < 1 or lease <= 0.
        """
        from ._consume import run_consumer

        await run_consumer(
            self,
            handler,
            concurrency=concurrency,
            group_concurrency=group_concurrency,
            lease=lease,
            stop=stop,
        )

    # -- settling -----------------------------------------------------------------------------

    def ack(self, messages: Message[T] | Sequence[Message[T]]) -> None:
        """Ack one message or a batch (sent as one ``XACK`` per stream)."""
        settler = self._settler
        if settler is None or self._tasks is None:
            self._check_open()
            if settler is None:
                return
        if isinstance(messages, Message):  # the hot path: msg.ack()
            if self._inflight.pop(messages, False):
                key = messages._stream.key  # type: ignore[union-attr]
                ids = settler.acks.get(key)
                if ids is None:
                    ids = settler.acks[key] = []
                ids.append(messages.id)
                self._acked += 1
                if not settler.kicked:
                    settler.kicked = True
                    settler.wake.set()
                ledger = self._ledger
                if ledger is not None and ledger.parked:  # an acked message makes room
                    ledger.room.set()
            return
        inflight, acks, n = self._inflight, settler.acks, 0
        for msg in messages:
            if not inflight.pop(msg, False):
                continue  # already settled: acking twice is harmless
            key = msg._stream.key  # type: ignore[union-attr]
            ids = acks.get(key)
            if ids is None:
                ids = acks[key] = []
            ids.append(msg.id)
            n += 1
        if n:
            self._acked += n
            settler.kick()
            if self._ledger is not None:
                self._ledger.make_room()

    def nack(
        self,
        message: Message[T],
        *,
        delay: float | None = None,
        error: BaseException | str | None = None,
    ) -> None:
        """Deliver ``message`` again after ``delay`` (default: backoff), or dead-letter it once
        it reached ``max_deliveries``."""
        if delay is not None and delay < 0:
            raise ValueError(f"delay must be >= 0 seconds, got {delay!r}")
        self._check_open()
        ledger, settler = self._ledger, self._settler
        if ledger is None or settler is None or not self._inflight.pop(message, False):
            return
        ledger.nacked += 1
        ledger.per_channel[message.channel][1] += 1
        if message.deliveries >= self.max_deliveries:
            text = _describe(error) or "nacked"
            settler.dead_letter(message, f"{text} (after {message.deliveries} deliveries)")
        else:
            if delay is None:
                delay = min(self.retry_max, self.retry_delay * 2 ** (message.deliveries - 1))
                delay *= random.uniform(0.8, 1.2)
            ledger.schedule_retry(message, delay)
        settler.kick()
        ledger.make_room()

    async def flush(self) -> None:
        """Wait until every ack, nack and dead letter so far reached the server."""
        if self._settler is not None:
            await self._settler.flush(lambda: self._error)

    def statistics(self) -> SubscriptionStatistics:
        ledger, settler = self._ledger, self._settler
        if ledger is None or settler is None:
            return SubscriptionStatistics(*([0] * 12))
        return SubscriptionStatistics(
            buffered=len(ledger.buffer),
            in_flight=len(ledger.inflight),
            retrying=len(ledger.retry),
            pending_acks=settler.pending(),
            delivered=ledger.buffered_total - len(ledger.buffer) - ledger.unhanded,
            acked=self._acked,
            nacked=ledger.nacked,
            dead_lettered=settler.dead_lettered,
            claimed=ledger.claimed,
            released=ledger.released,
            trimmed=settler.trimmed,
            reconnects=self._reconnects + sum(r.reconnects for r in self._readers),
        )

    def channel_statistics(self) -> dict[str, ChannelStatistics]:
        """The counts of :meth:`statistics` for each channel of a merged subscription
        (``acked``: acks that reached the server; the others as in :meth:`statistics`)."""
        ledger, settler = self._ledger, self._settler
        if ledger is None or settler is None:
            return {c.name: ChannelStatistics(*([0] * 10)) for c in self.channels}
        held: dict[str, list[int]] = {name: [0, 0, 0] for name in ledger.per_channel}
        for m in ledger.buffer:
            held[m.channel][0] += 1
        for m in ledger.inflight:
            held[m.channel][1] += 1
        for _, _, m in ledger.retry:
            held[m.channel][2] += 1
        out = {}
        for name, (delivered, nacked, claimed, released) in ledger.per_channel.items():
            acked, dead, trimmed = settler.per_channel[name]
            buffered, in_flight, retrying = held[name]
            out[name] = ChannelStatistics(
                buffered,
                in_flight,
                retrying,
                delivered,
                acked,
                nacked,
                dead,
                claimed,
                released,
                trimmed,
            )
        return out

    # -- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._tasks is None and self._entered:
            raise ClosedError(
                "the subscription is closed: this message stays pending and will be delivered "
                "again (ack inside `async with ... subscribe()`)"
            )

    async def _guard(self, loop: Callable[[], Awaitable[None]]) -> None:
        """Run a loop; its failure is stored and surfaces in the iteration, not in the group."""
        try:
            await loop()
        except Exception as exc:
            if not isinstance(exc, BrokerError):
                log.exception("%r: internal error in %s", self, getattr(loop, "__name__", loop))
                wrapped = BrokerError(f"internal error in the subscription: {exc!r}")
                wrapped.__cause__ = exc
                exc = wrapped
            if self._error is None:
                self._error = exc
            if self._settler is not None:
                self._settler.flushed.set()
            self.stop()

    async def _setup(self) -> None:
        calls = self._calls
        for stream in self.streams:
            await calls.retry(lambda s=stream: self._create_group(s), stream)  # type: ignore[misc]
            await self._prune(stream)

    async def _create_group(self, stream: Stream) -> None:
        try:
            await self.link.redis.xgroup_create(
                stream.key, self.group, id=self.start, mkstream=True
            )
        except Exception as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise

    async def _prune(self, stream: Stream) -> None:
        r = self.link.redis
        idle_ms = int(self.prune_idle * 1000)

        async def prune() -> None:
            for c in await r.xinfo_consumers(stream.key, self.group):
                name = (
                    c["name"].decode(errors="replace")
                    if isinstance(c["name"], bytes)
                    else c["name"]
                )
                if name != self.consumer and int(c["pending"]) == 0 and int(c["idle"]) >= idle_ms:
                    if await PRUNE_CONSUMER(r, [stream.key], [self.group, name, idle_ms]):
                        log.info("pruned idle consumer %s of %s/%s", name, stream.key, self.group)

        await self._calls.call(prune, stream)

    # -- the readers --------------------------------------------------------------------------

    def _read_groups(self) -> list[tuple[Wire, list[Stream]]]:
        """The streams by node: one reader each."""
        return reader_groups(self.link.topology, self.streams)

    async def _supervise(self) -> None:
        """Run a reader per node; regroup them when the cluster's slot
        map changes (a failover, a resharding): the new readers replay this consumer's pending
        entries first, so a regroup loses nothing."""
        assert self._ledger is not None and self._settler is not None
        topology = self.link.topology
        options = ReadOptions(
            self.group,
            self.consumer,
            self.block,
            self.claim_idle,
            self.claim_interval,
            self.max_deliveries,
        )
        backoff = self.link.settings.retry.backoff()
        while not self._stopped:
            try:
                groups = self._read_groups()
            except Exception as exc:  # a slot with no node (a failover under way)
                await backoff.wait(ConnectionLostError(f"cannot route the read: {exc}"))
                await topology.refresh("a slot without a node")
                continue
            backoff.reset()
            share = max(1, -(-self.prefetch // len(groups)))
            self._reconnects += sum(r.reconnects for r in self._readers)
            self._readers = [
                Reader(
                    self.link,
                    self._calls,
                    self._ledger,
                    self._settler,
                    options,
                    wire=wire,
                    streams=streams,
                    share=share,
                    stopped=lambda: self._stopped,
                )
                for wire, streams in groups
            ]
            self._ledger.set_readers(self._readers, share)
            tasks = [asyncio.create_task(r.run(), name=f"{self!r} {r!r}") for r in self._readers]
            changed = asyncio.create_task(topology.wait_changed(), name=f"{self!r} topology")
            try:
                done, _ = await asyncio.wait([*tasks, changed], return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not all(t.done() for t in tasks):
                    self._ledger.read_cancelled = True  # cancelled mid-read, maybe
                await cancel_all([*tasks, changed])
            for t in tasks:
                if t in done and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            if changed not in done:
                return  # the readers ended: the subscription stopped
            log.info("%r: the cluster's slot map changed; regrouping the readers", self)


def _describe(error: BaseException | str | None) -> str:
    if error is None:
        return ""
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    return str(error)
