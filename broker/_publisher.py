"""Coalesces concurrent publishes into pipelined ``XADD`` batches (a producer's linger).

A durable publish (``replicas=N``, Kafka's ``acks=all`` in Redis terms) ends its batch's payload
with ``WAIT N timeout`` on the same connection, one per batch per node: the server answers it once
N replicas have every write of that connection so far, or at the timeout with how many did. An
entry whose WAIT fell short is on the master only and comes back as
:class:`ReplicationTimeoutError` instead of its id.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import logging
import time
from collections.abc import Iterable
from typing import Any

from ._durable import WaitFor
from ._errors import ClosedError, ConnectionLostError, RedisCommandError, map_redis_errors
from ._retry import RetryPolicy, no_reply
from ._topology import Topology, ask_target, routing_error
from ._wire import Wire, bulk, pack

__all__ = ["Bells", "Publisher", "PublisherStatistics", "XAdd", "confirm"]

log = logging.getLogger("broker.publish")


@dataclasses.dataclass(slots=True)
class XAdd:
    """One entry to append."""

    key: str
    channel: str
    #: the encoded payload (field ``d``) and headers (field ``h``, absent when None)
    payload: bytes
    headers: bytes | None = None
    maxlen: int | None = None
    #: trim entries older than this id (MINID ~), computed from the server's clock
    minid: str | None = None
    #: return only once replicas have it (None: as soon as the master has it)
    wait: WaitFor | None = None


class Bells:
    """The doorbells producers ring: after appending to a stream, ``PUBLISH <stream key> ""``
    (``SPUBLISH`` on a cluster: the channel has the stream's hash tag, so the stream's node
    serves it) tells subscriptions that wait on the pub/sub hub instead of a blocking read
    (several slots, or many streams; see :mod:`._reader`) which stream to read.

    A bell is a hint, never needed for correctness (those subscriptions also poll). A stream
    whose bell reached nobody is not rung again for ``quiet`` seconds, so producers of
    channels read by plain blocking reads pay one bell per stream per ``quiet`` seconds.
    """

    def __init__(self, *, sharded: bool, quiet: float = 0.1) -> None:
        self.command = b"SPUBLISH" if sharded else b"PUBLISH"
        self.quiet = quiet
        self._muted: dict[str, float] = {}
        self._refused = False

    def pick(self, keys: Iterable[str]) -> list[str]:
        """The streams of a batch to ring now."""
        muted = self._muted
        if not muted:
            return list(dict.fromkeys(keys))
        now = time.monotonic()
        return [k for k in dict.fromkeys(keys) if muted.get(k, 0.0) <= now]

    def part(self, key: str) -> bytes:
        return _bell(self.command, key)

    def heard(self, key: str, reply: object) -> None:
        """A bell's reply: receivers (int), or an error (no permission for the channel)."""
        if isinstance(reply, int) and reply > 0:
            self._muted.pop(key, None)
            return
        quiet = self.quiet
        if isinstance(reply, BaseException):
            quiet = 60.0
            if not self._refused:
                self._refused = True
                log.warning(
                    "publish: ringing %s was refused (%s); subscriptions over many channels "
                    "or slots see new messages at their next poll (1 s) instead",
                    key,
                    reply,
                )
        self._muted[key] = time.monotonic() + quiet


@functools.lru_cache(maxsize=4096)
def _bell(command: bytes, key: str) -> bytes:
    return pack(command, key, b"")


@dataclasses.dataclass(frozen=True)
class PublisherStatistics:
    queued: int
    #: pipelines sent to the server (one round trip each)
    batches: int
    published: int
    largest_batch: int


class Publisher:
    """A bounded queue drained by one task that sends each batch as one pipeline.

    While a pipeline is on the wire, new publishes queue up and leave together in the next one,
    so coalescing costs no added latency; ``linger`` adds a fixed wait to collect more. One
    task and FIFO batches keep the order of publishes made by any one task.

    Publishes that wait for replicas (``XAdd.wait``) have a lane of their own: their queue and
    up to ``max_pipelines`` pipelines of their own, so that batches held by a ``WAIT`` never
    hold the publishes that do not wait (their batches are split by what they wait for).
    """

    def __init__(
        self,
        topology: Topology,
        *,
        retry: RetryPolicy,
        bells: Bells | None = None,
        max_batch: int = 512,
        max_queue: int = 10_000,
        linger: float = 0.0,
        max_pipelines: int = 4,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or max_pipelines < 1 or linger < 0:
            raise ValueError("max_batch, max_queue and max_pipelines must be >= 1 and linger >= 0")
        self._topology = topology
        self._bells = bells
        self._retry = retry
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._linger = linger
        self._queue: collections.deque[tuple[XAdd, asyncio.Future[str]]] = collections.deque()
        #: the durable lane's queue
        self._waiting: collections.deque[tuple[XAdd, asyncio.Future[str]]] = collections.deque()
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._closed = False
        #: pipelines on the wire (direct sends included), at most ``max_pipelines``: a publish
        #: arriving while one is out need not wait for its reply (the order of one task's
        #: publishes holds: each waits for its id)
        self._in_flight = 0
        #: the same for the durable lane
        self._in_flight_waiting = 0
        self._max_pipelines = max_pipelines
        self._slot_free = asyncio.Event()
        self._batches = 0
        self._published = 0
        self._largest = 0

    def statistics(self) -> PublisherStatistics:
        queued = len(self._queue) + len(self._waiting)
        return PublisherStatistics(queued, self._batches, self._published, self._largest)

    async def submit(self, item: XAdd) -> str:
        """Queue one entry and wait for its id (waits for room when the queue is full)."""
        while len(self._queue) + len(self._waiting) >= self._max_queue:
            self._space.clear()
            await self._space.wait()
        if self._closed:
            raise ClosedError("the broker is closed; publish inside `async with connect()`")
        if item.wait is not None:
            return await self._submit_waiting(item)
        if not self._queue and self._in_flight < self._max_pipelines and not self._linger:
            # a pipeline is free and nothing waits: send now, skipping the hand-off to the
            # drain task (two task switches and a future less); when every pipeline is out,
            # publishes queue up and leave together in the next free one
            self._in_flight += 1
            try:
                (result,) = await send_batch(self._topology, [item], self._retry, self._bells)
            finally:
                self._release(None)
            self._count(1)
            if isinstance(result, BaseException):
                raise result
            return result
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._queue.append((item, fut))
        self._wake.set()
        return await fut

    async def _submit_waiting(self, item: XAdd) -> str:
        """:meth:`submit` in the durable lane."""
        if not self._waiting and self._in_flight_waiting < self._max_pipelines and not self._linger:
            self._in_flight_waiting += 1
            try:
                (result,) = await send_batch(
                    self._topology, [item], self._retry, self._bells, item.wait
                )
            finally:
                self._release(item.wait)
            self._count(1)
            if isinstance(result, BaseException):
                raise result
            return result
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, fut))
        self._wake.set()
        return await fut

    async def run(self) -> None:
        """The drain loop; runs in the broker's task group until :meth:`close`, then drains."""
        try:
            async with asyncio.TaskGroup() as pipelines:  # its exit waits for those in flight
                while not self._closed:
                    await self._wake.wait()
                    self._wake.clear()
                    if self._linger and not self._closed:
                        await asyncio.sleep(self._linger)
                    await self._drain(pipelines)
                await self._drain(pipelines)
        finally:
            # cancelled while draining (the broker's close was cancelled): nobody may wait forever
            self._closed = True
            for queue in (self._queue, self._waiting):
                while queue:
                    _, fut = queue.popleft()
                    if not fut.done():
                        fut.set_exception(
                            ClosedError("the broker closed before this entry was sent")
                        )

    def _release(self, wait: WaitFor | None) -> None:
        if wait is None:
            self._in_flight -= 1
        else:
            self._in_flight_waiting -= 1
        self._slot_free.set()

    def _count(self, n: int) -> None:
        self._batches += 1
        self._published += n
        self._largest = max(self._largest, n)

    async def wait_idle(self) -> None:
        """Wait until no pipeline is on the wire (direct sends run in the callers' tasks)."""
        while self._in_flight or self._in_flight_waiting:
            self._slot_free.clear()
            await self._slot_free.wait()

    def close(self) -> None:
        """Refuse new publishes; :meth:`run` sends what was accepted, then returns."""
        self._closed = True
        self._wake.set()
        self._space.set()

    async def _drain(self, pipelines: asyncio.TaskGroup) -> None:
        """Send what is queued, in batches, as pipelines free up in each lane."""
        limit = self._max_pipelines
        while self._queue or self._waiting:
            sent = False
            if self._queue and self._in_flight < limit:
                self._in_flight += 1
                batch = self._take(self._queue)
                pipelines.create_task(self._send(batch, None))
                sent = True
            if self._waiting and self._in_flight_waiting < limit:
                # one pipeline per kind of wait (replicas and timeout)
                parts: dict[WaitFor | None, list[tuple[XAdd, asyncio.Future[str]]]] = {}
                for entry in self._take(self._waiting):
                    parts.setdefault(entry[0].wait, []).append(entry)
                for wait, part in parts.items():
                    self._in_flight_waiting += 1
                    pipelines.create_task(self._send(part, wait))
                sent = True
            if not sent:  # every pipeline of the lanes with work is out: wait for one
                self._slot_free.clear()
                await self._slot_free.wait()

    def _take(
        self, queue: collections.deque[tuple[XAdd, asyncio.Future[str]]]
    ) -> list[tuple[XAdd, asyncio.Future[str]]]:
        batch = [queue.popleft() for _ in range(min(len(queue), self._max_batch))]
        self._space.set()
        return batch

    async def _send(
        self, batch: list[tuple[XAdd, asyncio.Future[str]]], wait: WaitFor | None
    ) -> None:
        """One pipeline; its outcome goes to the waiters, never to the task group."""
        try:
            ids = await send_batch(
                self._topology, [item for item, _ in batch], self._retry, self._bells, wait
            )
        except Exception as exc:  # every waiter gets the batch's error
            _fail(batch, exc)
            return
        except BaseException:  # cancelled: the broker's close was cancelled
            _fail(batch, ClosedError("the broker closed before this entry was sent"))
            raise
        finally:
            self._release(wait)
        self._count(len(batch))
        for (_, fut), result in zip(batch, ids, strict=True):
            if fut.done():
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)


def _fail(batch: list[tuple[XAdd, asyncio.Future[str]]], exc: BaseException) -> None:
    for _, fut in batch:
        if not fut.done():
            fut.set_exception(exc)


async def send_batch(
    topology: Topology,
    items: list[XAdd],
    retry: RetryPolicy,
    bells: Bells | None = None,
    wait: WaitFor | None = None,
) -> list[str | BaseException]:
    """Send ``items`` in one round trip per node; per-entry errors come back in the list, not
    raised. With ``wait``, each node's payload ends with a ``WAIT``, and the entries it did not
    confirm come back as :class:`ReplicationTimeoutError`.

    A lost connection resends the whole batch until the deadline: an entry may then be appended
    twice (at-least-once), never lost without an error. Entries answered with "not run here"
    (a cluster's ``MOVED``, ``ASK``, ``TRYAGAIN``...; ``READONLY`` from a demoted master,
    ``LOADING``, ``NOREPLICAS``) were not appended, and are resent to the node that owns them
    now, until the deadline.
    """
    single = topology.single
    if single is not None:  # the hot path: one payload, one node
        payload, count, rung = _payload(items, bells, wait)
        raw = await _exchange(topology, single, payload, count, retry, wait)
        _heard(bells, rung, raw, wait)
        out, refused = _results(items, raw)
        if wait is not None:
            confirm(wait, items, out, raw[-1])
        if refused:  # rare: the server turned some entries away (a failover, a restart)
            again = await _send_routed(topology, [items[i] for i in refused], retry, bells, wait)
            for i, r in zip(refused, again, strict=True):
                out[i] = r
        return out
    return await _send_routed(topology, items, retry, bells, wait)


async def _exchange(
    topology: Topology,
    wire: Wire,
    payload: bytes,
    count: int,
    retry: RetryPolicy,
    wait: WaitFor | None,
) -> list[Any]:
    backoff = retry.backoff()
    held = 0.0 if wait is None else wait.timeout  # the server may hold the WAIT this long
    while True:
        started = time.monotonic()
        try:
            with map_redis_errors():
                return await wire.execute(payload, count, limit=backoff.limit(), wait=held)
        except ConnectionLostError as exc:
            await backoff.wait(exc, started)
            if topology.sentinel:  # the master may have moved: ask the sentinels
                await topology.refresh(str(exc))


def _payload(
    items: list[XAdd], bells: Bells | None, wait: WaitFor | None = None
) -> tuple[bytes, int, list[str]]:
    """The XADDs, then the XTRIMs of age bounds, then the bells, then the WAIT; the replies of
    the XADDs come first, those of the bells last but the WAIT's (``rung``: the keys rung, in
    order). The WAIT comes after the bells so that readers are not woken later for it."""
    parts = [pack_xadd(it) for it in items]
    # XADD takes one trim strategy: an age bound next to a length bound is an XTRIM after
    age_trims = {it.key: it.minid for it in items if it.maxlen is not None and it.minid}
    parts += [pack(b"XTRIM", key, b"MINID", b"~", minid) for key, minid in age_trims.items()]
    rung = bells.pick(it.key for it in items) if bells is not None else []
    if rung:
        assert bells is not None
        parts += [bells.part(key) for key in rung]
    if wait is not None:
        parts.append(wait.command)
    return b"".join(parts), len(parts), rung


def confirm(
    wait: WaitFor, items: list[XAdd], results: list[str | BaseException], reply: Any
) -> None:
    """Replace the ids in ``results`` by :class:`ReplicationTimeoutError` when ``reply`` (the
    WAIT's) says fewer replicas than asked have them."""
    if wait.short(reply) is None:
        return
    for i, r in enumerate(results):
        if isinstance(r, str):
            it = items[i]
            error = wait.error(
                f"entry {r} of channel {it.channel!r}", reply, channel=it.channel, message_id=r
            )
            assert error is not None
            results[i] = error


def _heard(bells: Bells | None, rung: list[str], raw: list[Any], wait: WaitFor | None) -> None:
    if bells is not None and rung:
        end = len(raw) - (wait is not None)
        for key, reply in zip(rung, raw[end - len(rung) : end], strict=True):
            bells.heard(key, reply)


def _results(items: list[XAdd], raw: list[Any]) -> tuple[list[str | BaseException], list[int]]:
    """The ids (or errors) of ``items``, and the indexes of those the server turned away with
    a "not run here" reply (to be sent again)."""
    out: list[str | BaseException] = []
    refused: list[int] = []
    for i, (it, r) in enumerate(zip(items, raw, strict=False)):
        if isinstance(r, BaseException):
            # READONLY here is a plain URL that names a replica: an error to report (behind
            # Sentinel redis-py turns it into a lost connection, and the master is asked for)
            if routing_error(r) not in (None, "READONLY"):
                refused.append(i)
            out.append(_mapped(r, it.channel, it.key))
        else:
            out.append(_entry_id(r, it))
    return out, refused


def _entry_id(reply: Any, it: XAdd) -> str | BaseException:
    """The id XADD answered, or the error for a reply no Redis sends (a proxy's, a "compatible"
    server's): never a bogus id returned as if the entry were known."""
    try:
        entry_id: str = reply.decode("ascii")
    except (AttributeError, UnicodeDecodeError):
        entry_id = ""
    ms, dash, seq = entry_id.partition("-")
    if dash and ms.isdigit() and seq.isdigit():
        return entry_id
    return RedisCommandError(
        f"unexpected reply to XADD on channel {it.channel!r}: {reply!r:.100} (not an entry id; "
        "the entry may have been appended)"
    )


def _mapped(error: BaseException, channel: str, key: str) -> BaseException:
    try:
        with map_redis_errors(channel, key):
            raise error
    except Exception as mapped:
        return mapped


#: redirections followed for one batch before giving up (redis-py follows 16 too)
_MAX_REDIRECTS = 16


async def _send_routed(
    topology: Topology,
    items: list[XAdd],
    retry: RetryPolicy,
    bells: Bells | None,
    wait: WaitFor | None = None,
) -> list[str | BaseException]:
    """The cluster path (and a single server's for entries it turned away): one payload per
    node, sent concurrently; redirected entries resent."""
    results: list[str | BaseException | None] = [None] * len(items)
    todo = list(range(len(items)))
    asking: dict[int, Wire] = {}
    backoff = retry.backoff()
    redirects = 0
    while todo:
        groups: dict[Wire, list[int]] = {}
        try:
            for i in todo:
                wire = asking.pop(i, None) or topology.wire_for(items[i].key)
                groups.setdefault(wire, []).append(i)
        except Exception as exc:  # no node serves a slot now (a failover under way)
            lost = ConnectionLostError(f"cannot route: {exc}")
            await backoff.wait(lost)
            await topology.refresh("a slot without a node")
            continue
        started = time.monotonic()
        limit = backoff.limit()
        replies = await asyncio.gather(
            *(_exchange_routed(w, [items[i] for i in idx], limit, w in asking.values(), bells,
                               wait)
              for w, idx in groups.items()),
            return_exceptions=True,
        )  # fmt: skip
        todo = []
        refresh: str | None = None
        lost_exc: ConnectionLostError | None = None
        for (wire, idx), reply in zip(groups.items(), replies, strict=True):
            if isinstance(reply, ConnectionLostError):
                todo += idx  # the node may be gone (a failover): ask the cluster again
                lost_exc = reply
                refresh = refresh or f"{wire.name} unreachable"
                continue
            if isinstance(reply, BaseException):
                raise reply
            entries, waited = reply
            done: list[int] = []
            for i, r in zip(idx, entries, strict=True):
                kind = routing_error(r)
                if kind is None:
                    it = items[i]
                    results[i] = (
                        _mapped(r, it.channel, it.key)
                        if isinstance(r, BaseException)
                        else _entry_id(r, it)
                    )
                    done.append(i)
                    continue
                todo.append(i)
                if kind == "ASK":
                    asking[i] = topology.wire_at(ask_target(r))
                elif kind == "MOVED" or kind == "READONLY":
                    refresh = refresh or f"{kind} from {wire.name}"
                else:  # TRYAGAIN, CLUSTERDOWN, LOADING...: wait a little, as for an outage
                    lost_exc = lost_exc or ConnectionLostError(f"{wire.name}: {r}")
            if wait is not None and done:
                confirmed: list[str | BaseException] = [results[i] or no_reply(0) for i in done]
                confirm(wait, [items[i] for i in done], confirmed, waited)
                for i, r in zip(done, confirmed, strict=True):
                    results[i] = r
        if not todo:
            break
        todo.sort()  # keep each key's entries in their order
        if lost_exc is not None:
            await backoff.wait(lost_exc, started)
        else:
            redirects += 1
            if redirects > _MAX_REDIRECTS:
                raise ConnectionLostError(
                    f"too many cluster redirections for one batch ({_MAX_REDIRECTS})"
                )
        if refresh is not None:
            await topology.refresh(refresh)
    return [r if r is not None else no_reply(0) for r in results]


async def _exchange_routed(
    wire: Wire,
    items: list[XAdd],
    limit: float,
    asking: bool,
    bells: Bells | None,
    wait: WaitFor | None,
) -> tuple[list[Any], Any]:
    """Send ``items`` to ``wire``; return one reply per item (``ASKING`` first when the items
    follow an ``ASK`` redirection; the replies of ``XTRIM`` and of bells dropped) and the
    WAIT's reply (None without ``wait``)."""
    held = 0.0 if wait is None else wait.timeout
    tail = b"" if wait is None else wait.command
    if asking:
        payload = b"".join(pack(b"ASKING") + pack_xadd(it) for it in items) + tail
        with map_redis_errors():
            raw = await wire.execute(payload, 2 * len(items) + bool(tail), limit=limit, wait=held)
        return raw[1 : 2 * len(items) : 2], raw[-1] if tail else None
    payload, count, rung = _payload(items, bells, wait)
    with map_redis_errors():
        raw = await wire.execute(payload, count, limit=limit, wait=held)
    if not any(routing_error(r) for r in raw[: len(items)]):
        _heard(bells, rung, raw, wait)
    return raw[: len(items)], raw[-1] if tail else None


def pack_xadd(it: XAdd) -> bytes:
    """``XADD key [MAXLEN ~ n | MINID ~ id] * d <payload> [h <headers>]`` as RESP."""
    if it.minid is not None and it.maxlen is None:
        args: list[bytes | str] = [b"XADD", it.key, b"MINID", b"~", it.minid, b"*", b"d"]
        args += [it.payload] if it.headers is None else [it.payload, b"h", it.headers]
        return pack(*args)
    head = _xadd_head(it.key, it.maxlen, it.headers is not None)
    if it.headers is None:
        return head + bulk(it.payload)
    return head + bulk(it.payload) + b"$1\r\nh\r\n" + bulk(it.headers)


@functools.lru_cache(maxsize=1024)
def _xadd_head(key: str, maxlen: int | None, headers: bool) -> bytes:
    """Everything of an XADD before the payload (the same for every entry of a channel)."""
    args = [b"XADD", key.encode()]
    if maxlen is not None:
        args += [b"MAXLEN", b"~", b"%d" % maxlen]
    args += [b"*", b"d"]
    count = len(args) + 1 + (2 if headers else 0)
    return b"*%d\r\n" % count + b"".join(map(bulk, args))
