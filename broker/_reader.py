"""The reader of a subscription: one per node (per slot on a cluster, where Redis refuses a
multi-key read across slots even on one node), reading the streams that node owns.

Its loop, in order of priority: first this consumer's own pending entries (``XREADGROUP`` with
id ``0``, on start and after every reconnect), then entries other consumers left pending for
longer than ``claim_idle`` (``XAUTOCLAIM``, every ``claim_interval``, pipelined over the
streams), then new ones (one blocking ``XREADGROUP ... >`` over the streams). Readers share
the ledger's room: each reserves its share of ``prefetch`` before it reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from ._errors import ConnectionLostError
from ._ledger import Ledger
from ._retry import no_reply
from ._settle import GroupCalls, Settler
from ._stream import Stream, decode_entry
from ._topology import Link, routing_error
from ._wire import Wire, bulk, pack

__all__ = ["ReadOptions", "Reader"]


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
        self.reconnects = 0
        self._replay_cursors: dict[str, str] = {}
        self._claim_cursors: dict[str, str] = {}
        # the new-entries read is the same command every time but for COUNT: packed once, as
        # bare arguments (the array header carries the count of all of them)
        head = (b"XREADGROUP", b"GROUP", options.group.encode(), options.consumer.encode())
        tail = (b"BLOCK", b"%d" % int(options.block * 1000), b"STREAMS")
        keys = [s.key.encode() for s in streams]
        self._read_head = b"*%d\r\n" % (len(head) + 2 + len(tail) + 2 * len(keys)) + b"".join(
            map(bulk, head)
        )
        self._read_tail = b"".join(map(bulk, (*tail, *keys, *(b">" for _ in keys))))

    def __repr__(self) -> str:
        return f"<Reader {self.wire.name} {len(self.streams)} streams>"

    async def run(self) -> None:
        ledger = self.ledger
        topology = self.link.topology
        backoff = self.link.settings.retry.backoff()
        replay = {s.key for s in self.streams}
        next_claim = 0.0
        while not self.stopped():
            room = min(ledger.room_left(), self.share)
            if room <= 0:
                await ledger.wait_room()
                continue
            # each step gets what is left of the reconnect deadline: a stalled server (which
            # still accepts connections) must not hold it longer
            started = time.monotonic()
            limit = backoff.limit()
            ledger.reserved += room
            try:
                if replay:
                    async with _bounded(limit):
                        await self._replay(replay, room)
                elif started >= next_claim:
                    async with _bounded(limit):
                        await self._claim(room)
                    next_claim = time.monotonic() + self.options.claim_interval
                else:
                    started += self.options.block  # the server may hold the read this long
                    await self._read_new(room, limit)
                backoff.reset()
            except ConnectionLostError as exc:
                if backoff.since is None:
                    self.reconnects += 1
                await backoff.wait(exc, started)
                # a failover or a moved slot: the subscription regroups its readers when the
                # slot map changed (this reader is then cancelled)
                await topology.refresh(str(exc))
                # a reply lost with the connection may have moved entries to our pending list
                replay = {s.key for s in self.streams}
            finally:
                ledger.reserved -= room
            if ledger.buffer and ledger.waiters:
                # let the waiting reader take what just arrived before the next read is
                # sent: sending first would add its system calls to every message's latency
                await asyncio.sleep(0)

    # -- the three kinds of read --------------------------------------------------------------

    async def _replay(self, replay: set[str], room: int) -> None:
        """One page of this consumer's own pending entries per stream still replaying."""
        cursors = self._replay_cursors
        streams = [s for s in self.streams if s.key in replay]
        ids = {s.key: cursors.get(s.key, "0") for s in streams}
        # COUNT is per stream: share the room so a replay over many streams stays bounded
        per_stream = max(1, -(-room // len(streams)))
        args: list[bytes | str | int] = [b"XREADGROUP", b"GROUP", self.options.group]
        args += [self.options.consumer, b"COUNT", per_stream, b"STREAMS", *ids, *ids.values()]
        self.ledger.read_cancelled = True  # a cancel mid-call may leave entries we never saw
        payload = pack(*args)
        reply = await self.calls.call(lambda: self._xreadgroup(payload, 0.0, None))
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
            cursors[stream.key] = entries[-1][0].decode()
            await self._ingest(stream, entries, counted=True)

    async def _claim(self, room: int) -> None:
        """``XAUTOCLAIM`` on every stream, pipelined: entries idle longer than ``claim_idle``
        (left by a dead or stuck consumer, or released by a stopping one)."""
        r = self.link.redis
        idle_ms = int(self.options.claim_idle * 1000)
        cursors = self._claim_cursors
        per_stream = max(1, -(-room // len(self.streams)))

        async def claim() -> list[Any]:
            pipe = r.pipeline(transaction=False)
            for s in self.streams:
                pipe.xautoclaim(
                    s.key,
                    self.options.group,
                    self.options.consumer,
                    idle_ms,
                    cursors.get(s.key, "0-0"),
                    count=per_stream,
                )
            return list(await pipe.execute())

        self.ledger.read_cancelled = True  # a cancel mid-call may leave entries we never saw
        replies = await self.calls.call(claim)
        self.ledger.read_cancelled = False
        for stream, reply in zip(self.streams, replies, strict=True):
            cursors[stream.key] = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
            entries = [e for e in reply[1] if e[0] is not None]
            if len(reply) > 2 and reply[2]:
                # Redis 7 drops trimmed entries from the pending list while it scans
                self.settler.note_trimmed(stream, [i.decode() for i in reply[2]], ack=False)
            if entries:
                self.ledger.claimed += len(entries)
                await self._ingest(stream, entries, counted=True)

    async def _read_new(self, room: int, limit: float | None) -> None:
        per_stream = max(1, -(-room // len(self.streams)))
        payload = self._read_head + b"$5\r\nCOUNT\r\n" + bulk(b"%d" % per_stream) + self._read_tail
        self.ledger.read_cancelled = True  # cleared below unless the read is cancelled midway
        reply = await self.calls.call(lambda: self._xreadgroup(payload, self.options.block, limit))
        self.ledger.read_cancelled = False
        for key, entries in reply:
            await self._ingest(self.by_key[key], entries, counted=False)

    async def _xreadgroup(
        self, payload: bytes, wait: float, limit: float | None
    ) -> list[tuple[bytes, list[Any]]]:
        """``XREADGROUP`` as the server sends it: ``[(key, [[id, [field, value, ...]]])]``
        (fields ``None`` for an entry deleted while pending); RESP2 or RESP3."""
        (reply,) = await self.wire.execute(payload, 1, wait=wait, limit=limit)
        if isinstance(reply, BaseException):
            kind = routing_error(reply)
            if kind is not None:  # the slot moved or its node failed over
                raise ConnectionLostError(f"{kind} from {self.wire.name}") from reply
            raise reply
        if isinstance(reply, dict):  # RESP3 (redis-py's default protocol since 8.0) sends a map
            return list(reply.items())
        return reply or []

    # -- turning entries into messages --------------------------------------------------------

    async def _ingest(self, stream: Stream, entries: list[Any], *, counted: bool) -> None:
        """Turn entries into messages; trimmed, poison and over-delivered ones are settled here.

        ``entries`` are ``(id, fields)`` with fields a dict, a flat ``[field, value, ...]`` list
        as the server sends it, or empty/None for an entry deleted while pending.
        """
        ledger = self.ledger
        owner = ledger.owner
        if not counted:  # new entries: delivered for the first time, never held
            buffer, before, bad = ledger.buffer, len(ledger.buffer), False
            for raw_id, fields in entries:
                msg = decode_entry(stream, raw_id.decode(), fields, 1, owner)
                if msg.error is None and fields:
                    buffer.append(msg)
                else:
                    bad = True
                    self._settle_bad(stream, msg)
            ledger.buffered_total += len(buffer) - before
            if bad:
                self.settler.kick()
                ledger.make_room()
            if buffer:
                ledger.wake(len(buffer))
            return
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
        ledger.arriving = set()
        self.settler.kick()
        ledger.make_room()
        if ledger.buffer:
            ledger.wake(len(ledger.buffer))

    def _settle_bad(self, stream: Stream, msg: Any) -> None:
        """A new entry that cannot be handed out: trimmed already, or undecodable."""
        if msg.error is not None:
            self.settler.dead_letter(msg, msg.error)
        else:  # deleted before we read it: nothing left to deliver
            self.settler.note_trimmed(stream, [msg.id])


@contextlib.asynccontextmanager
async def _bounded(limit: float) -> AsyncIterator[None]:
    """``asyncio.timeout(limit)``, its expiry reported as a lost connection (a stall)."""
    try:
        async with asyncio.timeout(limit):
            yield
    except TimeoutError:
        raise no_reply(limit) from None
