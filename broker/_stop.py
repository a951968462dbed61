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
import collections
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgpack

from ._errors import (
    BrokerError,
    ClosedError,
    ConnectionLostError,
    PermissionDeniedError,
    RedisCommandError,
    map_redis_errors,
)
from ._names import check_channel
from ._resource import AsyncResource, cancel_and_wait
from ._retry import Backoff

if TYPE_CHECKING:
    from ._broker import Broker

__all__ = ["RemoteStopSource", "RemoteStopToken", "StopSource", "StopToken", "stop_key"]

log = logging.getLogger("broker.stop")
#: seconds between a pub/sub PING (and a read of every stop key) and the PONG deadline
CHECK_INTERVAL = 2.0
PONG_DEADLINE = 5.0
T = TypeVar("T")


def stop_key(namespace: str, name: str) -> str:
    """The key (and pub/sub channel) of stop ``name``."""
    return f"{namespace}:stop:{{{name}}}"


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
        from ._subscription import Subscription

        if isinstance(stream, Subscription):
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
        self.name = check_channel(name)
        self.key = stop_key(broker.namespace, name)

    async def stop(self, reason: str | None = None, *, ttl: float | None = None) -> int:
        """Record the stop (expiring after ``ttl`` seconds if given) and publish it.

        Returns how many pub/sub connections the server sent it to (a host whose network is
        cut still counts until the server notices); every token also reads the key after a
        reconnect and every few seconds, so a lost message delays the stop but never loses it.
        """
        if ttl is not None and ttl <= 0:
            raise ValueError(f"ttl must be > 0 seconds, got {ttl!r}")
        value = _encode(reason)
        r = self.broker.redis

        async def fire() -> int:
            pipe = r.pipeline(transaction=True)
            pipe.set(self.key, value, px=None if ttl is None else int(ttl * 1000))
            pipe.publish(self.key, value)
            _, receivers = await pipe.execute()
            return int(receivers)

        try:
            return int(await self.broker.call(fire))
        except PermissionDeniedError as exc:
            raise PermissionDeniedError(
                f"cannot fire stop {self.name!r} (key and pub/sub channel {self.key!r}): {exc}"
            ) from exc

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
        self.name = check_channel(name)
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
    """One pub/sub connection and one reader task for every remote token of a broker."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._tokens: dict[str, set[RemoteStopToken]] = {}
        self._confirmed: dict[str, asyncio.Event] = {}
        #: keys of each SUBSCRIBE sent and not yet answered, oldest first: an error reply (a
        #: NOPERM, say) answers the oldest one, and names no channel
        self._awaiting: collections.deque[list[str]] = collections.deque()
        self._refused: dict[str, BrokerError] = {}
        self._pubsub: Any = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._generation = 0
        self.reconnects = 0

    @property
    def _redis(self) -> Any:
        return self.broker.redis

    async def register(self, token: RemoteStopToken) -> None:
        async with self._lock:
            if self._task is None:
                self._task = self.broker._spawn(self._reader(), name="broker-stop-hub")
            first = token.key not in self._tokens
            self._tokens.setdefault(token.key, set()).add(token)
            if first:
                try:
                    await self._subscribe([token.key])
                except BaseException:
                    # refused (or cancelled): this key is not subscribed; forget it quietly
                    tokens = self._tokens.get(token.key)
                    if tokens is not None:
                        tokens.discard(token)
                        if not tokens:
                            del self._tokens[token.key]
                            self._confirmed.pop(token.key, None)
                    raise
        # the subscription is confirmed: a stop published from now on reaches us, and one
        # published before is in the key
        raw = await self.broker.call(lambda: self._redis.get(token.key))
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
            self._confirmed.pop(token.key, None)
            if self._pubsub is not None:
                try:
                    with map_redis_errors():
                        await self._pubsub.unsubscribe(token.key)
                except ConnectionLostError:
                    pass  # the reader resubscribes only to the keys still registered

    async def _subscribe(self, keys: list[str]) -> None:
        """Subscribe and wait for the server's confirmations (read by the reader task)."""
        backoff = self.broker.settings.retry.backoff()
        while True:
            events = {k: self._confirmed.setdefault(k, asyncio.Event()) for k in keys}
            try:
                with map_redis_errors():
                    if self._pubsub is None:
                        self._pubsub = self._redis.pubsub()
                    self._awaiting.append(list(keys))
                    await self._pubsub.subscribe(*keys)
                self._wake.set()
                async with asyncio.timeout(self.broker.settings.connect_timeout):
                    for ev in events.values():
                        await ev.wait()
                refused = [self._refused.pop(k) for k in keys if k in self._refused]
                if refused:
                    raise refused[0]
                return
            except (ConnectionLostError, TimeoutError) as exc:
                await self._reset_connection()
                await backoff.wait(
                    exc
                    if isinstance(exc, ConnectionLostError)
                    else ConnectionLostError("no subscribe confirmation")
                )
                keys = list(self._tokens)

    async def _reset_connection(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        self._awaiting.clear()
        for ev in self._confirmed.values():
            ev.clear()
        if pubsub is not None:
            try:
                await pubsub.aclose()
            except Exception:  # a broken connection may fail to close; it is dropped anyway
                pass

    async def _reader(self) -> None:
        """Dispatch pub/sub messages; detect a stalled connection; poll the keys.

        Every ``CHECK_INTERVAL`` the reader PINGs on the pub/sub connection (a partition that
        stalls TCP raises no error: without a PONG in ``PONG_DEADLINE`` it reconnects) and reads
        every stop key, so a stop whose publish was lost is seen within a few seconds anyway.
        """
        backoff = self.broker.settings.retry.backoff()
        last_check = time.monotonic()
        ping_sent: float | None = None
        while True:
            pubsub = self._pubsub
            if pubsub is None or not self._tokens:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                now = time.monotonic()
                if ping_sent is not None and now - ping_sent > PONG_DEADLINE:
                    raise ConnectionLostError(
                        f"pub/sub connection stalled (no PONG in {PONG_DEADLINE:g}s)"
                    )
                if now - last_check >= CHECK_INTERVAL:
                    last_check = now
                    await self._poll_keys()
                    if ping_sent is None:
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
                self.reconnects += 1
                log.warning("stop tokens: pub/sub connection lost (%s); reconnecting", exc)
                await self._reset_connection()
                await self._recover(backoff, exc)
                continue
            except RuntimeError:  # the connection was closed under us by unregister/reset
                await asyncio.sleep(0)
                continue
            if msg is None:
                continue
            kind = msg.get("type")
            if kind in (b"pong", "pong"):
                ping_sent = None
                continue
            channel = _text(msg["channel"])
            if kind in (b"subscribe", "subscribe"):
                self._answered(channel)
                ev = self._confirmed.get(channel)
                if ev is not None:
                    ev.set()
            elif kind in (b"message", "message"):
                reason = _decode(msg["data"])
                for token in list(self._tokens.get(channel, ())):
                    token._fire(reason)

    def _answered(self, key: str) -> None:
        for keys in self._awaiting:
            if key in keys:
                keys.remove(key)
                break
        while self._awaiting and not self._awaiting[0]:
            self._awaiting.popleft()

    def _refuse(self, exc: BrokerError) -> None:
        if not self._awaiting:
            log.warning("stop tokens: the server answered with an error: %s", exc)
            return
        for key in self._awaiting.popleft():
            self._refused[key] = exc
            ev = self._confirmed.get(key)
            if ev is not None:
                ev.set()

    async def _poll_keys(self) -> None:
        """Read every stop key once (bounded: a stalled connection must not stall the reader)."""
        keys = [k for k, tokens in self._tokens.items() if any(not t.stopped for t in tokens)]
        if not keys:
            return
        try:
            async with asyncio.timeout(CHECK_INTERVAL):
                with map_redis_errors():
                    values = await self._redis.mget(keys)
        except (TimeoutError, BrokerError) as exc:
            log.debug("stop tokens: key poll failed (%s)", exc)
            return
        for key, raw in zip(keys, values, strict=True):
            if raw is not None:
                for token in list(self._tokens.get(key, ())):
                    token._fire(_decode(raw))

    async def _recover(self, backoff: Backoff, exc: ConnectionLostError) -> None:
        """Resubscribe everything, then read every key: stops published meanwhile were lost."""
        while self._tokens:
            try:
                await backoff.wait(exc)
            except ConnectionLostError as gone:
                # a hub has no caller to raise to: keep trying, at the backoff's cap
                log.error("stop tokens: %s; still retrying", gone)
                backoff.reset()
                backoff.attempt = 10
                continue
            keys = list(self._tokens)
            try:
                if self._pubsub is not None:
                    # a token registered meanwhile opened one: keep a single connection
                    await self._reset_connection()
                with map_redis_errors():
                    self._pubsub = self._redis.pubsub()
                    await self._pubsub.subscribe(*keys)
                    # read the confirmations here: the reader is this task
                    confirmed: set[str] = set()
                    async with asyncio.timeout(self.broker.settings.connect_timeout):
                        while confirmed != set(keys):
                            msg = await self._pubsub.get_message(timeout=1.0)
                            if msg and msg.get("type") in (b"subscribe", "subscribe"):
                                ch = msg["channel"]
                                confirmed.add(ch.decode() if isinstance(ch, bytes) else ch)
                            elif msg and msg.get("type") in (b"message", "message"):
                                ch = msg["channel"]
                                name = ch.decode() if isinstance(ch, bytes) else ch
                                for token in list(self._tokens.get(name, ())):
                                    token._fire(_decode(msg["data"]))
                    values = await self._redis.mget(keys)
            except (ConnectionLostError, TimeoutError) as again:
                await self._reset_connection()
                exc = again if isinstance(again, ConnectionLostError) else exc
                continue
            except BrokerError as refused:
                # e.g. the user lost its channel permission while we were away: the keys are
                # still polled every CHECK_INTERVAL, so tokens fire, only later; keep trying
                log.error("stop tokens: cannot resubscribe (%s); polling the stop keys", refused)
                await self._reset_connection()
                backoff.attempt = 10  # retry at the backoff's cap
                continue
            for ev_key in keys:
                self._confirmed.setdefault(ev_key, asyncio.Event()).set()
            for key, raw in zip(keys, values, strict=True):
                if raw is not None:
                    for token in list(self._tokens.get(key, ())):
                        token._fire(_decode(raw))
            backoff.reset()
            return

    async def aclose(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        await self._reset_connection()
