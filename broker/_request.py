"""Request/reply ("oneshot"): one answer to one request, through a per-broker inbox stream.

A request is an ordinary channel message whose headers carry ``reply-to`` (the requester's
inbox key) and ``reply-id`` (a correlation id). The inbox is one stream per broker,
``<namespace>:{reply~<32 hex>}``, read by one task over one dedicated connection (on a
cluster: to the node owning the inbox's slot) with a blocking ``XREAD``; it dispatches each
answer to the future waiting for its correlation id, and deletes what it read (``XDEL``, sent
with the next read). The inbox has a time to live (``Settings.reply_ttl``) that the reader
refreshes every third of it, so a requester that dies leaves nothing behind for long; the
broker deletes it when it closes.

An answer entry has ``c`` (the correlation id) and either ``d`` (the value, msgpack) or ``e``
(msgpack ``[type, text]`` of the handler's exception). Responders append it with a script that
writes only to an existing stream (:data:`._scripts.ANSWER`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import re
import time
import uuid
from typing import TYPE_CHECKING, Any

import msgpack
import redis.exceptions as rex

from ._codec import MsgpackCodec
from ._errors import BrokerError, ClosedError, RemoteError, RequestTimeoutError
from ._names import inbox_key
from ._resource import cancel_and_wait
from ._retry import retrying
from ._scripts import ANSWER, OPEN_INBOX
from ._topology import routing_error
from ._wire import Wire, pack

if TYPE_CHECKING:
    from ._broker import Broker
    from ._channel import Channel
    from ._message import Message
    from ._topology import Link

__all__ = [
    "REPLY_CLIENT_NAME",
    "REPLY_ID",
    "REPLY_TO",
    "Inbox",
    "RequestStatistics",
    "answer",
    "answer_failure",
    "answer_result",
    "request",
]

log = logging.getLogger("broker.request")

#: header: the inbox key the answer goes to
REPLY_TO = "reply-to"
#: header: the correlation id the answer carries back
REPLY_ID = "reply-id"
#: the client name of the inbox reader's connection (``CLIENT LIST`` shows one per requester)
REPLY_CLIENT_NAME = "broker-py-reply"
#: answers an inbox keeps at most (``MAXLEN ~``): a reader far behind loses the oldest
ANSWER_MAXLEN = 100_000
_BATCH = 1000  # answers per XREAD
_TEXT_LIMIT = 4000  # characters of an error's text sent back
_INBOX_RE = re.compile(r"[A-Za-z0-9_.:\-]{1,64}:\{reply~[0-9a-f]{32}\}")
_MSGPACK = MsgpackCodec()


@dataclasses.dataclass(frozen=True, slots=True)
class RequestStatistics:
    """The requester side of a broker (``broker.request_statistics()``)."""

    #: requests waiting for their answer now
    waiting: int
    #: requests answered (with a value or a :class:`RemoteError`)
    answered: int
    #: requests that raised :class:`RequestTimeoutError`
    timed_out: int
    #: answers for a correlation id nobody waits for (late, or a retried request's second)
    dropped: int
    #: the inbox key, once the first request made it
    inbox: str | None


class Inbox:
    """The reply stream of one broker and the task that reads it (started by the first
    request, owned by the broker's task group, closed with the broker)."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.key = inbox_key(broker.namespace, uuid.uuid4().hex)
        self.ttl_ms = max(1, int(broker.settings.reply_ttl * 1000))
        self._waiting: dict[str, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._wire: Wire | None = None
        self._closed = False
        self.answered = self.timed_out = self.dropped = 0

    def __repr__(self) -> str:
        return f"<Inbox {self.key} waiting={len(self._waiting)}>"

    def statistics(self) -> RequestStatistics:
        return RequestStatistics(
            len(self._waiting),
            self.answered,
            self.timed_out,
            self.dropped,
            self.key if self._task is not None else None,
        )

    # -- the requester's side -----------------------------------------------------------------

    async def open(self) -> None:
        """Create the inbox and start its reader, once (concurrent first requests share it)."""
        if self._task is not None:
            return
        async with self._lock:
            if self._task is not None:
                return
            if self._closed:
                raise ClosedError("the broker is closed; use it inside `async with connect(...)`")
            b = self.broker
            await b.call(lambda: OPEN_INBOX(b.redis, [self.key], [self.ttl_ms]))
            self._task = b._spawn(self._run(), name=f"broker-inbox {self.key}")

    def expect(self) -> tuple[str, asyncio.Future[Any]]:
        """A new correlation id and the future its answer completes."""
        cid = f"{next(self._ids):x}"
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[cid] = future
        return cid, future

    def forget(self, cid: str) -> None:
        """Stop waiting for ``cid``: an answer that comes later is dropped and counted."""
        self._waiting.pop(cid, None)

    # -- the reader ---------------------------------------------------------------------------

    def _reader_wire(self) -> Wire:
        """A wire of one connection to the node owning the inbox, named for ``CLIENT LIST``."""
        if self._wire is None:
            base = self.broker.topology.wire_for(self.key)
            pool = base.pool
            self._wire = Wire(
                pool.connection_class,
                {**pool.connection_kwargs, "client_name": REPLY_CLIENT_NAME},
                timeout=base.timeout,
                max_connections=1,
                name=base.name,
            )
        return self._wire

    async def _drop_wire(self) -> None:
        wire, self._wire = self._wire, None
        if wire is not None:
            await wire.aclose()

    async def _run(self) -> None:
        """Read answers until cancelled; errors are logged and retried (a request that cannot
        be answered meanwhile times out: it never hangs)."""
        last = "0-0"
        read: list[str] = []  # ids to delete with the next read
        every = self.ttl_ms / 3000
        block = min(2.0, every)
        touched = time.monotonic()
        pause = 0.05
        while True:
            commands = []
            if read:
                commands.append(pack("XDEL", self.key, *read))
            touch = time.monotonic() - touched >= every
            if touch:
                commands.append(pack("PEXPIRE", self.key, self.ttl_ms))
            commands.append(
                pack(
                    "XREAD", "COUNT", _BATCH, "BLOCK", int(block * 1000), "STREAMS", self.key, last
                )
            )
            try:
                replies = await self._reader_wire().execute(
                    b"".join(commands), len(commands), wait=block
                )
                for reply in replies:
                    if isinstance(reply, BaseException):
                        raise reply
            except (rex.RedisError, OSError, ClosedError) as exc:
                if isinstance(exc, ClosedError) or self._closed:
                    return  # the broker is closing
                kind = routing_error(exc)
                log.warning("reply inbox %s: %s; reading again in %.2fs", self.key, exc, pause)
                await self._drop_wire()
                if kind is not None or self.broker.cluster or self.broker.topology.sentinel:
                    try:
                        await self.broker.topology.refresh(f"reply inbox: {exc}")
                    except (rex.RedisError, OSError, BrokerError) as refresh_exc:
                        log.debug("reply inbox: refresh failed: %s", refresh_exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
                touched = 0.0  # the inbox may have expired meanwhile: check it next time
                continue
            pause = 0.05
            read = []
            if touch:
                touched = time.monotonic()
                if replies[-2] == 0:  # PEXPIRE found no key (expired in an outage, a restart)
                    await self._reopen()
            for entry_id, fields in _entries(replies[-1]):
                read.append(entry_id)
                last = entry_id
                self._deliver(fields)

    async def _reopen(self) -> None:
        b = self.broker
        log.warning("reply inbox %s was gone (expired or lost); making it again", self.key)
        try:
            await b.call(lambda: OPEN_INBOX(b.redis, [self.key], [self.ttl_ms]))
        except BrokerError as exc:
            log.warning("reply inbox %s: cannot make it again: %s", self.key, exc)

    def _deliver(self, fields: list[Any]) -> None:
        values = dict(zip(fields[::2], fields[1::2], strict=False))
        raw_cid = values.get(b"c", b"")
        cid = raw_cid.decode(errors="replace") if isinstance(raw_cid, bytes) else str(raw_cid)
        future = self._waiting.pop(cid, None)
        if future is None or future.done():
            self.dropped += 1
            log.debug("reply inbox %s: dropped an answer for %r (nobody waits)", self.key, cid)
            return
        self.answered += 1
        try:
            if b"e" in values:
                kind, text = _MSGPACK.decode(values[b"e"])
                future.set_exception(RemoteError(str(kind), str(text)))
            else:
                future.set_result(_MSGPACK.decode(values.get(b"d", b"\xc0")))
        except (ValueError, TypeError) as exc:  # not [type, text], or not msgpack
            future.set_exception(RemoteError("ValueError", f"undecodable answer: {exc}"))

    async def aclose(self) -> None:
        """Stop the reader, fail the requests still waiting, delete the inbox. Idempotent."""
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(ClosedError("the broker closed while a request waited"))
        await self._drop_wire()
        if task is not None:
            b = self.broker
            redis = b._redis  # the broker is closing: its `redis` property refuses already
            try:
                async with asyncio.timeout(b.settings.connect_timeout):
                    await b.call(lambda: redis.delete(self.key))
            except (BrokerError, TimeoutError) as exc:  # it expires on its own
                log.warning("reply inbox %s not deleted (it expires): %s", self.key, exc)


def _entries(reply: Any) -> list[tuple[str, list[Any]]]:
    """The ``(id, [field, value, ...])`` of an ``XREAD`` reply of one stream (RESP2 or 3)."""
    if not reply:
        return []
    streams = list(reply.values()) if isinstance(reply, dict) else [s[1] for s in reply]
    out = []
    for entries in streams:
        for entry_id, fields in entries:
            if fields is None:
                continue  # deleted under us
            out.append((entry_id.decode() if isinstance(entry_id, bytes) else entry_id, fields))
    return out


async def request(
    channel: Channel[Any],
    data: Any,
    timeout: float,  # noqa: ASYNC109 - the answer's deadline, not a call's
    headers: dict[str, str] | None,
    key: str | bytes | int | None,
) -> Any:
    """The body of :meth:`Channel.request`."""
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    if headers and (REPLY_TO in headers or REPLY_ID in headers):
        raise ValueError(f"headers {REPLY_TO!r} and {REPLY_ID!r} are set by request()")
    inbox = channel.broker._reply_inbox()
    scope = asyncio.timeout(timeout)
    cid = ""
    try:
        async with scope:
            await inbox.open()
            cid, future = inbox.expect()
            await channel.publish(
                data, headers={**(headers or {}), REPLY_TO: inbox.key, REPLY_ID: cid}, key=key
            )
            return await future
    except TimeoutError:
        if not scope.expired():
            raise
        inbox.timed_out += 1
        raise RequestTimeoutError(channel.name, timeout, cid) from None
    finally:
        if cid:
            inbox.forget(cid)


# -- the responder's side -------------------------------------------------------------------


def reply_address(msg: Message[Any]) -> tuple[str, str] | None:
    """The inbox key and correlation id of a request message; None for any other message (or
    one whose address is not an inbox key: a responder never writes anywhere else)."""
    headers = msg._headers
    if not headers:
        return None
    to, cid = headers.get(REPLY_TO), headers.get(REPLY_ID)
    if to is None or cid is None or not _INBOX_RE.fullmatch(to):
        return None
    return to, cid


def error_type(exc: BaseException) -> str:
    """``ValueError`` for a builtin, ``module.Class`` for any other exception class."""
    cls = type(exc)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


async def answer(
    link: Link,
    msg: Message[Any],
    value: Any = None,
    error: BaseException | str | None = None,
) -> bool:
    """Send the answer to request ``msg``: ``value`` (msgpack), or ``error``. Returns whether
    the requester's inbox still existed (False: the requester is gone; nothing was written).

    A ``value`` msgpack cannot encode is answered as a ``TypeError``.

    :raises ValueError: if ``msg`` is not a request.
    :raises ConnectionLostError: if the server stays unreachable past the reconnect deadline.
    """
    address = reply_address(msg)
    if address is None:
        raise ValueError(
            f"message {msg.id} of channel {msg.channel!r} is not a request (no reply address): "
            "only messages sent with channel.request() can be answered"
        )
    to, cid = address
    if error is None:
        try:
            fields: list[Any] = [b"d", _MSGPACK.encode(value)]
        except TypeError as exc:
            error = exc
    if error is not None:
        if isinstance(error, str):
            kind, text = "Exception", error
        else:
            kind, text = error_type(error), str(error)
        fields = [b"e", msgpack.packb([kind, text[:_TEXT_LIMIT]], use_bin_type=True)]
    args = [ANSWER_MAXLEN, b"c", cid.encode(), *fields]
    topology = link.topology
    follow = topology.single is None or topology.sentinel
    written = await retrying(
        lambda: ANSWER.on_wire(topology, [to], args),
        link.settings.retry,
        msg.channel,
        to,
        refresh=topology.refresh if follow else None,
    )
    return bool(written)


async def answer_result(msg: Message[Any], value: Any) -> bool:
    """After a handler returned ``value`` for request ``msg``: answer it (unless the handler
    did, with ``msg.reply``). Returns whether the message may be acked: an answer that could
    not be sent nacks it instead, so a retry answers (at-least-once)."""
    if msg._replied or reply_address(msg) is None:
        return True
    msg._replied = True  # one attempt per delivery: a failed one is nacked, its retry answers
    try:
        await msg.reply(value)
    except (BrokerError, TypeError) as exc:
        log.warning("answer to %s %s not sent: %s; retrying the message", msg.channel, msg.id, exc)
        msg.nack(error=f"the answer could not be sent: {exc}")
        return False
    return True


async def answer_failure(msg: Message[Any], error: BaseException) -> None:
    """After the handler of request ``msg`` raised ``error``: answer it with the error at once
    (the requester raises :class:`RemoteError`); the message still follows the retry and
    dead-letter policy. A failure to send is logged: the retry answers again."""
    if msg._replied or reply_address(msg) is None:
        return
    msg._replied = True
    try:
        await msg.reply(error=error)
    except (BrokerError, TypeError) as exc:
        log.warning("error answer to %s %s not sent: %s", msg.channel, msg.id, exc)
