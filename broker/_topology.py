"""Where each key lives: one server, or the primaries of a Redis Cluster, each with its own
:class:`Wire` for the hot commands.

On a single server every key maps to the one wire, with no hashing. On a cluster the slot map
comes from redis-py's ``RedisCluster`` (its ``nodes_manager``); :meth:`Topology.refresh` re-reads
it after a ``MOVED``, a failover or a lost node, coalescing concurrent callers into one refresh.
Replies that say a command went to the wrong node are recognised by :func:`routing_error`.

Behind Sentinel there is one wire too, whose connections ask the sentinels where the master is
each time they connect (redis-py's ``SentinelManagedConnection``). :meth:`Topology.refresh` asks
the sentinels, and when the master moved, drops every connection to the old one (idle ones at
once, busy ones when their exchange ends) and bumps :attr:`Topology.generation`;
:meth:`Topology.watch_sentinels` does so as soon as the sentinels announce a switch. That matters
when the old master is still alive (``SENTINEL FAILOVER``, or a partition): it keeps accepting
writes until the sentinels make it a replica, several seconds later, and what it accepts then is
lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

import redis.exceptions as rex
from redis.crc import key_slot

from ._wire import Wire

if TYPE_CHECKING:
    from ._settings import Settings

__all__ = ["Link", "Topology", "routing_error", "slot_of"]

log = logging.getLogger("broker.cluster")

SLOTS = 16384
#: error replies that mean "this command was not run here; ask the cluster where": nothing was
#: executed, so resending is safe (no duplicate). ``NOREPLICAS``: a master with
#: ``min-replicas-to-write`` lost its replicas (a failover under way). ``UNBLOCKED force
#: unblock``: a blocked read ended because its master became a replica (a failover); not
#: ``UNBLOCKED`` alone, which also says that the stream was deleted under the read.
_ROUTING = (
    "MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "READONLY", "MASTERDOWN", "LOADING", "NOREPLICAS"
)  # fmt: skip
_DEMOTED = "UNBLOCKED force unblock"


@functools.lru_cache(maxsize=65536)
def slot_of(key: str) -> int:
    """The cluster hash slot of ``key`` (CRC16 of its ``{hash tag}``)."""
    return int(key_slot(key.encode()))


def routing_error(reply: object) -> str | None:
    """The kind (``MOVED``, ``ASK``...) when ``reply`` is an error meaning "not run here"."""
    if isinstance(reply, BaseException):
        text = str(reply)
        for kind in _ROUTING:
            if text.startswith(kind):
                return kind
        if text.startswith(_DEMOTED):
            return "UNBLOCKED"
        # redis-py turns some of these into classes whose text lost the prefix
        name = type(reply).__name__
        if name in ("MovedError", "AskError", "TryAgainError", "ClusterDownError",
                    "ReadOnlyError", "MasterDownError", "BusyLoadingError"):  # fmt: skip
            return name.removesuffix("Error").upper()
    return None


def ask_target(reply: BaseException) -> str:
    """``host:port`` of an ``ASK`` redirection (``ASK <slot> <host>:<port>``)."""
    return str(reply).split()[-1]


class Topology:
    """The nodes that own the keys, and a :class:`Wire` to each.

    :param client: the redis-py client: ``Redis`` for one server (the master's behind Sentinel),
        ``RedisCluster`` for a cluster.
    :param timeout: the wires' stall timeout (see :class:`Wire`).
    :param sentinel: the client's pool is a ``SentinelConnectionPool``: follow its master.
    :param ask_timeout: bound on asking the sentinels where the master is.
    """

    def __init__(
        self,
        client: Any,
        *,
        cluster: bool,
        timeout: float,
        sentinel: bool = False,
        ask_timeout: float = 5.0,
    ) -> None:
        self.client = client
        self.cluster = cluster
        self.timeout = timeout
        self.sentinel = sentinel
        self.ask_timeout = ask_timeout
        #: behind Sentinel: the master's ``(host, port)`` as last seen
        self.master: tuple[str, int] | None = None
        if sentinel:
            self.master = _address(client.connection_pool.master_address)
        #: the one wire of a single server (None on a cluster)
        self.single: Wire | None = None if cluster else Wire.like(client, timeout)
        self._wires: dict[str, Wire] = {}
        self._slots: list[Wire | None] = []
        #: bumped each time the slot map changes: readers regroup when it moves
        self.generation = 0
        self._changed = asyncio.Event()
        self._lock = asyncio.Lock()
        if cluster:
            self._load()

    def __repr__(self) -> str:
        if self.sentinel:
            return f"<Topology Sentinel master {_show(self.master)}, generation {self.generation}>"
        if self.single is not None:
            return "<Topology single server>"
        return (
            f"<Topology cluster of {len(self.primaries())} primaries, generation {self.generation}>"
        )

    # -- lookups ------------------------------------------------------------------------------

    def wire_for(self, key: str) -> Wire:
        """The wire to the node that owns ``key``.

        :raises ConnectionError: (redis-py's) when no node serves the key's slot now.
        """
        if self.single is not None:
            return self.single
        wire = self._slots[slot_of(key)]
        if wire is None:
            raise rex.ConnectionError(f"no cluster node serves the slot of {key!r} (yet)")
        return wire

    def group(self, keys: Iterable[str]) -> dict[Wire, list[str]]:
        """``keys`` by the wire of the node that owns them (order kept within a node)."""
        out: dict[Wire, list[str]] = {}
        for key in keys:
            out.setdefault(self.wire_for(key), []).append(key)
        return out

    def primaries(self) -> list[Wire]:
        """Every node that owns slots now (the single server's wire on one server)."""
        if self.single is not None:
            return [self.single]
        seen: dict[str, Wire] = {}
        for wire in self._slots:
            if wire is not None:
                seen.setdefault(wire.name, wire)
        return list(seen.values())

    def wire_at(self, address: str) -> Wire:
        """The wire to ``host:port`` (an ``ASK`` target may not be in the slot map yet)."""
        if self.single is not None:
            return self.single
        wire = self._wires.get(address)
        if wire is None:
            host, _, port = address.rpartition(":")
            template = next(iter(self.client.nodes_manager.nodes_cache.values()))
            kwargs = {**template.connection_kwargs, "host": host, "port": int(port)}
            wire = self._wires[address] = Wire(
                template.connection_class, kwargs, timeout=self.timeout, name=address
            )
        return wire

    # -- changes ------------------------------------------------------------------------------

    async def wait_changed(self) -> None:
        """Return when the slot map (or the Sentinel master) changes next (never, on one
        server)."""
        await self._changed.wait()

    def _bump(self) -> None:
        self.generation += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def refresh(self, reason: str) -> None:
        """Re-read the slot map from the cluster, or ask the sentinels where the master is
        (a no-op on one server).

        Callers that arrive while a refresh runs wait for it and do not start another.
        """
        if self.single is not None:
            if self.sentinel:
                await self._follow_master(reason)
            return
        seen = self.generation
        async with self._lock:
            if self.generation != seen:
                return  # refreshed while we waited
            before = [w.name if w else None for w in self._slots]
            await self.client.nodes_manager.initialize()
            self._load()
            if [w.name if w else None for w in self._slots] != before:
                self._bump()
                log.warning(
                    "cluster slot map changed (%s): primaries now %s",
                    reason,
                    ", ".join(w.name for w in self.primaries()),
                )

    async def _follow_master(self, reason: str) -> None:
        """Ask the sentinels where the master is; when it moved, every connection goes there:
        idle ones are dropped now, busy ones when their exchange ends (redis-py reconnects a
        dropped one through the sentinels). Quiet when no sentinel names a master (a failover
        under way): the caller's next attempt asks again."""
        seen = self.generation
        async with self._lock:
            if self.generation != seen:
                return  # followed while we waited
            pool = self.client.connection_pool
            try:
                async with asyncio.timeout(self.ask_timeout):
                    found = await pool.sentinel_manager.discover_master(pool.service_name)
            except (TimeoutError, rex.ConnectionError, rex.TimeoutError, OSError) as exc:
                log.debug("sentinel: no master known for %r now (%s)", pool.service_name, exc)
                return
            address = _address(found)
            if address == self.master:
                return
            old, self.master = self.master, address
            pool.master_address = found
            assert self.single is not None
            await self.single.drop_idle()
            for p in (pool, self.single.pool):
                await _drop_connections(p)
            self._bump()
            log.warning(
                "sentinel: the master of %r moved from %s to %s (%s); reconnecting to it",
                pool.service_name,
                _show(old),
                _show(address),
                reason,
            )

    async def watch_sentinels(self, every: float = 5.0) -> None:
        """Behind Sentinel, until cancelled: follow the master as soon as a sentinel announces a
        switch (``+switch-master``), and ask every ``every`` seconds in case an announcement was
        missed. Talks to one sentinel at a time; the next one when it fails."""
        pool = self.client.connection_pool
        manager = pool.sentinel_manager
        turn = 0
        while True:
            sentinel = manager.sentinels[turn % len(manager.sentinels)]
            turn += 1
            pubsub = sentinel.pubsub()
            try:
                await pubsub.subscribe("+switch-master")
                await self.refresh("watching the sentinels")  # a switch missed meanwhile
                next_ask = time.monotonic() + every
                while True:
                    msg = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=min(1.0, every)
                    )
                    if msg is not None and msg.get("type") in ("message", b"message"):
                        # "<service> <old ip> <old port> <new ip> <new port>"
                        words = _text(msg["data"]).split()
                        if words[:1] == [pool.service_name] and len(words) == 5:
                            await self.refresh(f"the sentinels announced {words[3]}:{words[4]}")
                    if time.monotonic() >= next_ask:
                        await self.refresh("a periodic check")
                        next_ask = time.monotonic() + every
            except Exception as exc:  # whatever it is, the next sentinel may do better
                log.debug("sentinel watch: %s; trying the next sentinel", exc)
                await asyncio.sleep(min(1.0, every))
            finally:
                with contextlib.suppress(Exception):  # a broken connection may fail to close
                    await pubsub.aclose()

    def _load(self) -> None:
        cache = self.client.nodes_manager.slots_cache
        slots: list[Wire | None] = []
        for slot in range(SLOTS):
            nodes = cache.get(slot)
            if not nodes:
                slots.append(None)
                continue
            node = nodes[0]
            wire = self._wires.get(node.name)
            if wire is None:
                wire = self._wires[node.name] = Wire(
                    node.connection_class,
                    {**node.connection_kwargs, "host": node.host, "port": node.port},
                    timeout=self.timeout,
                    max_connections=node.max_connections,
                    name=node.name,
                )
            slots.append(wire)
        self._slots = slots

    async def aclose(self) -> None:
        """Close every wire; later calls raise ``ClosedError``."""
        wires = [self.single] if self.single is not None else list(self._wires.values())
        for wire in wires:
            if wire is not None:
                await wire.aclose()


async def _drop_connections(pool: Any) -> None:
    """Close the idle connections of ``pool``; those in use close when they are released
    (redis-py >= 6: before that, they stay until they fail)."""
    await pool.disconnect(inuse_connections=False)
    mark = getattr(pool, "update_active_connections_for_reconnect", None)
    if mark is not None:
        await mark()


def _address(found: Any) -> tuple[str, int] | None:
    if not found:
        return None
    host, port = found
    return _text(host), int(port)


def _show(address: tuple[str, int] | None) -> str:
    if address is None:
        return "(unknown)"
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class Link(Protocol):
    """The narrow view of the connections that the parts of a subscription, a tail or a stop
    token need: the settings, the generic client and the topology (a broker is one)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def redis(self) -> Any: ...

    @property
    def topology(self) -> Topology: ...

    def _pubsub_hub(self) -> Any:
        """The broker's pub/sub hub (:class:`._pubsub.Hub`)."""
