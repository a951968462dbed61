"""The ledger of a subscription: every entry it holds and has not settled.

- **buffered**: fetched, not yet handed out;
- **in flight**: handed out, neither acked nor nacked;
- **retrying**: nacked, waiting for their backoff before being delivered again;
- **arriving**: read by a replay or a claim whose reply is being turned into messages.

What the ledger holds bounds memory and this consumer's pending list (``prefetch``, see
:meth:`Ledger.room_left`). It keeps held entries fresh, so other consumers do not claim them
while they wait or run (``XCLAIM ... JUSTID`` every ``claim_idle / 3``, after checking they are
still this consumer's), redelivers nacked ones when due, and releases what was fetched but not
handed out when the subscription stops (idle time "forever": any consumer's next claim takes
them).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import heapq
import itertools
import logging
import time
from typing import Any, Generic, TypeVar

from ._decode import decode_entry
from ._errors import ConnectionLostError
from ._message import Message, Settles
from ._settle import GroupCalls, Settler
from ._stream import Stream
from ._topology import Link

__all__ = ["RELEASE_IDLE_MS", "Ledger"]

log = logging.getLogger("broker.subscription")
T = TypeVar("T")
#: "idle since forever": the next XAUTOCLAIM of any consumer takes a released entry
RELEASE_IDLE_MS = 10**12
_SCAN_PAGE = 200
_SCAN_PAGES = 10


class Ledger(Generic[T]):
    """Entries held by one subscription, and the loops that keep them (see the module)."""

    def __init__(
        self,
        link: Link,
        calls: GroupCalls,
        settler: Settler,
        *,
        consumer: str,
        prefetch: int,
        claim_idle: float,
        streams: list[Stream],
    ) -> None:
        self.link = link
        self.calls = calls
        self.settler = settler
        self.group = calls.group
        self.consumer = consumer
        self.prefetch = prefetch
        self.claim_idle = claim_idle
        self.streams = streams
        self.by_key = {s.key: s for s in streams}
        #: what messages settle through (the subscription)
        self.owner: Settles | None = None
        self.buffer: collections.deque[Message[T]] = collections.deque()
        #: handed out, not settled; keyed by the message itself (no key tuple per message: a
        #: subscription never has two messages of one entry in hand)
        self.inflight: dict[Message[T], bool] = {}
        self.retry: list[tuple[float, int, Message[T]]] = []
        self._seq = itertools.count()
        #: entries read by a replay or a claim, not yet buffered (see release_unhanded)
        self.arriving: set[tuple[str, str]] = set()
        #: room taken by reads on the wire (several readers share ``prefetch``)
        self.reserved = 0
        self._readers: list[Any] = []
        self._share = prefetch
        self._reader_of: dict[str, int] = {}
        #: a read, claim or replay was cancelled midway: it may have left entries in our
        #: pending list that we never saw
        self.read_cancelled = False
        #: tasks waiting for a message (in __anext__ or chunks()), woken one per message
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        #: a waiting reader was woken since the readers last yielded (see Reader._loop)
        self.woken = False
        self.room = asyncio.Event()
        self.parked = 0  # readers waiting for room
        self.parked_hungry = 0  # ... of which have entries to read
        self.retry_wake = asyncio.Event()
        #: delivered = buffered so far - still buffered - dropped from the buffer unhanded
        #: (so the hot path keeps no per-message counter)
        self.buffered_total = 0
        self.unhanded = 0
        #: held entries found claimed by another consumer (reported once each)
        self._lost: set[tuple[str, str]] = set()
        self.nacked = 0
        self.claimed = 0
        self.released = 0
        #: per channel: [delivered, nacked, claimed, released] (counted per batch, not per
        #: message, except nacks, which are per message anyway)
        self.per_channel: dict[str, list[int]] = {s.channel: [0, 0, 0, 0] for s in streams}

    # -- waking -------------------------------------------------------------------------------

    def wake(self, n: int | None = None) -> None:
        """Wake ``n`` waiting readers (one per message that arrived), or all of them."""
        waiters = self.waiters
        while waiters and (n is None or n > 0):
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                self.woken = True
                if n is not None:
                    n -= 1

    async def wait_readable(self, seconds: float | None) -> None:
        """Wait until woken by :meth:`wake` (a message arrived, or the end); TimeoutError
        after ``seconds``."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            if seconds is None:  # the common case: no timeout context to enter and leave
                await fut
            else:
                async with asyncio.timeout(seconds):
                    await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.wake(1)  # woken, then cancelled or timed out: the message is not ours
            else:
                fut.cancel()  # wake() skips it
            raise
        if len(self.buffer) > 1 and self.waiters:
            # pass it on: arrivals wake one reader, and each woken reader that leaves more
            # than it takes wakes the next. Waking one per message instead woke readers
            # for messages the first one had taken already (a handler that never waits
            # takes them all), only for them to find nothing and wait again
            self.wake(1)

    # -- room ---------------------------------------------------------------------------------

    def room_left(self) -> int:
        """Room for more messages: ``prefetch`` minus the messages not yet settled and the room
        reserved by reads on the wire.

        An acked message no longer counts while its ack is on its way (the next read goes out
        next to the ``XACK``, not after it), but unsent acks are bounded too: beyond
        ``prefetch`` of them, reading waits. So at most ``2 * prefetch`` entries of this
        consumer are pending on the server.
        """
        held = len(self.buffer) + len(self.inflight) + len(self.retry) + len(self.settler.dead)
        acks = self.settler.unsent()
        return self.prefetch - held - self.reserved - max(0, acks - self.prefetch)

    def set_readers(self, readers: list[Any], share: int) -> None:
        """The readers sharing the room (each with ``keys``, ``hungry`` and ``reserved``)."""
        self._readers = readers
        self._share = share
        self._reader_of = {key: i for i, r in enumerate(readers) for key in r.keys}

    def room_for(self, reader: Any) -> int:
        """Room for one of several readers. Each hungry reader (one whose streams may have
        more) is owed its share of ``prefetch``, minus what it holds: the others may not take
        that. The rest is anyone's. So a reader that starts first cannot fill the room before
        the others start, and one waiting on drained streams keeps nothing from the others."""
        left = self.room_left()
        readers = self._readers
        if len(readers) < 2:
            return left
        held = [0] * len(readers)
        of = self._reader_of
        for m in itertools.chain(self.buffer, self.inflight, (m for _, _, m in self.retry)):
            held[of[m._stream.key]] += 1  # type: ignore[union-attr]
        share = self._share
        owed = 0
        mine = 0
        for i, r in enumerate(readers):
            free = max(0, share - held[i] - r.reserved)
            if r is reader:
                mine = free
            elif r.hungry:
                owed += free
        return max(min(left, mine), left - owed)

    async def wait_room(self, hungry: bool = True) -> None:
        """Wait until room may have been made. ``hungry``: the waiting reader has entries to
        read (a drained reader waiting only yields to those, so drained readers never wait on
        each other)."""
        self.room.clear()
        self.parked += 1
        self.parked_hungry += hungry
        try:
            await self.room.wait()
        finally:
            self.parked -= 1
            self.parked_hungry -= hungry

    def make_room(self) -> None:
        self.room.set()

    # -- holding ------------------------------------------------------------------------------

    def held(self) -> set[tuple[str, str]]:
        """``(stream key, id)`` of what this subscription holds or is settling (a replay after
        a reconnect skips these)."""
        held = {(m._stream.key, m.id) for m in self.buffer if m._stream}
        held.update((m._stream.key, m.id) for m in self.inflight if m._stream)
        held.update((m._stream.key, m.id) for _, _, m in self.retry if m._stream)
        return held | self.settler.held()

    def schedule_retry(self, msg: Message[T], delay: float) -> None:
        stream = msg._stream
        assert stream is not None
        # reset the entry's idle time so no other consumer claims it during the delay
        self.settler.touch_ids(stream.key, [msg.id])
        heapq.heappush(self.retry, (time.monotonic() + delay, next(self._seq), msg))
        self.retry_wake.set()

    async def retry_loop(self) -> None:
        """Deliver nacked messages again when their backoff is over (``XCLAIM`` by this
        consumer, which counts the delivery), unless another consumer took them meanwhile."""
        r = self.link.redis
        while True:
            if not self.retry:
                self.retry_wake.clear()
                await self.retry_wake.wait()
                continue
            wait = self.retry[0][0] - time.monotonic()
            if wait > 0:
                self.retry_wake.clear()
                try:
                    async with asyncio.timeout(wait):
                        await self.retry_wake.wait()
                except TimeoutError:
                    pass
                continue
            due: dict[str, list[Message[T]]] = {}
            while self.retry and self.retry[0][0] <= time.monotonic():
                msg = heapq.heappop(self.retry)[2]
                assert msg._stream is not None
                due.setdefault(msg._stream.key, []).append(msg)
            for key, msgs in due.items():
                stream = self.by_key[key]
                rows = await self.calls.retry(
                    functools.partial(self.pending_rows, stream, [m.id for m in msgs]), stream
                )
                # only entries still ours: one claimed by another consumer meanwhile is theirs
                ids = [m.id for m in msgs if m.id in rows and _owner(rows[m.id]) == self.consumer]
                if not ids:
                    continue
                claim = functools.partial(r.xclaim, key, self.group, self.consumer, 0, ids)
                entries = await self.calls.retry(claim, stream)
                prior = {m.id: m.deliveries for m in msgs}
                # Redis 7 drops an entry deleted (trimmed) meanwhile from the pending list when
                # XCLAIM meets it and returns nothing for it: it was ours a moment ago, so it
                # is gone, not claimed by another consumer
                returned = {e[0].decode() for e in entries}
                self.settler.note_trimmed(stream, [i for i in ids if i not in returned], ack=False)
                for raw_id, fields in entries:
                    entry_id = raw_id.decode()
                    if not fields:
                        self.settler.note_trimmed(stream, [entry_id])
                        continue
                    deliveries = prior.get(entry_id, 0) + 1
                    msg = decode_entry(stream, entry_id, fields, deliveries, self.owner)
                    if msg.error is not None:
                        self.settler.dead_letter(msg, msg.error)
                    else:
                        self.buffer.append(msg)
                        self.buffered_total += 1
                        self.per_channel[stream.channel][0] += 1
                self.settler.kick()
                self.make_room()
                self.wake(len(self.buffer))

    async def keep_fresh_loop(self) -> None:
        """Keep held entries (buffered, in handlers, waiting for retry) from looking idle to
        other consumers, so a slow handler's or a waiting read-ahead's entry is not claimed."""
        period = self.claim_idle / 3
        while True:
            await asyncio.sleep(period)
            held: dict[str, list[str]] = {}
            for m in itertools.chain(self.buffer, self.inflight, (m for _, _, m in self.retry)):
                if m._stream is not None:
                    held.setdefault(m._stream.key, []).append(m.id)
            for key, ids in held.items():
                # touch only what is still ours: after a stall another consumer may have
                # claimed an entry, and a blind XCLAIM would take it back from under it
                try:
                    rows = await self.pending_rows(self.by_key[key], ids)
                except ConnectionLostError:
                    continue  # best effort: the readers own reconnecting
                owners = {i: _owner(row) for i, row in rows.items()}
                # each loss is reported once (a stuck handler keeps its entry in hand)
                lost = [
                    i for i in ids if owners.get(i) != self.consumer and (key, i) not in self._lost
                ]
                self._lost.update((key, i) for i in lost)
                if len(self._lost) > 4096:
                    self._lost.clear()
                if lost:
                    log.warning(
                        "%s/%s: %d held entries of %s were claimed by other consumers meanwhile "
                        "(this process stalled for longer than claim_idle)",
                        self.group,
                        self.consumer,
                        len(lost),
                        key,
                    )
                self.settler.touch_ids(key, [i for i in ids if owners.get(i) == self.consumer])
            if self.settler.touch:
                self.settler.wake.set()

    # -- reading the server -------------------------------------------------------------------

    async def pending_rows(self, stream: Stream, ids: list[Any]) -> dict[str, Any]:
        """The pending-list row (owner, delivery count) of each entry, in one round trip."""
        r = self.link.redis

        async def fetch() -> list[Any]:
            pipe = r.pipeline(transaction=False)
            for entry_id in ids:
                pipe.xpending_range(stream.key, self.group, min=entry_id, max=entry_id, count=1)
            return list(await pipe.execute())

        return {
            row["message_id"].decode(): row
            for rows in await self.calls.call(fetch, stream)
            for row in rows
        }

    async def own_pending(self, stream: Stream) -> list[Any]:
        """This consumer's pending entries on ``stream`` (up to a bounded number of pages)."""
        r = self.link.redis
        rows: list[Any] = []
        start = "-"
        for _ in range(_SCAN_PAGES):
            page = await self.calls.retry(
                functools.partial(
                    r.xpending_range,
                    stream.key,
                    self.group,
                    min=start,
                    max="+",
                    count=_SCAN_PAGE,
                    consumername=self.consumer,
                ),
                stream,
            )
            rows += page
            if len(page) < _SCAN_PAGE:
                break
            start = "(" + page[-1]["message_id"].decode()
        return rows

    async def release_unhanded(self) -> None:
        """Make fetched-but-not-handed-out entries claimable by other consumers at once."""
        by_key: dict[str, dict[str, int]] = {}
        for msg in itertools.chain(self.buffer, (m for _, _, m in self.retry)):
            if msg._stream is not None:
                by_key.setdefault(msg._stream.key, {})[msg.id] = msg.deliveries - 1
        self.unhanded += len(self.buffer)
        for m in self.buffer:  # fetched but never handed out: not delivered after all
            self.per_channel[m.channel][0] -= 1
        self.buffer.clear()
        self.retry.clear()
        r = self.link.redis
        if self.read_cancelled or self.arriving:
            # a read, claim or replay cancelled midway may have left entries in our pending
            # list that we never saw: release every one we do not hold (bounded scan)
            keep = {(m._stream.key, m.id) for m in self.inflight if m._stream}
            keep |= {(key, i) for key, ids in self.settler.acks.items() for i in ids}
            for stream in self.streams:
                for row in await self.own_pending(stream):
                    entry_id = row["message_id"].decode()
                    released = row["time_since_delivered"] >= RELEASE_IDLE_MS // 2
                    if (stream.key, entry_id) in keep or released:
                        continue  # in a handler, or released already
                    retries = int(row["times_delivered"]) - 1
                    by_key.setdefault(stream.key, {}).setdefault(entry_id, retries)
            self.read_cancelled = False
            self.arriving = set()
        if not any(by_key.values()):
            return

        async def release() -> None:
            pipe = r.pipeline(transaction=False)
            for key, ids in by_key.items():
                for retries, group_ids in _group_by_value(ids).items():
                    pipe.xclaim(
                        key,
                        self.group,
                        self.consumer,
                        0,
                        group_ids,
                        idle=RELEASE_IDLE_MS,
                        retrycount=max(0, retries),
                        justid=True,
                    )
            await pipe.execute()

        await self.calls.retry(release)
        self.released += sum(map(len, by_key.values()))
        for key, ids in by_key.items():
            self.per_channel[self.by_key[key].channel][3] += len(ids)


def _owner(row: Any) -> str:
    consumer = row["consumer"]
    return consumer.decode() if isinstance(consumer, bytes) else str(consumer)


def _group_by_value(ids: dict[str, int]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for entry_id, value in ids.items():
        out.setdefault(value, []).append(entry_id)
    return out
