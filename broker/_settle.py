"""Settlements of a subscription: acks, idle resets ("touches") and dead letters, sent in
batches from one task, one payload per node, and the error boundary of group commands.

An ack is queued by ``msg.ack()`` and leaves with the next batch: one ``XACK`` per stream with
every id acked since the last batch. A touch resets the idle time of entries this consumer
holds (``XCLAIM ... JUSTID``), so other consumers do not claim them. A dead letter moves an
entry to the stream's dead-letter stream and acks it, in one Lua script.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ._durable import WaitFor
from ._errors import (
    BrokerError,
    ConnectionLostError,
    GroupMissingError,
    RedisCommandError,
    map_redis_errors,
)
from ._message import Message
from ._retry import retrying
from ._scripts import DEAD_LETTER
from ._stream import Stream
from ._topology import Link, routing_error
from ._wire import Wire, bulk, pack, pack_strs

__all__ = ["GroupCalls", "Settler"]

log = logging.getLogger("broker.subscription")


class GroupCalls:
    """The error boundary of one group's commands: redis-py errors mapped, ``NOGROUP`` and
    ``UNBLOCKED`` turned into :class:`GroupMissingError` naming the channel that lost its group,
    lost connections retried until the reconnect deadline (re-reading a cluster's slot map)."""

    def __init__(self, link: Link, group: str, streams: Sequence[Stream]) -> None:
        self.link = link
        self.group = group
        self.streams = list(streams)

    async def call(self, fn: Callable[[], Awaitable[Any]], stream: Stream | None = None) -> Any:
        """One call, errors mapped."""
        try:
            with map_redis_errors(stream.channel if stream else None):
                return await fn()
        except RedisCommandError as exc:
            # NOGROUP: group or stream gone; UNBLOCKED: the stream was deleted under a
            # blocked read (Redis 7)
            if str(exc).startswith(("NOGROUP", "UNBLOCKED")):
                named = next((s for s in self.streams if f"'{s.key}'" in str(exc)), stream)
                # ask the server which stream lost its group (the answer to a blocked
                # multi-stream read names no key); on a cluster, a stream whose slot moved to
                # another node unblocks its readers too, and still has its group there
                missing = await self.without_group([named] if named else self.streams)
                if missing is None:
                    raise ConnectionLostError(
                        f"read interrupted ({exc}); every group is still there (a slot moved?)"
                    ) from exc
                raise GroupMissingError(missing.channel, self.group) from exc
            raise

    async def retry(self, fn: Callable[[], Awaitable[Any]], stream: Stream | None = None) -> Any:
        """:meth:`call`, retried over lost connections until the reconnect deadline."""
        link = self.link
        refresh = link.topology.refresh if link.topology.single is None else None
        return await retrying(lambda: self.call(fn, stream), link.settings.retry, refresh=refresh)

    async def without_group(self, streams: list[Stream]) -> Stream | None:
        """The first of ``streams`` whose key or group is gone (a user recreates the group from
        ``GroupMissingError.channel``); None if none is; the first if we cannot tell."""
        r = self.link.redis
        for stream in streams:
            try:
                with map_redis_errors(stream.channel):
                    async with asyncio.timeout(self.link.settings.connect_timeout):
                        groups = await r.xinfo_groups(stream.key)
            except RedisCommandError:  # no such key
                return stream
            except (BrokerError, TimeoutError):
                break
            names = {_text(g["name"]) for g in groups}
            if self.group not in names:
                return stream
        else:
            return None
        return streams[0]


@dataclasses.dataclass(slots=True)
class DeadOp:
    stream: Stream
    id: str
    fields: dict[bytes, bytes]
    error: str
    deliveries: int


class Settler:
    """Queues acks, touches and dead letters, and sends them: one payload per node per round.

    :param wake: called when something was queued (the subscription's ack loop sends it).
    """

    def __init__(
        self,
        link: Link,
        calls: GroupCalls,
        consumer: str,
        streams: Sequence[Stream],
        dead_maxlen: int,
        wait: WaitFor | None = None,
    ) -> None:
        self.link = link
        #: acks and dead-letter moves wait for replicas (``WAIT``) before the next batch
        self.wait = wait
        self.calls = calls
        self.group = calls.group
        self.consumer = consumer
        self.by_key = {s.key: s for s in streams}
        self.dead_maxlen = dead_maxlen
        #: acks not yet sent, by stream key
        self.acks: dict[str, list[str]] = {}
        self.touch: dict[str, set[str]] = {}
        self.dead: list[DeadOp] = []
        #: entries in the batch on the wire right now
        self.sending = 0
        #: acks and dead letters on the wire right now (still held: a replay must skip them)
        self.in_transit: tuple[dict[str, list[str]], list[DeadOp]] = ({}, [])
        #: acks riding ahead of a reader's blocking read (see :meth:`take_riders`), and how many
        self.riding: list[dict[str, list[str]]] = []
        self.riding_n = 0
        #: the subscription's room event (given to :meth:`loop`): set when acks land, as
        #: unsent acks count against the room
        self.room: asyncio.Event | None = None
        #: recently reported trimmed entries (bounded), so each is reported once
        self.trimmed_seen: dict[tuple[str, str], None] = {}
        self.dead_lettered = 0
        #: per channel: [acks sent, dead lettered, trimmed]
        self.per_channel: dict[str, list[int]] = {s.channel: [0, 0, 0] for s in streams}
        self.trimmed = 0
        self.wake = asyncio.Event()
        self.kicked = False  # ``wake`` is set (a plain flag is cheaper on the hot path)
        self.flushed = asyncio.Event()
        self.flushed.set()

    # -- queueing (synchronous, from the application's tasks) ---------------------------------

    def kick(self) -> None:
        if not self.kicked:
            self.kicked = True
            self.wake.set()

    def ack_ids(self, key: str, ids: list[str]) -> None:
        bucket = self.acks.get(key)
        if bucket is None:
            self.acks[key] = list(ids)
        else:
            bucket.extend(ids)
        self.kick()

    def dead_letter(self, msg: Message[Any], error: str) -> None:
        stream = msg._stream
        assert stream is not None
        self.dead.append(DeadOp(stream, msg.id, msg.fields, error, msg.deliveries))
        self.dead_lettered += 1
        self.per_channel[stream.channel][1] += 1
        log.warning("dead-lettered %s %s: %s", msg.channel, msg.id, error)
        self.kick()

    def touch_ids(self, key: str, ids: set[str] | list[str]) -> None:
        self.touch.setdefault(key, set()).update(ids)

    def note_trimmed(self, stream: Stream, ids: list[str], *, ack: bool = True) -> None:
        """Entries deleted while pending: acked (when still pending), counted and logged once."""
        fresh = []
        for entry_id in ids:
            if (stream.key, entry_id) in self.trimmed_seen:
                continue
            self.trimmed_seen[(stream.key, entry_id)] = None
            if len(self.trimmed_seen) > 1024:
                self.trimmed_seen.pop(next(iter(self.trimmed_seen)))
            self.trimmed += 1
            self.per_channel[stream.channel][2] += 1
            fresh.append(entry_id)
            log.warning(
                "%s %s was trimmed while pending; dropped without delivery", stream.key, entry_id
            )
        if ack and fresh:
            self.ack_ids(stream.key, fresh)

    # -- accounting ---------------------------------------------------------------------------

    def unsent(self) -> int:
        """Acks queued and not yet on the wire, plus those on the wire."""
        return sum(map(len, self.acks.values())) + self.sending + self.riding_n

    def pending(self) -> int:
        queued = sum(map(len, self.acks.values()))
        return queued + len(self.dead) + self.sending + self.riding_n

    def idle(self) -> bool:
        return not (self.acks or self.dead or self.touch or self.sending or self.riding_n)

    def held(self) -> set[tuple[str, str]]:
        """``(stream key, id)`` of entries being settled (a replay must skip them)."""
        held = {(key, i) for key, ids in self.acks.items() for i in ids}
        held.update((key, i) for mine in self.riding for key, ids in mine.items() for i in ids)
        held.update((op.stream.key, op.id) for op in self.dead)
        acks, dead = self.in_transit
        held.update((key, i) for key, ids in acks.items() for i in ids)
        held.update((op.stream.key, op.id) for op in dead)
        return held

    # -- acks riding with a read ----------------------------------------------------------------

    def take_riders(self, keys: frozenset[str]) -> dict[str, list[str]] | None:
        """Take the queued acks of ``keys`` to send ahead of a blocking read on their node: one
        write and one round trip less per read than a separate ``XACK`` (at a message at a time,
        one per message). Only plain acks ride: durable ones wait for replicas (``WAIT``) and
        go with the ack loop, as do touches and dead letters. Settle what was taken with
        :meth:`riders_landed` once their replies are read, or :meth:`riders_back` if the read
        failed before that (they are sent again: ``XACK`` is idempotent). Each reader (one per
        node) takes its own streams' acks."""
        if self.wait is not None or not self.acks:
            return None
        mine = {key: self.acks.pop(key) for key in [k for k in self.acks if k in keys]}
        if not mine:
            return None
        self.riding.append(mine)
        self.riding_n += sum(map(len, mine.values()))
        return mine

    def rider_commands(self, mine: dict[str, list[str]]) -> list[bytes]:
        return [self._xack(key, ids) for key, ids in mine.items()]

    def _unride(self, mine: dict[str, list[str]]) -> bool:
        for i, batch in enumerate(self.riding):
            if batch is mine:
                del self.riding[i]
                self.riding_n -= sum(map(len, mine.values()))
                return True
        return False  # settled already

    def riders_landed(self, mine: dict[str, list[str]], replies: list[Any]) -> None:
        """The replies of the riding ``XACK`` commands (in :meth:`rider_commands`' order).
        Raises nothing (it runs inside the wire's exchange)."""
        if not self._unride(mine):
            return
        failed = len(replies) != len(mine)  # cannot happen: then all go again
        for i, (key, ids) in enumerate(mine.items()):
            reply = replies[i] if i < len(replies) else None
            if failed or isinstance(reply, BaseException):
                # NOGROUP, a moved slot...: the ack loop sends them again and reports the error
                # its own way (a missing group, a refreshed slot map)
                self.acks.setdefault(key, []).extend(ids)
                failed = True
            else:
                stream = self.by_key.get(key)
                if stream is not None:
                    self.per_channel[stream.channel][0] += len(ids)
        if self.room is not None:
            self.room.set()  # they no longer count against the room: a parked reader may read
        if failed:
            self.kick()
        elif self.idle():
            self.flushed.set()

    def riders_back(self, mine: dict[str, list[str]]) -> None:
        """The read failed before its riders' replies were read: queue them again."""
        if not self._unride(mine):
            return
        for key, ids in mine.items():
            self.acks.setdefault(key, []).extend(ids)
        self.kick()

    # -- sending ------------------------------------------------------------------------------

    async def loop(self, room: asyncio.Event) -> None:
        """The ack loop: send what was queued, each time something was."""
        self.room = room
        while True:
            await self.wake.wait()
            self.wake.clear()
            self.kicked = False
            try:
                await self.send()
            finally:
                room.set()
            if self.idle():
                self.flushed.set()

    async def send(self) -> None:
        acks, self.acks = self.acks, {}
        dead, self.dead = self.dead, []
        touch, self.touch = self.touch, {}
        if not (acks or dead or touch):
            return
        self.sending = sum(map(len, acks.values())) + len(dead)
        self.in_transit = (acks, dead)
        r = self.link.redis
        topology = self.link.topology

        wait = self.wait

        async def send() -> None:
            # one payload per node: every XACK and touch of the streams it owns
            payloads: dict[Wire, list[bytes]] = {}
            for key, ids in acks.items():
                payloads.setdefault(topology.wire_for(key), []).append(self._xack(key, ids))
            for key, tids in touch.items():
                payloads.setdefault(topology.wire_for(key), []).append(
                    pack(b"XCLAIM", key, self.group, self.consumer, 0, *tids, b"JUSTID")
                )
            waited: list[Any] = []
            if len(payloads) == 1:  # one node: no task per send (gather makes one each)
                ((w, parts),) = payloads.items()
                waited = [await _send(w, parts, wait)]
            elif payloads:
                waited = await asyncio.gather(
                    *(_send(w, parts, wait) for w, parts in payloads.items())
                )
            if wait is not None:
                for w, reply in zip(payloads, waited, strict=True):
                    self._short(wait, reply, f"acks on {w.name}")
            while dead:
                op = dead[0]
                keys = [op.stream.key, op.stream.dead_key]
                if wait is None:
                    await DEAD_LETTER(r, keys, self._dead_args(op))
                else:  # EVAL, not EVALSHA: on the WAIT's connection, never NOSCRIPT
                    script = pack(b"EVAL", DEAD_LETTER.source, 2, *keys, *self._dead_args(op))
                    reply = await _send(topology.wire_for(op.stream.key), [script], wait)
                    self._short(wait, reply, f"the dead letter of {op.stream.key} {op.id}")
                dead.pop(0)

        try:
            await self.calls.retry(send)
            for key, ids in acks.items():
                self.per_channel[self.by_key[key].channel][0] += len(ids)
        finally:
            self.sending = 0
            self.in_transit = ({}, [])

    def _short(self, wait: WaitFor, reply: Any, what: str) -> None:
        error = wait.error(what, reply)
        if error is not None:  # the ack is on the master: a failover may deliver it again
            log.warning("%s; after a failover the message(s) may be delivered again", error)

    def _xack(self, key: str, ids: list[str]) -> bytes:
        return b"*%d\r\n$4\r\nXACK\r\n%b%b%b" % (
            3 + len(ids),
            bulk(key.encode()),
            bulk(self.group.encode()),
            pack_strs(ids),
        )

    async def flush(self, error: Callable[[], BaseException | None]) -> None:
        """Wait until every ack, touch and dead letter so far reached the server."""
        while not self.idle():
            exc = error()
            if exc is not None:
                raise exc
            self.flushed.clear()
            self.wake.set()
            await self.flushed.wait()

    def _dead_args(self, op: DeadOp) -> list[Any]:
        args: list[Any] = [self.group, op.id, self.dead_maxlen]
        for k, v in op.fields.items():
            args += [k, v]
        args += [
            b"dead.id",
            op.id,
            b"dead.channel",
            op.stream.channel,
            b"dead.group",
            self.group,
            b"dead.consumer",
            self.consumer,
            b"dead.error",
            op.error[:4096],
            b"dead.deliveries",
            str(op.deliveries),
        ]
        if op.stream.partition is not None:
            args += [b"dead.partition", str(op.stream.partition)]
        return args


async def _send(wire: Wire, parts: list[bytes], wait: WaitFor | None = None) -> Any:
    """One node's part of a batch (then ``WAIT`` with ``wait``: its reply is returned). A
    redirection (the slot moved) is a reason to re-read the slot map and send the whole batch
    again: acks and touches are idempotent."""
    if wait is not None:
        parts = [*parts, wait.command]
    held = 0.0 if wait is None else wait.timeout
    raw = await wire.execute(b"".join(parts), len(parts), wait=held)
    for reply in raw[: len(raw) - (wait is not None)]:
        if isinstance(reply, BaseException):
            kind = routing_error(reply)
            if kind is not None:
                raise ConnectionLostError(f"{kind} from {wire.name}: the slot moved") from reply
            raise reply
    return raw[-1] if wait is not None else None


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
