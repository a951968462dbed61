"""``connect()``: the broker handle that owns the connections and the publish batcher."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from redis.asyncio.cluster import RedisCluster

from . import _observe
from ._clients import cluster_client, sentinel_client, single_client
from ._codec import Codec
from ._errors import ClosedError, ConfigurationError, ConnectionLostError, map_redis_errors
from ._names import channel_from_key, channel_key
from ._publisher import Bells, Publisher
from ._resource import AsyncResource, cancel_and_wait
from ._retry import retrying
from ._server import MIN_REDIS
from ._settings import Settings
from ._topology import Topology
from ._watch import WatchTotals
from ._wire import Wire

if TYPE_CHECKING:
    from ._channel import Channel
    from ._message import Message
    from ._pubsub import Hub
    from ._request import Inbox, RequestStatistics
    from ._stop import RemoteStopSource, RemoteStopToken, StopHub, StopToken
    from ._subscription import Subscription
    from ._tail import Tail
    from ._watch import Watch

__all__ = ["Broker", "connect"]

log = logging.getLogger("broker")


def connect(url: str | None = None, **options: Any) -> Broker:
    """Open a broker: ``async with connect("redis://host:6379/0") as broker: ...``.

    ``url`` falls back to ``$BROKER_URL``, then ``redis://localhost:6379/0``; ``rediss://`` (TLS),
    ``unix://``, ``user:password@`` (ACL), ``redis+cluster://host:port[,host:port...]`` and
    ``redis+sentinel://host:port[,host:port...]/service_name[/db]`` work. ``options`` are
    :class:`Settings` fields (``namespace``, ``reconnect_deadline``, ...) and the publish
    batcher's ``linger``, ``max_batch``, ``max_queue`` and ``max_pipelines``.

    :raises ConfigurationError: on a bad URL or option (at the call).
    :raises ConnectionLostError: on entering, if the server cannot be reached.
    """
    publisher = {
        k: options.pop(k)
        for k in ("linger", "max_batch", "max_queue", "max_pipelines")
        if k in options
    }
    return Broker(Settings.from_url(url, **options), **publisher)


class Broker(AsyncResource):
    """A connection pool, a publish batcher and a factory of channels and subscriptions."""

    def __init__(self, settings: Settings, **publisher_options: Any) -> None:
        self.settings = settings
        self._publisher_options = publisher_options
        self._redis: Any = None
        self._publisher: Publisher | None = None
        self._topology: Topology | None = None
        #: whether the URL reached a Redis Cluster (``redis+cluster://``, or a node in cluster
        #: mode behind a plain ``redis://`` URL)
        self.cluster = False
        self._stack: contextlib.AsyncExitStack | None = None
        self._tasks: asyncio.TaskGroup | None = None
        self._publisher_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._hub: StopHub | None = None
        self._pubsub: Hub | None = None
        self._inbox: Inbox | None = None
        #: what this broker's watched values did (see :meth:`watch_statistics`)
        self._watch_counts: dict[str, int] = WatchTotals.counters()
        self._clock_offset_ms = 0
        self.bells: Bells | None = None
        #: partition counts of channels, as recorded on the server (they never change)
        self._partitions: dict[str, int] = {}
        #: the ``redis_version`` the server reported when the broker connected
        self.server_version = ""
        self._closed = False

    def __repr__(self) -> str:
        return f"<Broker {self.settings.safe_url} namespace={self.settings.namespace!r}>"

    async def __aenter__(self) -> Broker:
        if self._stack is not None or self._closed:
            raise ClosedError("a Broker can be entered once; call connect() again")
        s = self.settings
        stack = contextlib.AsyncExitStack()
        try:
            # one bound for connecting, the handshake and the first answers: a stopped server
            # still completes the TCP connect, and would otherwise hold us for the stall timeout
            opening = 2 * s.connect_timeout
            try:
                with map_redis_errors():
                    try:
                        async with asyncio.timeout(opening):
                            await self._open(stack)
                    except TimeoutError:
                        raise ConnectionLostError(
                            f"no answer within {opening:g}s (a stalled server?)"
                        ) from None
            except ConnectionLostError as exc:
                raise type(exc)(f"cannot connect to {s.safe_url}: {_cause(exc)}") from exc.__cause__
            topology = Topology(
                self._redis,
                cluster=self.cluster,
                timeout=s.stall_timeout,
                sentinel=s.endpoint.kind == "sentinel",
                ask_timeout=s.connect_timeout,
            )
            self._topology = topology
            stack.push_async_callback(topology.aclose)
            self.bells = Bells(sharded=self.cluster)
            self._publisher = Publisher(
                topology, retry=s.retry, bells=self.bells, **self._publisher_options
            )
            self._tasks = await stack.enter_async_context(asyncio.TaskGroup())
            self._publisher_task = self._tasks.create_task(
                self._publisher.run(), name="broker-publisher"
            )
            if topology.sentinel:
                self._watch_task = self._tasks.create_task(
                    topology.watch_sentinels(), name="broker-sentinel-watch"
                )
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        _observe.broker_opened(self)  # metrics, when enabled
        return self

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        """Make the client for the URL (a cluster when the server says it is in cluster
        mode), learn the server's clock and check its version."""
        s = self.settings
        endpoint = s.endpoint
        if endpoint.kind == "cluster":
            self._redis = await cluster_client(s, endpoint.hosts, endpoint.node_url)
            self.cluster = True
        elif endpoint.kind == "sentinel":
            self._redis = await sentinel_client(s, endpoint)
            # closed after the client (the stack is last in, first out)
            stack.push_async_callback(self._redis.connection_pool.sentinel_manager.aclose)
        else:
            self._redis = single_client(s)
        stack.push_async_callback(self._redis.aclose)
        await self._measure_clock()
        info = await self._check_version()
        if endpoint.kind == "single" and str(info.get("cluster_enabled", "0")) == "1":
            # a plain redis:// URL that reached a cluster node: follow the cluster from there
            single, self._redis = self._redis, None
            await single.aclose()
            host = single.connection_pool.connection_kwargs.get("host", "localhost")
            port = int(single.connection_pool.connection_kwargs.get("port", 6379))
            self._redis = await cluster_client(s, [(host, port)], s.url)
            self.cluster = True
            stack.push_async_callback(self._redis.aclose)

    async def aclose(self) -> None:
        """Flush queued publishes, stop the batcher and close every connection. Idempotent."""
        if self._closed:
            return
        self._closed = True
        stack, self._stack = self._stack, None
        if stack is None:
            return
        if self._inbox is not None:
            await self._inbox.aclose()
        if self._hub is not None:
            await self._hub.aclose()
        if self._pubsub is not None:
            await self._pubsub.aclose()
        if self._watch_task is not None:
            await cancel_and_wait(self._watch_task)
        if self._publisher is not None and self._publisher_task is not None:
            self._publisher.close()  # sends what was accepted, then ends
            try:
                await asyncio.wait([self._publisher_task])
                # and the publishes sent straight from their callers' tasks
                await self._publisher.wait_idle()
            finally:
                await cancel_and_wait(self._publisher_task)
        _observe.broker_closed(self)  # its final publish counts
        await stack.aclose()

    async def _measure_clock(self) -> None:
        """Learn the server clock's offset from ours (TIME, halfway through the round trip)."""
        assert self._redis is not None
        before = time.time()
        if self.cluster:
            sec, usec = await self._redis.time(target_nodes=RedisCluster.RANDOM)
        else:
            sec, usec = await self._redis.time()
        after = time.time()
        self._clock_offset_ms = int(sec) * 1000 + int(usec) // 1000 - int((before + after) * 500)

    async def _check_version(self) -> dict[str, Any]:
        """Refuse servers older than Redis 7.0 with a sentence, not with odd failures later.
        Returns the ``server`` and ``cluster`` sections of ``INFO``."""
        assert self._redis is not None
        if self.cluster:
            info = await self._redis.info("server", target_nodes=RedisCluster.RANDOM)
        else:
            info = await self._redis.info("server")
            info.update(await self._redis.info("cluster"))
        version = str(info.get("redis_version", "0"))
        parts = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
        self.server_version = version
        if parts < MIN_REDIS:
            raise ConfigurationError(
                f"the server at {self.settings.safe_url} runs Redis {version}; broker needs "
                f"Redis >= {MIN_REDIS[0]}.{MIN_REDIS[1]} or Valkey >= 7.2 (XAUTOCLAIM, XINFO "
                "lag, sharded pub/sub)"
            )
        return info  # type: ignore[no-any-return]

    def server_time_ms(self) -> int:
        """The server's clock, in ms, as estimated when the broker connected."""
        return int(time.time() * 1000) + self._clock_offset_ms

    # -- internal accessors -------------------------------------------------------------------

    @property
    def redis(self) -> Any:
        """The underlying ``redis.asyncio.Redis`` (for advanced use; keys follow the wire format).

        Typed ``Any``: redis-py's annotations do not describe its asyncio replies.
        """
        if self._redis is None or self._closed:
            raise ClosedError("the broker is not open; use `async with connect(...) as broker`")
        return self._redis

    @property
    def topology(self) -> Topology:
        """The nodes that own the keys, with a connection pool each for the hot commands."""
        if self._topology is None or self._closed:
            raise ClosedError("the broker is not open; use `async with connect(...) as broker`")
        return self._topology

    @property
    def wire(self) -> Wire:
        """The hot-command connections of a single server (see :attr:`topology` for a cluster)."""
        wire = self.topology.single
        if wire is None:
            raise ClosedError("a cluster has a wire per node: use broker.topology.wire_for(key)")
        return wire

    @property
    def publisher(self) -> Publisher:
        if self._publisher is None or self._closed:
            raise ClosedError("the broker is not open; use `async with connect(...) as broker`")
        return self._publisher

    @property
    def namespace(self) -> str:
        return self.settings.namespace

    async def call(self, fn: Any, channel: str | None = None) -> Any:
        """Run one redis call with reconnects until the deadline and errors mapped."""
        key = None if channel is None else channel_key(self.namespace, channel)
        topology = self._topology
        follow = topology is not None and (topology.single is None or topology.sentinel)
        refresh = topology.refresh if follow and topology is not None else None
        return await retrying(fn, self.settings.retry, channel, key, refresh=refresh)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Start a task owned by this broker (cancelled when it closes)."""
        if self._tasks is None or self._closed:
            coro.close()
            raise ClosedError("the broker is not open; use `async with connect(...) as broker`")
        return self._tasks.create_task(self._owned(coro), name=name)

    async def _owned(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a background task; a ``ClosedError`` met while this broker closes ends it quietly.

        Closing takes several awaits (inbox, stop hub, pub/sub hub, publisher); a task that is
        recovering from a lost connection in between finds the broker closed. That is its end,
        not a failure: inside the broker's task group it would cancel the other tasks and make
        ``aclose`` raise.
        """
        try:
            await coro
        except ClosedError:
            if not self._closed:
                raise

    def _pubsub_hub(self) -> Hub:
        """The pub/sub hub: one connection per node for every listener of this broker."""
        if self._pubsub is None:
            from ._pubsub import Hub

            self._pubsub = Hub(self, self._spawn)
        return self._pubsub

    def _reply_inbox(self) -> Inbox:
        """The reply inbox of this broker's requests (one reader connection for all)."""
        if self._inbox is None:
            if self._closed or self._tasks is None:
                raise ClosedError("the broker is not open; use `async with connect(...) as broker`")
            from ._request import Inbox

            self._inbox = Inbox(self)
        return self._inbox

    def request_statistics(self) -> RequestStatistics:
        """Requests of this broker: waiting, answered, timed out, answers dropped (late, or a
        second answer to a retried request) and the inbox key."""
        if self._inbox is None:
            from ._request import RequestStatistics

            return RequestStatistics(0, 0, 0, 0, None)
        return self._inbox.statistics()

    def watch_statistics(self) -> WatchTotals:
        """Watched values of this broker: sets, deletes, compare-and-set conflicts, readers
        open now, values they yielded and their re-reads of the server."""
        return WatchTotals(**self._watch_counts)

    def _stop_hub(self) -> StopHub:
        if self._hub is None:
            from ._stop import StopHub

            self._hub = StopHub(self)
        return self._hub

    # -- factories ----------------------------------------------------------------------------

    def channel(
        self,
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
    ) -> Channel[Any]:
        """A channel by name (cheap; nothing is sent until used).

        ``maxlen`` keeps about that many entries (``MAXLEN ~``); ``max_age`` (seconds) trims
        older entries (``MINID ~``); ``max_lag`` makes it a bounded channel: ``publish`` waits
        (or raises :class:`ChannelFullError` with ``on_full="raise"``) while the slowest group
        is more than ``max_lag`` entries behind. ``partitions`` makes it P streams (spread over
        a cluster's primaries): the first process to use the channel records the count on the
        server, the others find it there (``None``: whatever is recorded; unpartitioned if
        nothing); ``publish(data, key=...)`` keeps each key's messages in one partition.
        ``replicas`` makes publishes durable (Kafka's ``acks=all``): a publish returns once that
        many replicas have the entry (``WAIT``, one per pipelined batch per node), else raises
        :class:`ReplicationTimeoutError` after ``replica_timeout`` seconds.

        :raises ConfigurationError: on an invalid name or option (a ``partitions`` that differs
            from the recorded count: at the first publish or subscribe).
        """
        from ._channel import Channel

        return Channel(
            self,
            name,
            codec=codec,
            maxlen=maxlen,
            max_age=max_age,
            max_lag=max_lag,
            on_full=on_full,
            full_timeout=full_timeout,
            partitions=partitions,
            replicas=replicas,
            replica_timeout=replica_timeout,
        )

    def watch(self, name: str, *, codec: str | Codec = "msgpack") -> Watch[Any]:
        """A watched value by name (cheap; nothing is sent until used): ``set`` it (with
        compare-and-set and expiry), ``get`` it, or ``subscribe`` to follow it, skipping to
        the newest version.

        Example::

            leader = broker.watch("leader")
            await leader.set("host-a", if_version=0, ttl=10)  # only if nobody leads
            async with leader.subscribe() as values:
                async for v in values:
                    print(v.version, v.value)

        :raises ConfigurationError: on an invalid name or codec.
        """
        from ._watch import Watch

        return Watch(self, name, codec=codec)

    def stop_source(self, name: str) -> RemoteStopSource:
        """The source of stop ``name``: ``await broker.stop_source("deploy").stop("reason")``."""
        from ._stop import RemoteStopSource

        return RemoteStopSource(self, name)

    def stop_token(self, name: str, *, parent: StopToken | None = None) -> RemoteStopToken:
        """A token fired by ``stop_source(name).stop()`` on any host (or when ``parent`` fires).

        Example::

            async with broker.stop_token("deploy") as token:
                async with ch.subscribe(group="g") as messages:
                    async for msg in token.stop_stream(messages):
                        ...
        """
        from ._stop import RemoteStopToken

        return RemoteStopToken(self, name, parent=parent)

    def subscribe(
        self, channels: str | Channel[Any] | Sequence[str | Channel[Any]], **options: Any
    ) -> Subscription[Any]:
        """Subscribe to one or more channels as a group member (one ``XREADGROUP`` for all).

        See :class:`Subscription` for ``group``, ``consumer`` and the other options.
        """
        from ._subscription import Subscription

        return _observe.subscription(Subscription(self, self._channels(channels), **options))

    async def consume(
        self,
        channels: str | Channel[Any] | Sequence[str | Channel[Any]],
        handler: Callable[[Message[Any]], Awaitable[Any]],
        *,
        group: str,
        concurrency: int = 1,
        group_concurrency: int | None = None,
        read_ahead: int | None = None,
        lease: float = 30.0,
        stop: StopToken | None = None,
        **options: Any,
    ) -> None:
        """Subscribe and run ``handler`` with bounded concurrency until stopped.

        Prefetch is ``concurrency + read_ahead`` (default read-ahead: ``3 * concurrency``, four
        per slot as Celery's default), so the next messages are at hand while a slow process
        still does not hoard the backlog.
        See :meth:`Subscription.consume` for the limits.

        Example::

            async with broker.stop_token("deploy") as stop:
                await b.consume("orders", handle, group="billing", concurrency=8, stop=stop)
        """
        from ._consume import check_limits, default_prefetch

        check_limits(concurrency, group_concurrency, lease)
        options.setdefault("prefetch", default_prefetch(concurrency, read_ahead))
        async with self.subscribe(channels, group=group, **options) as sub:
            await sub.consume(
                handler,
                concurrency=concurrency,
                group_concurrency=group_concurrency,
                lease=lease,
                stop=stop,
            )

    def tail(
        self, channels: str | Channel[Any] | Sequence[str | Channel[Any]], **options: Any
    ) -> Tail:
        """Read channels without a group: nothing is acked, nothing becomes pending.

        See :class:`Tail` for the start positions.
        """
        from ._tail import Tail

        return Tail(self, self._channels(channels), **options)

    async def channels(self) -> list[str]:
        """Names of the channels that exist in this namespace (by ``SCAN``, no ``KEYS``)."""
        found: set[str] = set()
        pattern = f"{self.namespace}:{{*}}"

        async def scan() -> None:
            async for key in self.redis.scan_iter(match=pattern, count=500, _type="stream"):
                name = channel_from_key(self.namespace, key.decode(errors="replace"))
                if name is not None:
                    found.add(name)

        await self.call(scan)
        return sorted(found)

    def _channels(
        self, channels: str | Channel[Any] | Iterable[str | Channel[Any]]
    ) -> list[Channel[Any]]:
        from ._channel import Channel

        if isinstance(channels, str | Channel):
            channels = [channels]
        out = [c if isinstance(c, Channel) else self.channel(c) for c in channels]
        if not out:
            raise ValueError("give at least one channel")
        if len({c.name for c in out}) != len(out):
            raise ValueError(f"channels repeat: {[c.name for c in out]}")
        return out


def _cause(exc: BaseException) -> str:
    return str(exc.__cause__ or exc)
