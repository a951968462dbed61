"""The broker's pub/sub hub: one connection per node and one reader task per connection, shared
by every listener of a broker (stop tokens, read doorbells, watched values).

On one server it uses ``SUBSCRIBE``/``PUBLISH``. On a cluster it uses sharded pub/sub
(``SSUBSCRIBE``/``SPUBLISH``): a shard channel lives on the node that owns its hash slot, so a
channel named with a key's hash tag (``ns:{orders}``) is served by that key's node, and the hub
keeps a connection to each node that serves one of its channels. When the slot map changes
(a failover, a resharding) or a node drops a subscription (``sunsubscribe`` after its slot
moved), the hub subscribes on the new node. Behind Sentinel, when the master moves, every
connection is dropped and made again (to the new master), as after a lost connection.

Pub/sub is at-most-once: a message published while a connection was down is lost. So every
listener says what to do after a gap (``on_gap``: re-read the state the messages describe),
and the hub calls it after every reconnect and every move. A connection that stalls (a partition
raises no error) is detected by a ``PING`` that gets no ``PONG`` in time.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from redis.asyncio.client import PubSub
from redis.asyncio.connection import ConnectionPool

from ._errors import (
    BrokerError,
    ClosedError,
    ConnectionLostError,
    PermissionDeniedError,
    RedisCommandError,
    map_redis_errors,
)
from ._resource import cancel_and_wait
from ._retry import Backoff
from ._topology import Link, slot_of

__all__ = ["CHECK_INTERVAL", "PONG_DEADLINE", "Hub", "Listener"]

log = logging.getLogger("broker.pubsub")
#: seconds between PINGs on an idle connection, and the PONG deadline
CHECK_INTERVAL = 2.0
PONG_DEADLINE = 5.0


@dataclasses.dataclass(eq=False)
class Listener:
    """A registration on ``channel``: ``on_message(data)`` for each message; ``on_gap()``
    (a coroutine) after a reconnect or a move, when messages may have been lost."""

    channel: str
    on_message: Callable[[bytes], None]
    on_gap: Callable[[], Awaitable[None]] | None = None


class Hub:
    """See the module. ``spawn(coro, name)`` starts a task owned by the broker."""

    def __init__(
        self,
        link: Link,
        spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]],
    ) -> None:
        self.link = link
        self.sharded = link.topology.single is None
        self._spawn = spawn
        self._lines: dict[str, _Line] = {}
        #: channel -> its listeners
        self._listeners: dict[str, set[Listener]] = {}
        self._home: dict[str, _Line] = {}
        self._lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        self.reconnects = 0

    # -- listening ----------------------------------------------------------------------------

    async def add(self, listener: Listener) -> None:
        """Register ``listener``; returns once the server confirmed the subscription.

        :raises PermissionDeniedError: if the user may not subscribe to the channel (nothing
            else of the hub or the broker stops).
        :raises ConnectionLostError: if no node answers before the reconnect deadline.
        """
        await self.add_many([listener])

    async def add_many(self, listeners: list[Listener]) -> None:
        """Register ``listeners`` together: the subscriptions of each node leave in one round
        trip (one command per slot on a cluster) before the confirmations are awaited."""
        async with self._lock:
            if self._watcher is None and (self.sharded or self.link.topology.sentinel):
                self._watcher = self._spawn(self._follow_topology(), "broker-pubsub-topology")
            new: dict[_Line, list[str]] = {}
            for listener in listeners:
                channel = listener.channel
                self._listeners.setdefault(channel, set()).add(listener)
                if channel not in self._home and channel not in new.get(
                    self._line_for(channel), []
                ):
                    new.setdefault(self._line_for(channel), []).append(channel)
            try:
                for line, channels in new.items():
                    await line.subscribe(channels)
                    for channel in channels:
                        self._home[channel] = line
            except BaseException:
                # refused (or cancelled): these are not subscribed; forget them quietly
                for listener in listeners:
                    held = self._listeners.get(listener.channel)
                    if held is not None and listener.channel not in self._home:
                        held.discard(listener)
                        if not held:
                            del self._listeners[listener.channel]
                raise

    async def remove(self, listener: Listener) -> None:
        """Unregister ``listener``; the channel is unsubscribed with its last listener."""
        await self.remove_many([listener])

    async def remove_many(self, listeners: list[Listener]) -> None:
        """Unregister ``listeners``. The bookkeeping is done first: an unsubscribe that does
        not reach the server (a cancel, a lost connection) leaves a channel without listeners,
        which is harmless."""
        gone: dict[_Line, list[str]] = {}
        for listener in listeners:
            channel = listener.channel
            held = self._listeners.get(channel)
            if not held:
                continue
            held.discard(listener)
            if held:
                continue
            del self._listeners[channel]
            line = self._home.pop(channel, None)
            if line is not None:
                gone.setdefault(line, []).append(channel)
        for line, channels in gone.items():
            await line.unsubscribe_many(channels)

    def listening(self, channel: str) -> bool:
        return channel in self._home

    # -- publishing ---------------------------------------------------------------------------

    def publish_command(self) -> str:
        """``SPUBLISH`` on a cluster, ``PUBLISH`` on one server."""
        return "SPUBLISH" if self.sharded else "PUBLISH"

    # -- internals ----------------------------------------------------------------------------

    def _line_for(self, channel: str) -> _Line:
        topology = self.link.topology
        wire = topology.single if topology.single is not None else topology.wire_for(channel)
        assert wire is not None
        line = self._lines.get(wire.name)
        if line is None:
            line = self._lines[wire.name] = _Line(self, wire.name, wire.pool.connection_kwargs,
                                                  wire.pool.connection_class)  # fmt: skip
        return line

    def _dispatch(self, channel: str, data: bytes) -> None:
        for listener in list(self._listeners.get(channel, ())):
            try:
                listener.on_message(data)
            except Exception:  # one bad listener must not keep the others from running
                log.exception("pub/sub listener of %s failed", channel)

    async def _gap(self, channels: list[str]) -> None:
        """Tell the listeners of ``channels`` that messages may have been lost."""
        for channel in channels:
            for listener in list(self._listeners.get(channel, ())):
                if listener.on_gap is not None:
                    try:
                        await listener.on_gap()
                    except BrokerError as exc:
                        log.debug("pub/sub: re-reading %s after a gap failed: %s", channel, exc)
                    except Exception:
                        log.exception("pub/sub: re-reading %s after a gap failed", channel)

    async def _moved(self, channels: list[str], reason: str) -> None:
        """Subscribe ``channels`` on the node that serves them now (a slot moved)."""
        async with self._lock:
            for channel in channels:
                old = self._home.pop(channel, None)
                if old is not None:
                    await old.unsubscribe(channel)
                if channel not in self._listeners:
                    continue
                try:
                    line = self._line_for(channel)
                    await line.subscribe([channel])
                except BrokerError as exc:
                    log.error("pub/sub: cannot follow %s to its new node (%s)", channel, exc)
                    continue
                self._home[channel] = line
        log.info("pub/sub: %d channel(s) followed their slot (%s)", len(channels), reason)
        await self._gap(channels)

    async def _follow_topology(self) -> None:
        """On a cluster: move the channels whose slot changed node. Behind Sentinel: the master
        moved (the old one may still be up, but no longer gets the publishes): reconnect."""
        topology = self.link.topology
        while True:
            await topology.wait_changed()
            if not self.sharded:
                for line in list(self._lines.values()):
                    await line.drop("the master moved")
                continue
            moved = [
                c for c, line in list(self._home.items()) if topology.wire_for(c).name != line.name
            ]
            if moved:
                await self._moved(moved, "the slot map changed")

    async def aclose(self) -> None:
        if self._watcher is not None:
            await cancel_and_wait(self._watcher)
            self._watcher = None
        for line in list(self._lines.values()):
            await line.aclose()
        self._lines.clear()
        self._home.clear()


class _Line:
    """One pub/sub connection (to one node) and the task that reads it."""

    def __init__(self, hub: Hub, name: str, kwargs: dict[str, Any], connection_class: Any) -> None:
        self.hub = hub
        self.name = name
        self._kwargs = {**kwargs, "socket_timeout": None}
        self._connection_class = connection_class
        self._pool: ConnectionPool | None = None
        self._pubsub: Any = None
        self.channels: set[str] = set()
        self._confirmed: dict[str, asyncio.Event] = {}
        #: channels of each SUBSCRIBE sent and not yet answered, oldest first: an error reply
        #: (a NOPERM, say) answers the oldest one, and names no channel
        self._awaiting: collections.deque[list[str]] = collections.deque()
        self._refused: dict[str, BrokerError] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        sharded = hub.sharded
        self._sub = "ssubscribe" if sharded else "subscribe"
        self._unsub = "sunsubscribe" if sharded else "unsubscribe"
        self._kind_message = "smessage" if sharded else "message"

    def __repr__(self) -> str:
        return f"<pub/sub line to {self.name}>"

    def _open(self) -> Any:
        if self._pool is None:
            self._pool = ConnectionPool(connection_class=self._connection_class, **self._kwargs)
        return PubSub(connection_pool=self._pool)

    def _commands(self, channels: list[str]) -> list[list[str]]:
        """The channels of one subscribe command each: all at once on one server; one slot
        per command with sharded pub/sub (Redis refuses ``SSUBSCRIBE`` across slots)."""
        if not self.hub.sharded:
            return [channels]
        by_slot: dict[int, list[str]] = {}
        for channel in channels:
            by_slot.setdefault(slot_of(channel), []).append(channel)
        return list(by_slot.values())

    async def subscribe(self, channels: list[str]) -> None:
        """Subscribe and wait for the server's confirmations (read by the reader task)."""
        if self._task is None:
            self._task = self.hub._spawn(self._reader(), f"broker-pubsub {self.name}")
        settings = self.hub.link.settings
        backoff = settings.retry.backoff()
        while True:
            # fresh events: one set by an earlier (refused) attempt must not confirm this one
            events = {c: asyncio.Event() for c in channels}
            self._confirmed.update(events)
            try:
                with map_redis_errors():
                    if self._pubsub is None:
                        self._pubsub = self._open()
                    for command in self._commands(channels):
                        self._awaiting.append(list(command))
                        await getattr(self._pubsub, self._sub)(*command)
                self._wake.set()
                async with asyncio.timeout(settings.connect_timeout):
                    for ev in events.values():
                        await ev.wait()
                refused = [self._refused.pop(c) for c in channels if c in self._refused]
                if refused:
                    for c in channels:
                        self._confirmed.pop(c, None)
                    raise refused[0]
                self.channels.update(channels)
                return
            except (ConnectionLostError, TimeoutError) as exc:
                await self._reset()
                await backoff.wait(
                    exc
                    if isinstance(exc, ConnectionLostError)
                    else ConnectionLostError(f"no subscribe confirmation from {self.name}")
                )

    async def drop(self, reason: str) -> None:
        """Close the connection under the reader: it reconnects (where the server is now),
        resubscribes and tells the listeners about the gap, as after a lost connection."""
        connection = getattr(self._pubsub, "connection", None)
        if connection is not None:
            log.info("pub/sub %s: reconnecting (%s)", self.name, reason)
            try:
                await connection.disconnect()
            except Exception as exc:  # closing a broken connection: it is dropped anyway
                log.debug("pub/sub %s: closing failed (%s)", self.name, exc)

    async def unsubscribe(self, channel: str) -> None:
        await self.unsubscribe_many([channel])

    async def unsubscribe_many(self, channels: list[str]) -> None:
        for channel in channels:
            self.channels.discard(channel)
            self._confirmed.pop(channel, None)
        if self._pubsub is not None:
            try:
                with map_redis_errors():
                    for command in self._commands(channels):
                        await getattr(self._pubsub, self._unsub)(*command)
            except BrokerError:
                pass  # the reader resubscribes only to the channels still registered

    async def _reset(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        self._awaiting.clear()
        for ev in self._confirmed.values():
            ev.clear()
        if pubsub is not None:
            try:
                await pubsub.aclose()
            except Exception:  # a broken connection may fail to close; it is dropped anyway
                pass

    def _answered(self, channel: str) -> None:
        for channels in self._awaiting:
            if channel in channels:
                channels.remove(channel)
                break
        while self._awaiting and not self._awaiting[0]:
            self._awaiting.popleft()

    def _refuse(self, exc: BrokerError) -> None:
        if not self._awaiting:
            log.warning("pub/sub %s: the server answered with an error: %s", self.name, exc)
            return
        for channel in self._awaiting.popleft():
            self._refused[channel] = exc
            ev = self._confirmed.get(channel)
            if ev is not None:
                ev.set()

    async def _reader(self) -> None:
        """Dispatch messages; detect a stalled connection; resubscribe after a loss.

        Every ``CHECK_INTERVAL`` the reader PINGs (a partition that stalls TCP raises no error:
        without a PONG in ``PONG_DEADLINE`` it reconnects).
        """
        settings = self.hub.link.settings
        backoff = settings.retry.backoff()
        last_ping = time.monotonic()
        ping_sent: float | None = None
        while True:
            pubsub = self._pubsub
            if pubsub is None:  # nothing subscribed yet, or reset: wait for a subscribe
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                now = time.monotonic()
                if ping_sent is not None and now - ping_sent > PONG_DEADLINE:
                    raise ConnectionLostError(
                        f"pub/sub connection to {self.name} stalled (no PONG in {PONG_DEADLINE:g}s)"
                    )
                if ping_sent is None and now - last_ping >= CHECK_INTERVAL:
                    last_ping = now
                    with map_redis_errors():
                        await pubsub.ping()
                    ping_sent = now
                with map_redis_errors():
                    msg = await pubsub.get_message(timeout=1.0)
                backoff.reset()
            except (PermissionDeniedError, RedisCommandError) as exc:
                # an error reply on a healthy connection: it answers the oldest SUBSCRIBE not
                # yet confirmed, whose registration raises it; nothing else stops
                self._refuse(exc)
                continue
            except ConnectionLostError as exc:
                ping_sent = None
                if self._pubsub is not pubsub:
                    continue
                self.hub.reconnects += 1
                log.warning("pub/sub connection to %s lost (%s); reconnecting", self.name, exc)
                await self._reset()
                try:
                    await self._recover(backoff, exc)
                except ClosedError:  # the broker closed while this line was reconnecting
                    return
                continue
            except RuntimeError:  # the connection was closed under us by unsubscribe/reset
                await asyncio.sleep(0)
                continue
            if msg is None:
                continue
            kind = _text(msg.get("type"))
            if kind == "pong":
                ping_sent = None
                continue
            channel = _text(msg["channel"])
            if kind == self._kind_message:
                self.hub._dispatch(channel, msg["data"])
            elif kind == self._sub:
                self._answered(channel)
                ev = self._confirmed.get(channel)
                if ev is not None:
                    ev.set()
            elif kind == "sunsubscribe" and channel in self.channels:
                # the server dropped it: its slot moved to another node
                self.channels.discard(channel)
                await self.hub.link.topology.refresh(f"{channel} moved away from {self.name}")
                await self.hub._moved([channel], f"{self.name} dropped it")

    async def _recover(self, backoff: Backoff, exc: ConnectionLostError) -> None:
        """Resubscribe everything, then tell the listeners: messages may have been lost."""
        while self.channels:
            try:
                await backoff.wait(exc)
            except ConnectionLostError as gone:
                # a hub has no caller to raise to: keep trying, at the backoff's cap
                log.error("pub/sub %s: %s; still retrying", self.name, gone)
                backoff.reset()
                backoff.attempt = 10
                continue
            if self.hub.sharded:
                # the node may be gone for good (a failover): follow the channels' slots
                await self.hub.link.topology.refresh(f"pub/sub connection to {self.name} lost")
                topology = self.hub.link.topology
                gone_away = [c for c in self.channels if topology.wire_for(c).name != self.name]
                if gone_away:
                    self.channels.difference_update(gone_away)
                    await self.hub._moved(gone_away, f"{self.name} is no longer their node")
                    if not self.channels:
                        return
            channels = list(self.channels)
            try:
                with map_redis_errors():
                    self._pubsub = self._open()
                    for command in self._commands(channels):
                        await getattr(self._pubsub, self._sub)(*command)
                    # read the confirmations here: the reader is this task
                    confirmed: set[str] = set()
                    async with asyncio.timeout(self.hub.link.settings.connect_timeout):
                        while confirmed != set(channels):
                            msg = await self._pubsub.get_message(timeout=1.0)
                            if not msg:
                                continue
                            kind = _text(msg.get("type"))
                            if kind == self._sub:
                                confirmed.add(_text(msg["channel"]))
                            elif kind == self._kind_message:
                                self.hub._dispatch(_text(msg["channel"]), msg["data"])
            except (ConnectionLostError, TimeoutError) as again:
                await self._reset()
                exc = again if isinstance(again, ConnectionLostError) else exc
                continue
            except BrokerError as refused:
                # e.g. the user lost its channel permission while we were away: listeners
                # re-read their state on their own schedule (stop keys are polled); keep trying
                log.error("pub/sub %s: cannot resubscribe (%s)", self.name, refused)
                await self._reset()
                backoff.attempt = 10  # retry at the backoff's cap
                continue
            for channel in channels:
                self._confirmed.setdefault(channel, asyncio.Event()).set()
            backoff.reset()
            await self.hub._gap(channels)
            return

    async def aclose(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        await self._reset()
        if self._pool is not None:
            await self._pool.disconnect()


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
