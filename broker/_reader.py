"""The reader of a subscription: one per node, reading the streams that node owns.

Its loop, in order of priority: first this consumer's own pending entries (``XREADGROUP`` with
id ``0``, on start and after every reconnect), then entries other consumers left pending for
longer than ``claim_idle`` (``XAUTOCLAIM``, every ``claim_interval``, pipelined over the
streams), then new ones. Readers share the ledger's room: each reserves its share of
``prefetch`` before it reads.

New entries are read in one of two ways:

- **blocking**: one ``XREADGROUP ... BLOCK`` over every stream, when one command may name them
  all (one server, or one slot of a cluster: Redis refuses a multi-key command across slots,
  even on one node) and they are few (``BLOCKING_STREAMS``): the server answers the moment an
  entry arrives;
- **doorbell**: otherwise. Producers ring a stream's bell after appending (``PUBLISH`` on the
  stream's key, ``SPUBLISH`` on a cluster; see :class:`._publisher.Bells`); the reader waits on
  the broker's pub/sub hub and reads only the streams rung, with non-blocking ``XREADGROUP``
  (one per slot) in one round trip. So the cost of a read does not grow with the streams that
  have nothing, and a node with many slots still costs one round trip. Every ``block`` seconds
  it reads every stream anyway: an entry whose bell was lost (a reconnect) or never rung (a
  foreign producer such as ``redis-cli XADD``) waits at most that long.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ._decode import decode_entry, decode_new
from ._errors import BrokerError, ConnectionLostError, RedisCommandError
from ._ledger import Ledger
from ._pubsub import Listener
from ._resource import cancel_and_wait
from ._retry import no_reply
from ._scripts import UNREAD
from ._settle import GroupCalls, Settler
from ._stream import Stream
from ._topology import Link, Topology, routing_error, slot_of
from ._wire import Wire, bulk, pack

log = logging.getLogger("broker.subscription")

__all__ = ["BLOCKING_STREAMS", "ReadOptions", "Reader", "reader_groups"]

#: a reader blocks on its streams (one command) when they are at most this many
BLOCKING_STREAMS = 16


def reader_groups(topology: Topology, streams: list[Stream]) -> list[tuple[Wire, list[Stream]]]:
    """The streams by node (one reader each)."""
    if topology.single is not None:
        return [(topology.single, streams)]
    groups: dict[str, tuple[Wire, list[Stream]]] = {}
    for s in streams:
        wire = topology.wire_for(s.key)
        groups.setdefault(wire.name, (wire, []))[1].append(s)
    return list(groups.values())


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    group: str
    consumer: str
    block: float
    claim_idle: float
    claim_interval: float
    max_deliveries: int


class Reader:
    """Reads ``streams`` (all owned by ``wire``'s node) into the ledger until stopped.

    :param share: the most room this reader reserves for one read (its share of ``prefetch``).
    :param stopped: tells whether the subscription stopped (the loop ends between reads).
    """

    def __init__(
        self,
        link: Link,
        calls: GroupCalls,
        ledger: Ledger[Any],
        settler: Settler,
        options: ReadOptions,
        *,
        wire: Wire,
        streams: list[Stream],
        share: int,
        stopped: Callable[[], bool],
    ) -> None:
        self.link = link
        self.calls = calls
        self.ledger = ledger
        self.settler = settler
        self.options = options
        self.wire = wire
        self.streams = streams
        self.by_key = {s.key.encode(): s for s in streams}
        self.share = share
        self.stopped = stopped
        self.keys = frozenset(st.key for st in streams)
        #: room this reader holds for the read on the wire
        self.reserved = 0
        self.reconnects = 0
        self._replay_cursors: dict[str, str] = {}
        self._claim_cursors: dict[str, str] = {}
        cluster = link.topology.single is None
        by_slot: dict[int, list[Stream]] = {}
        for st in streams:
            by_slot.setdefault(slot_of(st.key) if cluster else 0, []).append(st)
        #: the streams by what one command may name together (all of them on one server)
        self.slot_groups = list(by_slot.values())
        self._group_of = {st.key: i for i, g in enumerate(self.slot_groups) for st in g}
        self._stream_of = {st.key: st for st in streams}
        self.blocking = len(self.slot_groups) == 1 and len(streams) <= BLOCKING_STREAMS
        #: the last blocking read drained the streams: the next one waits for new entries
        self._drained = False
        self._polled = False  # a doorbell reader's first poll is done
        self._turn = 0  # which streams come first when there is not room for every one
        #: doorbell mode: streams rung since their last read, and the event that wakes us
        self._dirty: set[str] = set()
        self._rung = asyncio.Event()
        self._listeners: list[Listener] = []
        # the new-entries read is the same command every time but for COUNT: packed once, as
        # bare arguments (the array header carries the count of all of them)
        head = (b"XREADGROUP", b"GROUP", options.group.encode(), options.consumer.encode())
        keys = [s.key.encode() for s in streams]
        self._read_head = b"*%d\r\n" % (len(head) + 5 + 2 * len(keys)) + b"".join(map(bulk, head))
        self._read_tail = b"".join(map(bulk, (b"STREAMS", *keys, *(b">" for _ in keys))))
        self._claim_head = bulk(options.group.encode()) + bulk(options.consumer.encode())

    @property
    def hungry(self) -> bool:
        """Its streams may have more: it has not read them yet, its last read was full, or
        a bell rang. Hungry readers are owed their share of the room (see Ledger.room_for)."""
        return not self._drained if self.blocking else bool(self._dirty) or not self._polled

    def __repr__(self) -> str:
        mode = "blocking" if self.blocking else "doorbell"
        return f"<Reader {self.wire.name} {len(self.streams)} streams, {mode}>"

    # -- doorbells ----------------------------------------------------------------------------

    def _ring(self, key: str) -> None:
        self._dirty.add(key)
        self._rung.set()

    def _bell(self, key: str) -> Callable[[bytes], None]:
        def ring(_data: bytes) -> None:
            self._ring(key)

        return ring

    async def _gap(self) -> None:
        """Bells may have been lost (the hub reconnected, or a channel moved): read them all."""
        self._dirty.update(s.key for s in self.streams)
        self._rung.set()

    async def _listen(self) -> None:
        """Register a bell per stream before the first read: a bell rung after it is heard."""
        hub = self.link._pubsub_hub()
        self._listeners = [Listener(st.key, self._bell(st.key), self._gap) for st in self.streams]
        try:
            await hub.add_many(self._listeners)
            self._dirty.update(st.key for st in self.streams)
        except BrokerError as exc:
            # e.g. no permission for these channels: reading still works, by polling
            log.warning("%r: cannot listen for doorbells (%s); polling every %gs", self, exc,
                        self.options.block)  # fmt: skip
            self._listeners = []

    async def run(self) -> None:
        # a doorbell reader registers its bells while it replays, claims and polls (opening
        # the pub/sub connection takes a few round trips); once they are heard, it polls
        # again, so an entry whose bell rang in between is not left for the next poll
        listening = None
        if not self.blocking:
            listening = asyncio.create_task(self._listen(), name=f"{self!r} bells")
            listening.add_done_callback(lambda _: self._rung.set())
        try:
            await self._loop()
        finally:
            if listening is not None:
                await cancel_and_wait(listening)
            if self._listeners:
                await self.link._pubsub_hub().remove_many(self._listeners)

    async def _loop(self) -> None:
        ledger = self.ledger
        topology = self.link.topology
        backoff = self.link.settings.retry.backoff()
        replay = {s.key for s in self.streams}
        next_claim = 0.0
        next_poll = 0.0
        while not self.stopped():
            if not self.blocking and not replay and not self._dirty:
                # a doorbell reader waits for a bell (or its next poll or claim) holding no room
                now = time.monotonic()
                if now < next_poll and now < next_claim:
                    await self._wait_rung(min(next_poll, next_claim) - now)
                    continue
            left = ledger.room_for(self)
            room = min(left, self.share)
            if self.blocking and self._drained and not replay and left < ledger.prefetch:
                if ledger.parked_hungry:
                    # a reader with entries to read waits for room, and ours would only wait
                    # on drained streams: it goes first
                    await ledger.wait_room(hungry=False)
                    continue
                # waiting on drained streams while others hold room: reserve one entry per
                # stream, not a whole share, so room held while nothing comes serves the other
                # readers (the first entry wakes us; the next read takes the rest)
                room = min(room, len(self.streams))
            if room <= 0:
                await ledger.wait_room(hungry=self.hungry)
                continue
            # each step gets what is left of the reconnect deadline: a stalled server (which
            # still accepts connections) must not hold it longer
            started = time.monotonic()
            limit = backoff.limit()
            ledger.reserved += room
            self.reserved = room
            try:
                if replay:
                    async with _bounded(limit):
                        await self._replay(replay, room)
                elif started >= next_claim:
                    async with _bounded(limit):
                        await self._claim(room)
                    next_claim = time.monotonic() + self.options.claim_interval
                elif self.blocking:
                    # block until the next claim is due at the latest
                    block = max(0.001, min(self.options.block, next_claim - started))
                    started += block  # the server may hold the read this long
                    await self._read_new(room, limit, block)
                else:
                    async with _bounded(limit):
                        if time.monotonic() >= next_poll:
                            await self._poll()
                            next_poll = time.monotonic() + self.options.block
                        await self._read_rung(room)
                backoff.reset()
            except ConnectionLostError as exc:
                if backoff.since is None:
                    self.reconnects += 1
                await backoff.wait(exc, started)
                # a failover or a moved slot: the subscription regroups its readers when the
                # slot map changed (this reader is then cancelled)
                await topology.refresh(str(exc))
                # a reply lost with the connection may have moved entries to our pending list,
                # anywhere in it (a claim's entries may be older than a replay's cursor), and a
                # replay page read but not taken in (its XPENDING lost) is not delivered: the
                # replay starts over from the first pending entry (held ones are skipped)
                replay = {s.key for s in self.streams}
                self._replay_cursors.clear()
                next_poll = 0.0
            finally:
                ledger.reserved -= room
                self.reserved = 0
                ledger.make_room()  # what this read did not use may serve another reader
            if ledger.woken:
                # let the woken reader take what just arrived before the next read is sent:
                # sending first would add its system calls (and the wait for the connection)
                # to every message's latency
                ledger.woken = False
                await asyncio.sleep(0)

    # -- the three kinds of read --------------------------------------------------------------

    def _nonblocking_reads(self, positions: dict[str, str], count: int) -> tuple[bytes, int]:
        """``XREADGROUP ... COUNT count STREAMS ...`` for the given streams and ids, one command
        per slot group (a cluster refuses one across slots), as one payload."""
        by_group: dict[int, list[str]] = {}
        group_of = self._group_of
        for key in positions:  # the streams asked for, not every stream of the reader
            by_group.setdefault(group_of[key], []).append(key)
        parts = []
        for keys in by_group.values():
            args: list[bytes | str | int] = [b"XREADGROUP", b"GROUP", self.options.group]
            args += [self.options.consumer, b"COUNT", count, b"STREAMS", *keys]
            args += [positions[k] for k in keys]
            parts.append(pack(*args))
        return b"".join(parts), len(parts)

    async def _read_positions(
        self, positions: dict[str, str], count: int
    ) -> list[tuple[bytes, list[Any]]]:
        payload, n = self._nonblocking_reads(positions, count)
        reply: list[tuple[bytes, list[Any]]] = await self.calls.call(
            lambda: self._xreadgroups(payload, n)
        )
        return reply

    async def _replay(self, replay: set[str], room: int) -> None:
        """One page of this consumer's own pending entries per stream still replaying."""
        cursors = self._replay_cursors
        # COUNT is per stream: share the room so a replay over many streams stays bounded
        streams, per_stream = self._split(room, [s for s in self.streams if s.key in replay])
        ids = {s.key: cursors.get(s.key, "0") for s in streams}
        self.ledger.read_cancelled = True  # a cancel mid-call may leave entries we never saw
        reply = await self._read_positions(ids, per_stream)
        self.ledger.read_cancelled = False
        got: dict[str, list[Any]] = {s.key: [] for s in streams}
        for key, entries in reply:
            got[self.by_key[key].key] = entries
        for stream in streams:
            entries = got[stream.key]
            if not entries:
                replay.discard(stream.key)
                cursors.pop(stream.key, None)
                continue
            # the cursor moves once the page is taken in: a connection lost meanwhile (the
            # XPENDING in _ingest) must not skip the page's entries
            await self._ingest(stream, entries, counted=True)
            cursors[stream.key] = entries[-1][0].decode()

    def _split(self, room: int, streams: list[Stream]) -> tuple[list[Stream], int]:
        """Which streams to read and the COUNT for each, so that no more than ``room`` entries
        can come back (COUNT is per stream): all of them when there is room for one each,
        else ``room`` of them, in turn."""
        n = len(streams)
        if room >= n:
            return streams, room // n
        start = self._turn % n
        self._turn += room
        return (streams[start:] + streams[:start])[:room], 1

    async def _claim(self, room: int) -> None:
        """``XAUTOCLAIM`` on every stream, in one round trip: entries idle longer than
        ``claim_idle`` (left by a dead or stuck consumer, or released by a stopping one).
        Packed here like the reads: over many streams, redis-py's pipeline would cost more
        than everything else a quiet subscription does."""
        idle = b"%d" % int(self.options.claim_idle * 1000)
        cursors = self._claim_cursors
        streams, per_stream = self._split(room, self.streams)
        count = b"%d" % per_stream
        head = self._claim_head
        payload = b"".join(
            b"*8\r\n$10\r\nXAUTOCLAIM\r\n%b%b%b%b$5\r\nCOUNT\r\n%b"
            % (bulk(s.key.encode()), head, bulk(idle), bulk(cursors.get(s.key, "0-0").encode()),
               bulk(count))
            for s in streams
        )  # fmt: skip
        self.ledger.read_cancelled = True  # a cancel mid-call may leave entries we never saw
        replies = await self.calls.call(lambda: self.wire.execute(payload, len(streams)))
        self.ledger.read_cancelled = False
        for stream, reply in zip(streams, replies, strict=True):
            if isinstance(reply, BaseException):
                kind = routing_error(reply)
                if kind is not None:  # the slot moved or its node failed over
                    raise ConnectionLostError(f"{kind} from {self.wire.name}") from reply
                await self.calls.call(_raise(reply), stream)
                continue
            cursors[stream.key] = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
            entries = [e for e in reply[1] if e is not None and e[0] is not None]
            if len(reply) > 2 and reply[2]:
                # Redis 7 drops trimmed entries from the pending list while it scans
                self.settler.note_trimmed(stream, [i.decode() for i in reply[2]], ack=False)
            if entries:
                self.ledger.claimed += len(entries)
                self.ledger.per_channel[stream.channel][2] += len(entries)
                await self._ingest(stream, entries, counted=True)

    async def _read_new(self, room: int, limit: float | None, block: float) -> None:
        per_stream = max(1, -(-room // len(self.streams)))
        # acks queued since the last read go ahead of it, on its connection (see take_riders)
        settler = self.settler
        riders = settler.take_riders(self.keys)
        ahead = [] if riders is None else settler.rider_commands(riders)
        payload = b"".join(
            (
                *ahead,
                self._read_head,
                b"$5\r\nCOUNT\r\n",
                bulk(b"%d" % per_stream),
                b"$5\r\nBLOCK\r\n",
                bulk(b"%d" % int(block * 1000)),
                self._read_tail,
            )
        )
        ledger = self.ledger
        ledger.read_cancelled = True  # cleared below unless the read is cancelled midway
        taken = False

        def settle(items: list[tuple[bytes, list[Any]]]) -> None:
            ledger.read_cancelled = False
            self._drained = sum(len(entries) for _, entries in items) < per_stream
            for key, entries in items:
                self._take_new(self.by_key[key], entries)

        def take(replies: list[Any]) -> None:
            # as soon as the reply is read (in the wire's callback, on hiredis): the messages
            # reach a waiting consumer before this task resumes, as if it had read them itself
            nonlocal taken
            try:
                items = self._xreadgroup_reply(replies[-1])
            except Exception:
                return  # raised below, through the group calls' error boundary
            taken = True
            settle(items)

        try:
            reply = await self.calls.call(
                lambda: self._xreadgroup(payload, block, limit, riders, take)
            )
        finally:
            if riders is not None:
                settler.riders_back(riders)  # unless their replies were read
        if taken:
            ledger.woken = False  # whom it woke has run already
        else:
            settle(reply)

    async def _wait_rung(self, seconds: float) -> None:
        """Wait for a bell (or ``seconds``, when a poll or a claim is due)."""
        self._rung.clear()
        if self._dirty:
            return
        try:
            async with asyncio.timeout(max(0.0, seconds)):
                await self._rung.wait()
        except TimeoutError:
            pass

    async def _poll(self) -> None:
        """Mark the streams that have unread entries (one script per slot group, in one round
        trip on this node's wire): an entry whose bell was lost, or never rung, waits at most
        one poll, and nothing is read (or held) to find out."""
        group = self.options.group.encode()
        payload = b"".join(
            pack(b"EVALSHA", UNREAD.sha, len(g), *(st.key for st in g), group)
            for g in self.slot_groups
        )
        n = len(self.slot_groups)
        replies = await self.calls.call(lambda: self.wire.execute(payload, n))
        if any(_no_script(r) for r in replies):  # a restarted or new node: load it there
            await self.calls.call(
                lambda: self.wire.execute(pack(b"SCRIPT", b"LOAD", UNREAD.source), 1)
            )
            replies = await self.calls.call(lambda: self.wire.execute(payload, n))
        for g, found in zip(self.slot_groups, replies, strict=True):
            if isinstance(found, BaseException):
                kind = routing_error(found)
                if kind is not None:
                    raise ConnectionLostError(f"{kind} from {self.wire.name}") from found
                await self.calls.call(_raise(found))
                continue
            self._dirty.update(g[int(i) - 1].key for i in found)
        self._polled = True

    async def _read_rung(self, room: int) -> None:
        """Read the streams rung (or all, at a poll) without blocking, one round trip; a stream
        that gave a full page stays rung (there may be more)."""
        streams = self._stream_of
        rung = [streams[key] for key in self._dirty]  # the rung ones, not every stream
        self._dirty.clear()
        if not rung:
            return
        chosen, per_stream = self._split(room, rung)
        keys = [st.key for st in chosen]
        self._dirty.update(st.key for st in rung if st not in chosen)  # next time
        self.ledger.read_cancelled = True  # cleared below unless the read is cancelled midway
        try:
            reply = await self._read_positions(dict.fromkeys(keys, ">"), per_stream)
        except BaseException:
            self._dirty.update(keys)  # not read: read them next time
            raise
        self.ledger.read_cancelled = False
        self._polled = True
        for key, entries in reply:
            if len(entries) >= per_stream:
                self._dirty.add(self.by_key[key].key)
            await self._ingest(self.by_key[key], entries, counted=False)

    async def _xreadgroups(self, payload: bytes, n: int) -> list[tuple[bytes, list[Any]]]:
        """``n`` non-blocking ``XREADGROUP`` in one round trip; their replies merged."""
        out: list[tuple[bytes, list[Any]]] = []
        for reply in await self.wire.execute(payload, n):
            out += self._xreadgroup_reply(reply)
        return out

    async def _xreadgroup(
        self,
        payload: bytes,
        wait: float,
        limit: float | None,
        riders: dict[str, list[str]] | None = None,
        done: Callable[[list[Any]], None] | None = None,
    ) -> list[tuple[bytes, list[Any]]]:
        """``XREADGROUP`` as the server sends it: ``[(key, [[id, [field, value, ...]]])]``
        (fields ``None`` for an entry deleted while pending); RESP2 or RESP3. ``riders``: the
        acks whose ``XACK`` commands go ahead of it, settled as soon as their replies are read;
        ``done``: see :meth:`Wire.execute`."""
        if riders is None:
            (reply,) = await self.wire.execute(payload, 1, wait=wait, limit=limit, done=done)
            return self._xreadgroup_reply(reply)
        n = len(riders)

        def landed(replies: list[Any]) -> None:
            self.settler.riders_landed(riders, replies)

        out = await self.wire.execute(
            payload, n + 1, wait=wait, limit=limit, early=(n, landed), done=done
        )
        return self._xreadgroup_reply(out[-1])

    def _xreadgroup_reply(self, reply: Any) -> list[tuple[bytes, list[Any]]]:
        if isinstance(reply, BaseException):
            kind = routing_error(reply)
            if kind is not None:  # the slot moved or its node failed over
                raise ConnectionLostError(f"{kind} from {self.wire.name}") from reply
            raise reply
        if isinstance(reply, dict):  # RESP3 (redis-py's default protocol since 8.0) sends a map
            items = list(reply.items())
        else:
            items = reply or []
        # what no Redis sends (a proxy's, a "compatible" server's): a typed error, not a crash
        # of the read loop
        if not isinstance(items, list) or not all(
            isinstance(x, list | tuple) and len(x) == 2 and x[0] in self.by_key
            and isinstance(x[1], list)
            for x in items
        ):  # fmt: skip
            raise RedisCommandError(f"unexpected reply to XREADGROUP: {reply!r:.200}")
        return items

    # -- turning entries into messages --------------------------------------------------------

    async def _ingest(self, stream: Stream, entries: list[Any], *, counted: bool) -> None:
        """Turn entries into messages; trimmed, poison and over-delivered ones are settled here.

        ``entries`` are ``(id, fields)`` with fields a dict, a flat ``[field, value, ...]`` list
        as the server sends it, or empty/None for an entry deleted while pending.
        """
        if not counted:
            self._take_new(stream, entries)
            return
        ledger = self.ledger
        owner = ledger.owner
        held = ledger.held()
        counts: dict[str, int] = {}
        if entries:
            # until they are buffered, a cancel (a stop) must still find these to release them
            ledger.arriving = {(stream.key, e[0].decode()) for e in entries}
            rows = await ledger.pending_rows(stream, [e[0] for e in entries])
            counts = {i: int(row["times_delivered"]) for i, row in rows.items()}
        max_deliveries = self.options.max_deliveries
        for raw_id, fields in entries:
            entry_id = raw_id.decode()
            if (stream.key, entry_id) in held:
                continue
            if not fields:  # trimmed (or deleted) while pending: nothing left to deliver
                self.settler.note_trimmed(stream, [entry_id])
                continue
            msg = decode_entry(stream, entry_id, fields, counts.get(entry_id, 1), owner)
            if msg.error is not None:
                self.settler.dead_letter(msg, msg.error)
            elif msg.deliveries > max_deliveries:
                self.settler.dead_letter(msg, f"delivered {msg.deliveries} times without an ack")
            else:
                ledger.buffer.append(msg)
                ledger.buffered_total += 1
                ledger.per_channel[stream.channel][0] += 1
        ledger.arriving = set()
        self.settler.kick()
        ledger.make_room()
        if ledger.buffer:
            ledger.wake(1)

    def _take_new(self, stream: Stream, entries: list[Any]) -> None:
        """New entries (delivered for the first time, never held) into the buffer; a waiting
        consumer is woken. Synchronous: it may run in the wire's reply callback."""
        ledger = self.ledger
        buffer, before = ledger.buffer, len(ledger.buffer)
        bad = decode_new(stream, entries, ledger.owner, buffer)
        for msg in bad:
            self._settle_bad(stream, msg)
        ledger.buffered_total += len(buffer) - before
        ledger.per_channel[stream.channel][0] += len(buffer) - before
        if bad:
            self.settler.kick()
            ledger.make_room()
        if buffer:
            ledger.wake(1)  # it wakes the next if it leaves some (see wait_readable)

    def _settle_bad(self, stream: Stream, msg: Any) -> None:
        """A new entry that cannot be handed out: trimmed already, or undecodable."""
        if msg.error is not None:
            self.settler.dead_letter(msg, msg.error)
        else:  # deleted before we read it: nothing left to deliver
            self.settler.note_trimmed(stream, [msg.id])


def _no_script(reply: object) -> bool:
    return isinstance(reply, BaseException) and (
        "NOSCRIPT" in str(reply) or "No matching script" in str(reply)
    )


def _raise(error: BaseException) -> Callable[[], Awaitable[None]]:
    """A call that raises ``error``: passed through the group calls' error boundary."""

    async def fail() -> None:
        raise error

    return fail


@contextlib.asynccontextmanager
async def _bounded(limit: float) -> AsyncIterator[None]:
    """``asyncio.timeout(limit)``, its expiry reported as a lost connection (a stall)."""
    try:
        async with asyncio.timeout(limit):
            yield
    except TimeoutError:
        raise no_reply(limit) from None
