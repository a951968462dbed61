"""Stop tokens: end streams cooperatively, in this process or on every host (over pub/sub).

Modelled on the Rust ``stop-token`` crate and tokio's ``CancellationToken``:

- :class:`StopSource` / :class:`StopToken`: a local pair, no Redis involved.
- ``broker.stop_source(name).stop(reason)``: fires every ``broker.stop_token(name)`` on every
  host. The stop is published on a pub/sub channel *and* recorded in a key, because pub/sub is
  at-most-once: a token reads the key after its subscription is confirmed and again after every
  reconnect, so a host that was cut off, or that starts later, still sees the stop.
- ``token.stop_stream(stream)`` ends a stream between items; for a :class:`Subscription` the
  stop is cooperative (handlers running finish and ack; buffered messages are released).

Key and channel: ``<namespace>:stop:{<name>}`` (value: msgpack ``{"reason", "at"}``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

import msgpack

from ._durable import WaitFor, durability, durably
from ._errors import BrokerError, ClosedError, PermissionDeniedError, map_redis_errors
from ._names import check_stop_name
from ._pubsub import CHECK_INTERVAL, Listener
from ._resource import AsyncResource, cancel_and_wait
from ._wire import pack

if TYPE_CHECKING:
    from ._broker import Broker

__all__ = ["RemoteStopSource", "RemoteStopToken", "StopSource", "StopToken", "stop_key"]

log = logging.getLogger("broker.stop")
T = TypeVar("T")


def stop_key(namespace: str, name: str) -> str:
    """The key (and pub/sub channel) of stop ``name``."""
    return f"{namespace}:stop:{{{name}}}"


@runtime_checkable
class Cooperative(Protocol):
    """A stream that ends between items on ``stop()`` and loses nothing it fetched (a
    :class:`Subscription`)."""

    def stop(self) -> None: ...

    def statistics(self) -> Any: ...

    def __anext__(self) -> Any: ...


class StopToken:
    """Fires once; then :attr:`stopped` is true and :attr:`reason` tells why.

    Obtain one from a :class:`StopSource` (local), from ``broker.stop_token(name)`` (remote),
    or from :meth:`child` (fires when its parent fires, not the other way round).
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._reason: str | None = None
        self._callbacks: list[Callable[[StopToken], None]] = []

    @property
    def stopped(self) -> bool:
        return self._event.is_set()

    @property
    def reason(self) -> str | None:
        return self._reason

    async def wait(self) -> str | None:
        """Wait until the token fires; returns the reason."""
        await self._event.wait()
        return self._reason

    def on_stop(self, callback: Callable[[StopToken], None]) -> Callable[[], None]:
        """Call ``callback(token)`` when the token fires (at once if it has). Returns a remover."""
        if self.stopped:
            callback(self)
            return lambda: None
        self._callbacks.append(callback)

        def remove() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return remove

    def child(self) -> StopToken:
        """A token that fires when this one does, and can also be fired alone (``_fire``)."""
        kid = StopToken()
        self.on_stop(lambda parent: kid._fire(parent.reason))
        return kid

    def stop_stream(self, stream: AsyncIterable[T]) -> AsyncIterator[T]:
        """End ``stream`` between items once the token fires.

        A :class:`Subscription` is stopped cooperatively (``subscription.stop()``): nothing it
        fetched is lost. Any other async iterable is raced against the token: an item whose
        read was in progress when the token fired is abandoned with that read.
        """
        if isinstance(stream, Cooperative):
            remove = self.on_stop(lambda _: stream.stop())
            return _Detaching(stream, remove)
        return _race(stream, self)

    def _fire(self, reason: str | None) -> None:
        if self.stopped:
            return
        self._reason = reason
        self._event.set()
        callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            try:
                cb(self)
            except Exception:  # one bad callback must not keep the others from running
                log.exception("stop callback %r failed", cb)

    def __repr__(self) -> str:
        state = f"stopped ({self._reason!r})" if self.stopped else "running"
        return f"<{type(self).__name__} {state}>"


class StopSource:
    """A local source: ``source.stop(reason)`` fires ``source.token`` (and its children)."""

    def __init__(self) -> None:
        self.token = StopToken()

    def stop(self, reason: str | None = None) -> None:
        self.token._fire(reason)

    @property
    def stopped(self) -> bool:
        return self.token.stopped


class _Detaching(AsyncIterator[T]):
    """Iterates a subscription; drops the token's callback when the iteration ends."""

    def __init__(self, stream: AsyncIterator[T], remove: Callable[[], None]) -> None:
        self._stream = stream
        self._remove = remove

    def __aiter__(self) -> _Detaching[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self._stream.__anext__()
        except BaseException:
            self._remove()
            raise


async def _race(stream: AsyncIterable[T], token: StopToken) -> AsyncIterator[T]:
    it = aiter(stream)
    stop = asyncio.ensure_future(token.wait())
    try:
        while not token.stopped:
            step = asyncio.ensure_future(anext(it))
            try:
                done, _ = await asyncio.wait({step, stop}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not step.done():
                    step.cancel()
                    await asyncio.wait([step])
            if step not in done or step.cancelled():
                return
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        stop.cancel()
        await asyncio.wait([stop])
        aclose = getattr(it, "aclose", None)
        if aclose is not None:
            await aclose()


# -- remote stops ---------------------------------------------------------------------------


def _encode(reason: str | None) -> bytes:
    return msgpack.packb({"reason": reason, "at": time.time()})  # type: ignore[no-any-return]


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _decode(raw: bytes | str | None) -> str | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        return raw
    try:
        value = msgpack.unpackb(raw)
        return value.get("reason") if isinstance(value, dict) else str(value)
    except Exception:
        return raw.decode(errors="replace")


class RemoteStopSource:
    """Fires (or clears) the stop ``name`` on every host. Obtain with ``broker.stop_source``."""

    def __init__(self, broker: Broker, name: str) -> None:
        self.broker = broker
        self.name = check_stop_name(name)
        self.key = stop_key(broker.namespace, name)

    async def stop(
        self,
        reason: str | None = None,
        *,
        ttl: float | None = None,
        replicas: int = 0,
        replica_timeout: float = 5.0,
    ) -> int:
        """Record the stop (expiring after ``ttl`` seconds if given) and publish it.

        Returns how many pub/sub connections the server sent it to (a host whose network is
        cut still counts until the server notices); every token also reads the key after a
        reconnect and every few seconds, so a lost message delays the stop but never loses it.
        With ``replicas``, returns only once that many replicas have the record (``WAIT``), so
        it survives a failover of the master.

        :raises ReplicationTimeoutError: if fewer replicas confirmed the record in
            ``replica_timeout`` seconds (firing again is harmless).
        """
        if ttl is not None and ttl <= 0:
            raise ValueError(f"ttl must be > 0 seconds, got {ttl!r}")
        wait = durability(replicas, replica_timeout)
        value = _encode(reason)
        r = self.broker.redis
        if wait is not None:
            receivers = await self._stop_durably(value, ttl, wait)
            hub = self.broker._hub
            if hub is not None:
                hub._fire(self.key, reason)
            return receivers

        async def fire() -> int:
            # one MULTI: the record and the message (on a cluster SPUBLISH, whose channel is
            # the record's key: one slot)
            pipe = r.pipeline(transaction=True)
            pipe.set(self.key, value, px=None if ttl is None else int(ttl * 1000))
            if self.broker.cluster:
                pipe.execute_command("SPUBLISH", self.key, value)
            else:
                pipe.publish(self.key, value)
            _, receivers = await pipe.execute()
            return int(receivers)

        try:
            receivers = int(await self.broker.call(fire))
        except PermissionDeniedError as exc:
            raise PermissionDeniedError(
                f"cannot fire stop {self.name!r} (key and pub/sub channel {self.key!r}): {exc}"
            ) from exc
        # the tokens of this process fire now, not when the message comes back to it
        hub = self.broker._hub
        if hub is not None:
            hub._fire(self.key, reason)
        return receivers

    async def _stop_durably(self, value: bytes, ttl: float | None, wait: WaitFor) -> int:
        """The record and the message in one ``MULTI``, then ``WAIT``, on one connection."""
        b = self.broker
        expiry: list[bytes | str | int] = [] if ttl is None else [b"PX", int(ttl * 1000)]
        publish = b"SPUBLISH" if b.cluster else b"PUBLISH"
        commands = [
            pack(b"MULTI"),
            pack(b"SET", self.key, value, *expiry),
            pack(publish, self.key, value),
            pack(b"EXEC"),
        ]
        try:
            replies, waited = await durably(b.topology, b.settings.retry, self.key, commands, wait)
        except PermissionDeniedError as exc:
            raise PermissionDeniedError(
                f"cannot fire stop {self.name!r} (key and pub/sub channel {self.key!r}): {exc}"
            ) from exc
        error = wait.error(f"stop record {self.key!r}", waited)
        if error is not None:
            raise error
        executed = replies[-1]
        return int(executed[1]) if isinstance(executed, list) and len(executed) == 2 else 0

    async def reset(self) -> bool:
        """Clear a recorded stop so the name can be used again; True if one was recorded.

        Tokens that already fired stay fired; only tokens created afterwards start clean.
        """
        return bool(await self.broker.call(lambda: self.broker.redis.delete(self.key)))

    async def status(self) -> tuple[bool, str | None]:
        """(stopped, reason) as recorded in the key."""
        raw = await self.broker.call(lambda: self.broker.redis.get(self.key))
        return raw is not None, _decode(raw)


class RemoteStopToken(StopToken, AsyncResource):
    """A token fired by ``broker.stop_source(name).stop()`` from any host.

    Use as ``async with broker.stop_token("deploy") as token:``; entering returns once the
    subscription is confirmed and the recorded stop (if any) was read. ``parent`` (any token)
    makes this one fire with it, e.g. one token per worker under one per deployment.
    """

    def __init__(self, broker: Broker, name: str, *, parent: StopToken | None = None) -> None:
        super().__init__()
        self.broker = broker
        self.name = check_stop_name(name)
        self.key = stop_key(broker.namespace, name)
        self._parent = parent
        self._remove_parent: Callable[[], None] | None = None
        self._entered = False
        self._closed = False

    async def __aenter__(self) -> RemoteStopToken:
        if self._entered:
            raise ClosedError("a stop token can be entered once; create another")
        self._entered = True
        if self._parent is not None:
            self._remove_parent = self._parent.on_stop(lambda p: self._fire(p.reason))
        try:
            try:
                await self.broker._stop_hub().register(self)
            except PermissionDeniedError as exc:
                raise PermissionDeniedError(
                    f"stop token {self.name!r} cannot listen on {self.key!r}: {exc}"
                ) from exc
        except BaseException:
            # a failed or cancelled enter gets no __aexit__: undo the registration here
            await self.aclose()
            raise
        return self

    async def aclose(self) -> None:
        """Unsubscribe (shared connection: the channel is dropped with its last token)."""
        if self._closed or not self._entered:
            return
        self._closed = True
        if self._remove_parent is not None:
            self._remove_parent()
        await self.broker._stop_hub().unregister(self)

    def __repr__(self) -> str:
        state = f"stopped ({self._reason!r})" if self.stopped else "running"
        return f"<RemoteStopToken {self.name!r} {state}>"


class StopHub:
    """The remote tokens of a broker, on its pub/sub hub: one listener per stop name (shared by
    every token of that name), the record read after each gap, and every record read again
    every ``CHECK_INTERVAL`` by one poll task (a stop whose publish was lost is seen anyway)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._tokens: dict[str, set[RemoteStopToken]] = {}
        self._listeners: dict[str, Listener] = {}
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None

    @property
    def reconnects(self) -> int:
        return self.broker._pubsub_hub().reconnects

    async def register(self, token: RemoteStopToken) -> None:
        hub = self.broker._pubsub_hub()
        async with self._lock:
            if self._poller is None:
                self._poller = self.broker._spawn(self._poll(), name="broker-stop-poll")
            first = token.key not in self._tokens
            self._tokens.setdefault(token.key, set()).add(token)
            if first:
                key = token.key

                def on_message(data: bytes) -> None:
                    self._fire(key, _decode(data))

                async def on_gap() -> None:
                    await self._read([key])

                listener = Listener(key, on_message, on_gap)
                try:
                    await hub.add(listener)
                except BaseException:
                    # refused (or cancelled): this key is not listened to; forget it quietly
                    tokens = self._tokens.get(token.key)
                    if tokens is not None:
                        tokens.discard(token)
                        if not tokens:
                            del self._tokens[token.key]
                    raise
                self._listeners[token.key] = listener
        # the subscription is confirmed: a stop published from now on reaches us, and one
        # published before is in the key
        raw = await self.broker.call(lambda: self.broker.redis.get(token.key))
        if raw is not None:
            token._fire(_decode(raw))

    async def unregister(self, token: RemoteStopToken) -> None:
        async with self._lock:
            tokens = self._tokens.get(token.key)
            if not tokens:
                return
            tokens.discard(token)
            if tokens:
                return
            del self._tokens[token.key]
            listener = self._listeners.pop(token.key, None)
            if listener is not None:
                await self.broker._pubsub_hub().remove(listener)

    def _fire(self, key: str, reason: str | None) -> None:
        for token in list(self._tokens.get(key, ())):
            token._fire(reason)

    async def _read(self, keys: list[str]) -> None:
        """Read stop records (bounded: a stalled connection must not stall the caller)."""
        keys = [k for k in keys if any(not t.stopped for t in self._tokens.get(k, ()))]
        if not keys:
            return
        r = self.broker.redis

        async def read() -> list[Any]:
            if not self.broker.cluster:
                return list(await r.mget(keys))
            pipe = r.pipeline(transaction=False)  # the keys live in different slots
            for key in keys:
                pipe.get(key)
            return list(await pipe.execute())

        try:
            async with asyncio.timeout(CHECK_INTERVAL):
                with map_redis_errors():
                    values = await read()
        except (TimeoutError, BrokerError) as exc:
            log.debug("stop tokens: reading the records failed (%s)", exc)
            return
        for key, raw in zip(keys, values, strict=True):
            if raw is not None:
                self._fire(key, _decode(raw))

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL)
            await self._read(list(self._tokens))

    async def aclose(self) -> None:
        if self._poller is not None:
            await cancel_and_wait(self._poller)
            self._poller = None
