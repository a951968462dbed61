"""Group consumption: one subscription reads one or more channels as a consumer-group member.

The read loop, in order of priority: first this consumer's own pending entries (``XREADGROUP``
with id ``0``, on start and after every reconnect), then entries that other consumers left
pending for longer than ``claim_idle`` (``XAUTOCLAIM``, every ``claim_interval``), then new ones
(one blocking ``XREADGROUP ... >`` over every channel). Reading stops while the window (buffered
+ in flight + waiting for retry + acks not yet sent) is full, so memory and the pending list stay
bounded by ``prefetch`` (plus at most one entry per extra channel of a multi-channel read).

Acks, dead letters and idle resets leave in batches from one task; closing flushes them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import heapq
import itertools
import logging
import os
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from ._codec import fast_decoder, unpack_headers
from ._errors import (
    BrokerError,
    ClosedError,
    ConfigurationError,
    ConnectionLostError,
    GroupMissingError,
    RedisCommandError,
    map_redis_errors,
)
from ._message import Message
from ._names import check_group, host_label
from ._resource import AsyncResource, cancel_and_wait
from ._retry import no_reply, retrying
from ._scripts import DEAD_LETTER, PRUNE_CONSUMER
from ._wire import bulk, pack, pack_strs

if TYPE_CHECKING:
    from ._broker import Broker
    from ._channel import Channel
    from ._stop import StopToken

__all__ = ["Subscription", "SubscriptionStatistics", "default_consumer_name"]

log = logging.getLogger("broker.subscription")
T = TypeVar("T")
_RELEASE_IDLE_MS = 10**12  # "idle since forever": the next XAUTOCLAIM of any consumer takes it
_Key = tuple[str, str]  # (channel name, entry id)


def default_consumer_name() -> str:
    """``<host>-<pid>``: unique per process. Pass a stable name per worker slot to have a
    restarted process replay its own pending entries at once."""
    return f"{host_label()}-{os.getpid()}"


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


@dataclasses.dataclass(slots=True)
class _DeadOp:
    channel: Channel[Any]
    id: str
    fields: dict[bytes, bytes]
    error: str
    deliveries: int


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
    """

    def __init__(
        self,
        broker: Broker,
        channels: Sequence[Channel[Any]],
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
    ) -> None:
        self.broker = broker
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
        self._by_key = {c.key.encode(): c for c in self.channels}
        self._by_name = {c.name: c for c in self.channels}
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

        self._buffer: collections.deque[Message[T]] = collections.deque()
        #: handed out, not settled; keyed by the message itself (no key tuple per message: a
        #: subscription never has two messages of one entry in hand)
        self._inflight: dict[Message[T], bool] = {}
        self._retry: list[tuple[float, int, Message[T]]] = []
        self._seq = itertools.count()
        self._acks: dict[str, list[str]] = {}
        self._dead: list[_DeadOp] = []
        self._touch: dict[str, set[str]] = {}
        self._sending = 0
        #: acks and dead letters on the wire right now (still held: a replay must skip them)
        self._in_transit: tuple[dict[str, list[str]], list[_DeadOp]] = ({}, [])
        #: entries read by a replay or a claim, not yet buffered (see _release_unhanded)
        self._arriving: set[_Key] = set()
        #: recently reported trimmed entries (bounded), so each is reported once
        self._trimmed: dict[_Key, None] = {}
        self._replay_cursors: dict[str, str] = {}
        self._claim_cursors: dict[str, str] = {}
        #: tasks waiting for a message (in __anext__ or chunks()), woken one per message
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._room = asyncio.Event()
        self._ack_wake = asyncio.Event()
        self._ack_kicked = False  # _ack_wake is set (a plain flag is cheaper on the hot path)
        self._parked = False  # the read loop waits for room
        self._retry_wake = asyncio.Event()
        self._flushed = asyncio.Event()
        self._flushed.set()
        self._error: BaseException | None = None
        self._stopped = False
        self._entered = False
        self._closed = False
        self._read_cancelled = False
        self._tasks: asyncio.TaskGroup | None = None
        self._fetch_task: asyncio.Task[None] | None = None
        self._winding: asyncio.Task[None] | None = None
        self._aux: list[asyncio.Task[None]] = []
        #: delivered = buffered so far - still buffered - dropped from the buffer unhanded
        #: (so the hot path keeps no per-message counter)
        self._buffered_total = 0
        self._unhanded = 0
        self._acked = 0
        self._stats = dict.fromkeys(
            (
                "nacked",
                "dead_lettered",
                "claimed",
                "released",
                "trimmed",
                "reconnects",
            ),
            0,
        )

    def __repr__(self) -> str:
        names = ",".join(c.name for c in self.channels)
        return f"<Subscription {names} group={self.group!r} consumer={self.consumer!r}>"

    # -- lifetime -----------------------------------------------------------------------------

    async def __aenter__(self) -> Subscription[T]:
        if self._entered:
            raise ClosedError("a Subscription can be entered once; subscribe again")
        self._entered = True
        await self._setup()
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        self._fetch_task = self._tasks.create_task(
            self._guard(self._fetch_loop), name=f"{self!r} fetch"
        )
        for loop in (self._ack_loop, self._retry_loop, self._heartbeat_loop):
            self._aux.append(
                self._tasks.create_task(self._guard(loop), name=f"{self!r} {loop.__name__}")
            )
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
        # one budget for the whole close: a stalled server must not hold it once per step
        settings = self.broker.settings
        budget = settings.reconnect_deadline + settings.connect_timeout
        try:
            async with asyncio.timeout(budget):
                if self._winding is not None:
                    await asyncio.wait([self._winding])
                for t in self._aux[1:]:  # no more retries or heartbeats (the ack loop is first)
                    await cancel_and_wait(t)
                if self._error is None:
                    try:
                        # what was nacked or re-claimed for a retry after the stop: release it
                        await self._release_unhanded()
                        await self._drain_acks()
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

    def stop(self) -> None:
        """End the iteration between messages (cooperative; safe from any task).

        Nothing more is handed out; a handler already running may still ack or nack its
        message. Messages fetched but not handed out are released to other consumers at once.
        """
        if self._stopped:
            return
        self._stopped = True
        self._wake()
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
        try:
            await self._release_unhanded()
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
                msg = self._buffer.popleft()
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
            await self._wait_readable(None)

    def chunks(self, size: int, *, timeout: float | None = None) -> AsyncIterator[list[Message[T]]]:
        """Batches of at most ``size`` messages: emitted when full, or ``timeout`` seconds after
        the batch's first message, or at the end; never empty. Ack a batch with
        ``messages.ack(batch)`` (one ``XACK`` per channel).

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
                self._wake(len(self._buffer))  # another reader may be waiting for these
                raise
            yield batch

    async def _fill(self, batch: list[Message[T]], size: int, deadline: float | None) -> None:
        buffer, inflight = self._buffer, self._inflight
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
                await self._wait_readable(remaining)
            except TimeoutError:
                return

    async def _wait_readable(self, seconds: float | None) -> None:
        """Wait until woken by :meth:`_wake` (a message arrived, or the end); TimeoutError
        after ``seconds``."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(seconds):
                await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self._wake(1)  # woken, then cancelled or timed out: the message is not ours
            else:
                fut.cancel()  # _wake skips it
            raise

    def _wake(self, n: int | None = None) -> None:
        """Wake ``n`` waiting readers (one per message that arrived), or all of them."""
        waiters = self._waiters
        while waiters and (n is None or n > 0):
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                if n is not None:
                    n -= 1

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
        """Ack one message or a batch (sent as one ``XACK`` per channel)."""
        if self._tasks is None:
            self._check_open()
        if isinstance(messages, Message):  # the hot path: msg.ack()
            if self._inflight.pop(messages, False):
                ids = self._acks.get(messages.channel)
                if ids is None:
                    ids = self._acks[messages.channel] = []
                ids.append(messages.id)
                self._acked += 1
                if not self._ack_kicked:
                    self._ack_kicked = True
                    self._ack_wake.set()
                if self._parked:  # an acked message makes room
                    self._room.set()
            return
        inflight, acks, n = self._inflight, self._acks, 0
        for msg in messages:
            if not inflight.pop(msg, False):
                continue  # already settled: acking twice is harmless
            ids = acks.get(msg.channel)
            if ids is None:
                ids = acks[msg.channel] = []
            ids.append(msg.id)
            n += 1
        if n:
            self._acked += n
            self._kick()

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
        if not self._inflight.pop(message, False):
            return
        self._stats["nacked"] += 1
        if message.deliveries >= self.max_deliveries:
            text = _describe(error) or "nacked"
            self._dead_letter(message, f"{text} (after {message.deliveries} deliveries)")
        else:
            if delay is None:
                delay = min(self.retry_max, self.retry_delay * 2 ** (message.deliveries - 1))
                delay *= random.uniform(0.8, 1.2)
            # reset the entry's idle time so no other consumer claims it during the delay
            self._touch.setdefault(message.channel, set()).add(message.id)
            heapq.heappush(self._retry, (time.monotonic() + delay, next(self._seq), message))
            self._retry_wake.set()
        self._kick()

    async def flush(self) -> None:
        """Wait until every ack, nack and dead letter so far reached the server."""
        while self._acks or self._dead or self._touch or self._sending:
            if self._error is not None:
                raise self._error
            self._flushed.clear()
            self._ack_wake.set()
            await self._flushed.wait()

    def statistics(self) -> SubscriptionStatistics:
        return SubscriptionStatistics(
            buffered=len(self._buffer),
            in_flight=len(self._inflight),
            retrying=len(self._retry),
            pending_acks=self._pending_acks(),
            delivered=self._buffered_total - len(self._buffer) - self._unhanded,
            acked=self._acked,
            **self._stats,
        )

    # -- internals: accounting ----------------------------------------------------------------

    def _check_open(self) -> None:
        if self._tasks is None and self._entered:
            raise ClosedError(
                "the subscription is closed: this message stays pending and will be delivered "
                "again (ack inside `async with ... subscribe()`)"
            )

    def _pending_acks(self) -> int:
        return sum(map(len, self._acks.values())) + len(self._dead) + self._sending

    def _room_left(self) -> int:
        """Room for more messages: ``prefetch`` minus the messages not yet settled.

        An acked message no longer counts while its ack is on its way (the next read goes out
        next to the ``XACK``, not after it), but unsent acks are bounded too: beyond
        ``prefetch`` of them, reading waits. So at most ``2 * prefetch`` entries of this
        consumer are pending on the server.
        """
        held = len(self._buffer) + len(self._inflight) + len(self._retry) + len(self._dead)
        acks = sum(map(len, self._acks.values())) + self._sending
        return self.prefetch - held - max(0, acks - self.prefetch)

    def _kick(self) -> None:
        if not self._ack_kicked:
            self._ack_kicked = True
            self._ack_wake.set()
        self._room.set()

    def _held(self) -> set[_Key]:
        """Entries this subscription has in hand (a replay after a reconnect skips them)."""
        held = {(m.channel, m.id) for m in self._buffer}
        held.update((m.channel, m.id) for m in self._inflight)
        held.update((m.channel, m.id) for _, _, m in self._retry)
        held.update((name, i) for name, ids in self._acks.items() for i in ids)
        held.update((op.channel.name, op.id) for op in self._dead)
        acks, dead = self._in_transit
        held.update((name, i) for name, ids in acks.items() for i in ids)
        held.update((op.channel.name, op.id) for op in dead)
        return held

    def _note_trimmed(self, ch: Channel[Any], ids: list[str]) -> None:
        for entry_id in ids:
            if (ch.name, entry_id) in self._trimmed:
                continue
            self._trimmed[(ch.name, entry_id)] = None
            if len(self._trimmed) > 1024:
                self._trimmed.pop(next(iter(self._trimmed)))
            self._stats["trimmed"] += 1
            log.warning(
                "%s %s was trimmed while pending; dropped without delivery", ch.name, entry_id
            )

    def _dead_letter(self, msg: Message[Any], error: str) -> None:
        self._dead.append(
            _DeadOp(self._by_name[msg.channel], msg.id, msg.fields, error, msg.deliveries)
        )
        self._stats["dead_lettered"] += 1
        log.warning("dead-lettered %s %s: %s", msg.channel, msg.id, error)

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
            self._flushed.set()
            self.stop()

    async def _call(self, fn: Any, channel: Channel[Any] | None = None) -> Any:
        """One redis call: errors mapped, NOGROUP turned into GroupMissingError."""
        try:
            with map_redis_errors(channel.name if channel else None):
                return await fn()
        except RedisCommandError as exc:
            # NOGROUP: group or stream gone; UNBLOCKED: the stream was deleted under a
            # blocked read (Redis 7)
            if str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                missing = next((c for c in self.channels if f"'{c.key}'" in str(exc)), channel)
                if missing is None:
                    # the answer to a blocked multi-channel read names no key: ask the server
                    missing = await self._channel_without_group()
                raise GroupMissingError(missing.name, self.group) from exc
            raise

    async def _channel_without_group(self) -> Channel[Any]:
        """The first channel whose stream or group is gone (a user recreates the group from
        ``GroupMissingError.channel``); the first channel if none is, or if we cannot tell."""
        r = self.broker.redis
        for ch in self.channels:
            try:
                with map_redis_errors(ch.name):
                    async with asyncio.timeout(self.broker.settings.connect_timeout):
                        groups = await r.xinfo_groups(ch.key)
            except RedisCommandError:  # no such key
                return ch
            except (BrokerError, TimeoutError):
                break
            names = {
                g["name"].decode() if isinstance(g["name"], bytes) else g["name"] for g in groups
            }
            if self.group not in names:
                return ch
        return self.channels[0]

    async def _retry_call(
        self, fn: Callable[[], Awaitable[Any]], ch: Channel[Any] | None = None
    ) -> Any:
        """:meth:`_call`, retried over lost connections until the reconnect deadline."""
        return await retrying(lambda: self._call(fn, ch), self.broker.settings.retry)

    # -- internals: setup ---------------------------------------------------------------------

    async def _setup(self) -> None:
        for ch in self.channels:
            await self._retry_call(functools.partial(self._create_group, ch), ch)
            await self._prune(ch)

    async def _create_group(self, ch: Channel[Any]) -> None:
        try:
            await self.broker.redis.xgroup_create(ch.key, self.group, id=self.start, mkstream=True)
        except Exception as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise

    async def _prune(self, ch: Channel[Any]) -> None:
        r = self.broker.redis
        idle_ms = int(self.prune_idle * 1000)

        async def prune() -> None:
            for c in await r.xinfo_consumers(ch.key, self.group):
                name = (
                    c["name"].decode(errors="replace")
                    if isinstance(c["name"], bytes)
                    else c["name"]
                )
                if name != self.consumer and int(c["pending"]) == 0 and int(c["idle"]) >= idle_ms:
                    if await PRUNE_CONSUMER(r, [ch.key], [self.group, name, idle_ms]):
                        log.info("pruned idle consumer %s of %s/%s", name, ch.name, self.group)

        await self._call(prune, ch)

    # -- internals: the read loop -------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        backoff = self.broker.settings.retry.backoff()
        replay = {c.name for c in self.channels}
        next_claim = 0.0
        while not self._stopped:
            room = self._room_left()
            if room <= 0:
                self._room.clear()
                self._parked = True
                try:
                    await self._room.wait()
                finally:
                    self._parked = False
                continue
            # each step gets what is left of the reconnect deadline: a stalled server (which
            # still accepts connections) must not hold it longer
            started = time.monotonic()
            limit = backoff.limit()
            try:
                if replay:
                    async with _bounded(limit):
                        await self._replay(replay, room)
                elif started >= next_claim:
                    async with _bounded(limit):
                        await self._claim(room)
                    next_claim = time.monotonic() + self.claim_interval
                else:
                    started += self.block  # the server may hold a blocking read this long
                    await self._read_new(room, limit)
                backoff.reset()
                if self._buffer and self._waiters:
                    # let the waiting reader take what just arrived before the next read is
                    # sent: sending first would add its system calls to every message's latency
                    await asyncio.sleep(0)
            except ConnectionLostError as exc:
                if backoff.since is None:
                    self._stats["reconnects"] += 1
                await backoff.wait(exc, started)
                # a reply lost with the connection may have moved entries to our pending list
                replay = {c.name for c in self.channels}

    async def _replay(self, replay: set[str], room: int) -> None:
        """One page of this consumer's own pending entries per channel still replaying."""
        cursors = self._replay_cursors
        chans = [self._by_name[n] for n in sorted(replay)]
        streams = {c.key: cursors.get(c.name, "0") for c in chans}
        # COUNT is per stream: share the room so a replay over many channels stays bounded
        per_stream = max(1, -(-room // len(chans)))
        self._read_cancelled = True  # a cancel mid-call may leave entries we never saw
        reply = await self._call(lambda: self._xreadgroup(streams, per_stream, None))
        self._read_cancelled = False
        got: dict[str, list[Any]] = {c.name: [] for c in chans}
        for key, entries in reply or []:
            got[self._by_key[key].name] = entries
        for ch in chans:
            entries = got[ch.name]
            if not entries:
                replay.discard(ch.name)
                cursors.pop(ch.name, None)
                continue
            cursors[ch.name] = entries[-1][0].decode()
            await self._ingest(ch, entries, counted=True)

    async def _claim(self, room: int) -> None:
        idle_ms = int(self.claim_idle * 1000)
        for ch in self.channels:
            if room <= 0:
                return
            room -= await self._claim_one(ch, room, idle_ms)

    async def _claim_one(self, ch: Channel[Any], room: int, idle_ms: int) -> int:
        r = self.broker.redis
        cursors = self._claim_cursors
        self._read_cancelled = True  # a cancel mid-call may leave entries we never saw
        reply = await self._call(
            lambda: r.xautoclaim(
                ch.key, self.group, self.consumer, idle_ms, cursors.get(ch.name, "0-0"), count=room
            ),
            ch,
        )
        self._read_cancelled = False
        cursors[ch.name] = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
        entries = [e for e in reply[1] if e[0] is not None]
        if len(reply) > 2 and reply[2]:
            # Redis 7 drops trimmed entries from the pending list while it scans
            fresh = [i.decode() for i in reply[2] if (ch.name, i.decode()) not in self._trimmed]
            self._note_trimmed(ch, fresh)
        if entries:
            self._stats["claimed"] += len(entries)
            await self._ingest(ch, entries, counted=True)
        return len(entries)

    async def _read_new(self, room: int, limit: float | None = None) -> None:
        per_stream = max(1, -(-room // len(self.channels)))
        streams = {c.key: ">" for c in self.channels}
        self._read_cancelled = True  # cleared below unless the read is cancelled midway
        reply = await self._call(lambda: self._xreadgroup(streams, per_stream, self.block, limit))
        self._read_cancelled = False
        for key, entries in reply:
            await self._ingest(self._by_key[key], entries, counted=False)

    async def _xreadgroup(
        self, streams: dict[str, str], count: int, block: float | None, limit: float | None = None
    ) -> list[tuple[bytes, list[Any]]]:
        """``XREADGROUP`` as the server sends it: ``[(key, [[id, [field, value, ...]]])]``
        (fields ``None`` for an entry deleted while pending); RESP2 or RESP3."""
        args: list[bytes | str | int] = [b"XREADGROUP", b"GROUP", self.group, self.consumer]
        args += [b"COUNT", count]
        if block is not None:
            args += [b"BLOCK", int(block * 1000)]
        args += [b"STREAMS", *streams, *streams.values()]
        wait = block or 0.0
        (reply,) = await self.broker.wire.execute(pack(*args), 1, wait=wait, limit=limit)
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(reply, dict):  # RESP3 (redis-py's default protocol since 8.0) sends a map
            return list(reply.items())
        return reply or []

    async def _ingest(self, ch: Channel[Any], entries: list[Any], *, counted: bool) -> None:
        """Turn entries into messages; trimmed, poison and over-delivered ones are settled here.

        ``entries`` are ``(id, fields)`` with fields a dict, a flat ``[field, value, ...]`` list
        as the server sends it, or empty/None for an entry deleted while pending.
        """
        if not counted:  # new entries: delivered for the first time, never held
            buffer, before, bad = self._buffer, len(self._buffer), False
            for raw_id, fields in entries:
                msg = decode_entry(ch, raw_id.decode(), fields, 1, self)
                if msg.error is None and fields:
                    buffer.append(msg)
                else:
                    bad = True
                    self._settle_bad(ch, msg)
            self._buffered_total += len(buffer) - before
            if bad:
                self._kick()
            if buffer:
                self._wake(len(buffer))
            return
        held = self._held()
        counts: dict[str, int] = {}
        if counted and entries:
            # until they are buffered, a cancel (a stop) must still find these to release them
            self._arriving = {(ch.name, e[0].decode()) for e in entries}
            rows = await self._pending_rows(ch, [e[0] for e in entries])
            counts = {i: int(row["times_delivered"]) for i, row in rows.items()}
        for raw_id, fields in entries:
            entry_id = raw_id.decode()
            if (ch.name, entry_id) in held:
                continue
            if not fields:  # trimmed (or deleted) while pending: nothing left to deliver
                self._acks.setdefault(ch.name, []).append(entry_id)
                self._note_trimmed(ch, [entry_id])
                continue
            msg = decode_entry(ch, entry_id, fields, counts.get(entry_id, 1), self)
            if msg.error is not None:
                self._dead_letter(msg, msg.error)
            elif msg.deliveries > self.max_deliveries:
                self._dead_letter(msg, f"delivered {msg.deliveries} times without an ack")
            else:
                self._buffer.append(msg)
                self._buffered_total += 1
        self._arriving = set()
        self._kick()
        if self._buffer:
            self._wake(len(self._buffer))

    async def _pending_rows(self, ch: Channel[Any], ids: list[Any]) -> dict[str, Any]:
        """The pending-list row (owner, delivery count) of each entry, in one round trip."""
        r = self.broker.redis

        async def fetch() -> list[Any]:
            pipe = r.pipeline(transaction=False)
            for entry_id in ids:
                pipe.xpending_range(ch.key, self.group, min=entry_id, max=entry_id, count=1)
            return list(await pipe.execute())

        return {
            row["message_id"].decode(): row for rows in await self._call(fetch, ch) for row in rows
        }

    def _settle_bad(self, ch: Channel[Any], msg: Message[Any]) -> None:
        """A new entry that cannot be handed out: trimmed already, or undecodable."""
        if msg.error is not None:
            self._dead_letter(msg, msg.error)
        else:  # deleted before we read it: nothing left to deliver
            self._acks.setdefault(ch.name, []).append(msg.id)
            self._note_trimmed(ch, [msg.id])

    # -- internals: settling loops ------------------------------------------------------------

    async def _ack_loop(self) -> None:
        while True:
            await self._ack_wake.wait()
            self._ack_wake.clear()
            self._ack_kicked = False
            await self._send_settlements()
            if not (self._acks or self._dead or self._touch):
                self._flushed.set()

    async def _send_settlements(self) -> None:
        acks, self._acks = self._acks, {}
        dead, self._dead = self._dead, []
        touch, self._touch = self._touch, {}
        if not (acks or dead or touch):
            return
        self._sending = sum(map(len, acks.values())) + len(dead)
        self._in_transit = (acks, dead)
        r = self.broker.redis
        group = bulk(self.group.encode())
        parts = [
            b"*%d\r\n$4\r\nXACK\r\n%b%b%b"
            % (3 + len(ids), bulk(self._by_name[name].key.encode()), group, pack_strs(ids))
            for name, ids in acks.items()
        ]
        parts += [
            pack(b"XCLAIM", self._by_name[name].key, self.group, self.consumer, 0, *tids, b"JUSTID")
            for name, tids in touch.items()
        ]
        payload = b"".join(parts)

        async def send() -> None:
            if parts:
                for reply in await self.broker.wire.execute(payload, len(parts)):
                    if isinstance(reply, BaseException):
                        raise reply
            while dead:
                op = dead[0]
                await DEAD_LETTER(r, [op.channel.key, op.channel.dead_key], _dead_args(self, op))
                dead.pop(0)

        try:
            await self._retry_call(send)
        finally:
            self._sending = 0
            self._in_transit = ({}, [])
            self._room.set()

    async def _drain_acks(self) -> None:
        await self.flush()

    async def _retry_loop(self) -> None:
        r = self.broker.redis
        while True:
            if not self._retry:
                self._retry_wake.clear()
                await self._retry_wake.wait()
                continue
            wait = self._retry[0][0] - time.monotonic()
            if wait > 0:
                self._retry_wake.clear()
                try:
                    async with asyncio.timeout(wait):
                        await self._retry_wake.wait()
                except TimeoutError:
                    pass
                continue
            due: dict[str, list[Message[T]]] = {}
            while self._retry and self._retry[0][0] <= time.monotonic():
                msg = heapq.heappop(self._retry)[2]
                due.setdefault(msg.channel, []).append(msg)
            for name, msgs in due.items():
                ch = self._by_name[name]
                rows = await self._retry_call(
                    functools.partial(self._pending_rows, ch, [m.id for m in msgs]), ch
                )
                # only entries still ours: one claimed by another consumer meanwhile is theirs
                ids = [m.id for m in msgs if m.id in rows and _owner(rows[m.id]) == self.consumer]
                if not ids:
                    continue
                claim = functools.partial(r.xclaim, ch.key, self.group, self.consumer, 0, ids)
                entries = await self._retry_call(claim, ch)
                prior = {m.id: m.deliveries for m in msgs}
                # Redis 7 drops an entry deleted (trimmed) meanwhile from the pending list when
                # XCLAIM meets it and returns nothing for it: it was ours a moment ago, so it
                # is gone, not claimed by another consumer
                returned = {e[0].decode() for e in entries}
                self._note_trimmed(ch, [i for i in ids if i not in returned])
                for raw_id, fields in entries:
                    entry_id = raw_id.decode()
                    if not fields:
                        self._acks.setdefault(name, []).append(entry_id)
                        self._note_trimmed(ch, [entry_id])
                        continue
                    msg = decode_entry(ch, entry_id, fields, prior.get(entry_id, 0) + 1, self)
                    if msg.error is not None:
                        self._dead_letter(msg, msg.error)
                    else:
                        self._buffer.append(msg)
                        self._buffered_total += 1
                self._kick()
                self._wake(len(self._buffer))

    async def _heartbeat_loop(self) -> None:
        """Keep held entries (buffered, in handlers, waiting for retry) from looking idle to
        other consumers, so a slow handler's or a waiting read-ahead's entry is not claimed."""
        period = self.claim_idle / 3
        while True:
            await asyncio.sleep(period)
            held: dict[str, list[str]] = {}
            for m in itertools.chain(self._buffer, self._inflight, (m for _, _, m in self._retry)):
                held.setdefault(m.channel, []).append(m.id)
            for name, ids in held.items():
                # touch only what is still ours: after a stall another consumer may have
                # claimed an entry, and a blind XCLAIM would take it back from under it
                try:
                    rows = await self._pending_rows(self._by_name[name], ids)
                except ConnectionLostError:
                    continue  # best effort: the read loop owns reconnecting
                owners = {i: _owner(row) for i, row in rows.items()}
                lost = [i for i in ids if owners.get(i) != self.consumer]
                if lost:
                    log.warning(
                        "%r: %d held entries of %s were claimed by other consumers meanwhile "
                        "(this process stalled for longer than claim_idle)",
                        self,
                        len(lost),
                        name,
                    )
                self._touch.setdefault(name, set()).update(
                    i for i in ids if owners.get(i) == self.consumer
                )
            if self._touch:
                self._ack_wake.set()

    async def _own_pending(self, ch: Channel[Any]) -> list[Any]:
        """This consumer's pending entries on ``ch`` (up to a bounded number of pages)."""
        r = self.broker.redis
        rows: list[Any] = []
        start = "-"
        for _ in range(_SCAN_PAGES):
            page = await self._retry_call(
                functools.partial(
                    r.xpending_range,
                    ch.key,
                    self.group,
                    min=start,
                    max="+",
                    count=_SCAN_PAGE,
                    consumername=self.consumer,
                ),
                ch,
            )
            rows += page
            if len(page) < _SCAN_PAGE:
                break
            start = "(" + page[-1]["message_id"].decode()
        return rows

    async def _release_unhanded(self) -> None:
        """Make fetched-but-not-handed-out entries claimable by other consumers at once."""
        by_channel: dict[str, dict[str, int]] = {}
        for msg in itertools.chain(self._buffer, (m for _, _, m in self._retry)):
            by_channel.setdefault(msg.channel, {})[msg.id] = msg.deliveries - 1
        self._unhanded += len(self._buffer)
        self._buffer.clear()
        self._retry.clear()
        r = self.broker.redis
        if self._read_cancelled or self._arriving:
            # a read, claim or replay cancelled midway may have left entries in our pending
            # list that we never saw: release every one we do not hold (bounded scan)
            keep = {(m.channel, m.id) for m in self._inflight}
            keep |= {(n, i) for n, ids in self._acks.items() for i in ids}
            for ch in self.channels:
                for row in await self._own_pending(ch):
                    entry_id = row["message_id"].decode()
                    released = row["time_since_delivered"] >= _RELEASE_IDLE_MS // 2
                    if (ch.name, entry_id) in keep or released:
                        continue  # in a handler, or released already
                    retries = int(row["times_delivered"]) - 1
                    by_channel.setdefault(ch.name, {}).setdefault(entry_id, retries)
            self._read_cancelled = False
            self._arriving = set()
        if not any(by_channel.values()):
            return

        async def release() -> None:
            pipe = r.pipeline(transaction=False)
            for name, ids in by_channel.items():
                key = self._by_name[name].key
                for retries, group_ids in _group_by_value(ids).items():
                    pipe.xclaim(
                        key,
                        self.group,
                        self.consumer,
                        0,
                        group_ids,
                        idle=_RELEASE_IDLE_MS,
                        retrycount=max(0, retries),
                        justid=True,
                    )
            await pipe.execute()

        await self._retry_call(release)
        self._stats["released"] += sum(map(len, by_channel.values()))


_SCAN_PAGE = 200
_SCAN_PAGES = 10


@contextlib.asynccontextmanager
async def _bounded(limit: float) -> AsyncIterator[None]:
    """``asyncio.timeout(limit)``, its expiry reported as a lost connection (a stall)."""
    try:
        async with asyncio.timeout(limit):
            yield
    except TimeoutError:
        raise no_reply(limit) from None


def decode_entry(
    ch: Channel[Any],
    entry_id: str,
    fields: dict[bytes, bytes] | list[bytes] | None,
    deliveries: int = 1,
    subscription: Subscription[Any] | None = None,
) -> Message[Any]:
    """Build a message from raw fields (a dict, or the server's flat list); a decode failure is
    reported in ``message.error``."""
    if isinstance(fields, list):
        if len(fields) == 2 and fields[0] == b"d":  # what publish() writes: the fast path
            payload = fields[1]
            if len(payload) <= ch.broker.settings.max_payload:
                try:
                    data = fast_decoder(ch.codec)(payload)
                except Exception:  # the general path below reports it
                    pass
                else:
                    return Message(
                        entry_id,
                        ch.name,
                        data,
                        {},
                        deliveries,
                        False,
                        None,
                        {b"d": payload},
                        subscription,
                    )
        fields = dict(zip(fields[::2], fields[1::2], strict=False))
    return _decode_fields(ch, entry_id, fields or {}, deliveries, subscription)


def _decode_fields(
    ch: Channel[Any],
    entry_id: str,
    fields: dict[bytes, bytes],
    deliveries: int,
    subscription: Subscription[Any] | None,
) -> Message[Any]:
    payload = fields.get(b"d")
    if payload is None:
        data: Any = {k.decode(errors="replace"): _maybe_text(v) for k, v in fields.items()}
        return Message(entry_id, ch.name, data, {}, deliveries, True, None, fields, subscription)
    try:
        if len(payload) > ch.broker.settings.max_payload:
            raise ValueError(
                f"payload of {len(payload)} bytes exceeds max_payload "
                f"({ch.broker.settings.max_payload})"
            )
        data = ch.codec.decode(payload)
        headers = unpack_headers(fields.get(b"h"))
    except Exception as exc:  # a codec may raise anything on hostile input (RecursionError...)
        return Message(
            entry_id,
            ch.name,
            None,
            {},
            deliveries,
            False,
            f"{ch.codec.name}: {exc}",
            fields,
            subscription,
        )
    return Message(entry_id, ch.name, data, headers, deliveries, False, None, fields, subscription)


def _owner(row: Any) -> str:
    consumer = row["consumer"]
    return consumer.decode() if isinstance(consumer, bytes) else str(consumer)


def _maybe_text(value: bytes) -> str | bytes:
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value


def _describe(error: BaseException | str | None) -> str:
    if error is None:
        return ""
    if isinstance(error, BaseException):
        return f"{type(error).__name__}: {error}"
    return str(error)


def _dead_args(sub: Subscription[Any], op: _DeadOp) -> list[Any]:
    args: list[Any] = [sub.group, op.id, sub.dead_maxlen]
    for k, v in op.fields.items():
        args += [k, v]
    args += [
        b"dead.id",
        op.id,
        b"dead.channel",
        op.channel.name,
        b"dead.group",
        sub.group,
        b"dead.consumer",
        sub.consumer,
        b"dead.error",
        op.error[:4096],
        b"dead.deliveries",
        str(op.deliveries),
    ]
    return args


def _group_by_value(ids: dict[str, int]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for entry_id, value in ids.items():
        out.setdefault(value, []).append(entry_id)
    return out
