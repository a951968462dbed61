"""Where each key lives: one server, or the primaries of a Redis Cluster, each with its own
:class:`Wire` for the hot commands.

On a single server every key maps to the one wire, with no hashing. On a cluster the slot map
comes from redis-py's ``RedisCluster`` (its ``nodes_manager``); :meth:`Topology.refresh` re-reads
it after a ``MOVED``, a failover or a lost node, coalescing concurrent callers into one refresh.
Replies that say a command went to the wrong node are recognised by :func:`routing_error`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from redis.crc import key_slot

from ._wire import Wire

if TYPE_CHECKING:
    from ._settings import Settings

__all__ = ["Link", "Topology", "routing_error", "slot_of"]

log = logging.getLogger("broker.cluster")

SLOTS = 16384
#: error replies that mean "this command was not run here; ask the cluster where": nothing was
#: executed, so resending is safe (no duplicate)
_ROUTING = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "READONLY", "MASTERDOWN", "LOADING")


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

    :param client: the redis-py client: ``Redis`` for one server, ``RedisCluster`` for a cluster.
    :param timeout: the wires' stall timeout (see :class:`Wire`).
    """

    def __init__(self, client: Any, *, cluster: bool, timeout: float) -> None:
        self.client = client
        self.cluster = cluster
        self.timeout = timeout
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
            import redis.exceptions as rex

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
        """Return when the slot map changes next (never, on one server)."""
        await self._changed.wait()

    async def refresh(self, reason: str) -> None:
        """Re-read the slot map from the cluster (a no-op on one server).

        Callers that arrive while a refresh runs wait for it and do not start another.
        """
        if self.single is not None:
            return
        seen = self.generation
        async with self._lock:
            if self.generation != seen:
                return  # refreshed while we waited
            before = [w.name if w else None for w in self._slots]
            await self.client.nodes_manager.initialize()
            self._load()
            if [w.name if w else None for w in self._slots] != before:
                self.generation += 1
                changed, self._changed = self._changed, asyncio.Event()
                changed.set()
                log.warning(
                    "cluster slot map changed (%s): primaries now %s",
                    reason,
                    ", ".join(w.name for w in self.primaries()),
                )

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
