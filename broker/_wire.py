"""The hot commands on the wire: RESP packed here, replies read without per-reply overhead.

redis-py's generic path costs several microseconds per command (argument encoding, a timeout
context per reply, response callbacks). ``XADD``, ``XREADGROUP`` and ``XACK`` carry every
message, so they are packed here and sent on connections of redis-py's own class and settings
(TLS, auth, handshake and error types stay redis-py's; see :class:`Wire`). Replies come back as
the parser gives them (RESP2 arrays or RESP3 maps of bytes), and server errors come back as
values, as in a pipeline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

import redis.exceptions as rex
from redis.asyncio.connection import ConnectionPool

try:
    from redis.maint_notifications import MaintNotificationsConfig
except ImportError:  # redis-py before 7: no maintenance notifications to turn off
    MaintNotificationsConfig = None  # type: ignore[assignment,misc]

from ._errors import ClosedError

__all__ = ["Wire", "bulk", "pack", "pack_strs"]


def bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


def pack(*args: bytes | str | int) -> bytes:
    """One command as RESP (``str`` is UTF-8, ``int`` its decimal digits)."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else (a.encode() if isinstance(a, str) else b"%d" % a)
        out.append(b"$%d\r\n%b\r\n" % (len(b), b))
    return b"".join(out)


def pack_strs(values: Iterable[str]) -> bytes:
    """Bulk strings for many ASCII values (entry ids), encoded in one go."""
    return "".join([f"${len(v)}\r\n{v}\r\n" for v in values]).encode()


class Wire:
    """Connections for the hot commands, made like the client's own (same URL, TLS, auth, client
    name) but without redis-py's socket timeout: that timeout wraps every send in a task
    (``wait_for``) and every reply in a timeout context. :meth:`execute` bounds the whole
    exchange with one deadline instead, so a dead peer is still detected."""

    def __init__(
        self,
        connection_class: Any,
        connection_kwargs: dict[str, Any],
        *,
        timeout: float,
        max_connections: int | None = None,
        name: str = "server",
    ) -> None:
        kwargs = {**connection_kwargs, "socket_timeout": None}
        if MaintNotificationsConfig is not None:
            # redis-py 8 reads bytes waiting on a pooled RESP3 connection as maintenance push
            # notifications when it hands the connection out, and a stray byte then raised
            # InvalidResponse from get_connection (found by the fuzz tier); disabled, the pool
            # reconnects such a connection, and execute() checks for unread bytes itself
            kwargs["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
        self.pool: Any = ConnectionPool(
            connection_class=connection_class, max_connections=max_connections, **kwargs
        )
        self.timeout = timeout
        #: the node this wire talks to (``host:port`` on a cluster)
        self.name = name
        self.closed = False
        #: connections given back by clean exchanges, taken again (last first) without the
        #: pool's checkout and release: redis-py 8's take a lock and record connection counts
        #: each time (15-20 µs of an exchange's ~100 here). The pool counts them as in use, so
        #: its ``max_connections`` still bounds them
        self._idle: list[Any] = []

    @classmethod
    def like(cls, client: Any, timeout: float) -> Wire:
        """A wire to the server of a single-server redis-py client, made like its own pool."""
        pool = client.connection_pool
        return cls(
            pool.connection_class,
            pool.connection_kwargs,
            timeout=timeout,
            max_connections=pool.max_connections,
        )

    def __repr__(self) -> str:
        return f"<Wire {self.name}>"

    async def aclose(self) -> None:
        """Close every connection; later calls raise ``ClosedError`` instead of reconnecting."""
        self.closed = True
        self._idle.clear()
        await self.pool.disconnect()  # in use (ours idle among them) too

    async def drop_idle(self) -> None:
        """Close the connections waiting for the next exchange (the server moved: a failover);
        those in use close when given back, if redis-py marks them (see ``_marked``)."""
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._discard(conn)

    async def _checkout(self) -> Any:
        """A connection for one exchange: the last one given back, if it is still sound (open,
        nothing unread, not marked for a reconnect by a failover: see ``_drop_connections``),
        else one from the pool, which connects and validates it."""
        pool = self.pool
        idle = self._idle
        while idle:
            conn = idle.pop()
            try:
                if conn.is_connected and not _marked(conn) and not await conn.can_read():
                    return conn
            except (rex.ConnectionError, OSError):  # closed by the server meanwhile
                pass
            await self._discard(conn)
        conn = await pool.get_connection()
        if await conn.can_read():
            # bytes nobody asked for (or the server closed it) since its last use: they must
            # not be read as this exchange's replies. (redis-py's pool checks this too, but
            # not on RESP3 connections, where it awaits push notifications)
            await conn.disconnect(nowait=True)
            await conn.connect()
        return conn

    async def _discard(self, conn: Any) -> None:
        """Close ``conn`` and return it to the pool."""
        await conn.disconnect(nowait=True)
        await self.pool.release(conn)

    async def execute(
        self,
        payload: bytes,
        replies: int,
        *,
        wait: float = 0.0,
        limit: float | None = None,
        early: tuple[int, Callable[[list[Any]], None]] | None = None,
        done: Callable[[list[Any]], None] | None = None,
    ) -> list[Any]:
        """Send ``payload`` (``replies`` commands) on one connection and read the replies.

        Server errors are returned as ``redis.exceptions.ResponseError`` values. A lost or
        silent connection raises redis-py's ``ConnectionError``/``TimeoutError`` after being
        discarded, so no connection goes back to the pool with replies unread; the same holds
        when the call is cancelled. One deadline covers connecting (and its handshake), sending
        and reading: ``wait`` is how long the server may legitimately hold the reply (a
        ``BLOCK``); the timeout (``limit``, default the wire's) comes on top.

        ``early=(n, seen)`` calls ``seen`` with the first ``n`` replies as soon as they are read
        (commands sent ahead of a blocking one: their outcome is known before it returns);
        ``seen`` must not raise. On a hiredis connection the replies are parsed in the transport's
        callback as they arrive (see :class:`_Replies`); there ``done`` is called with all of
        them, before the caller resumes (what it wakes runs first). Elsewhere it is not called.
        It must not raise or block.

        :raises ClosedError: after :meth:`aclose`.
        """
        if self.closed:
            raise ClosedError("the broker is closed; use it inside `async with connect(...)`")
        conn = None
        complete = False
        limit = (self.timeout if limit is None else limit) + wait
        try:
            out: list[Any] = []
            async with asyncio.timeout(limit):
                conn = await self._checkout()
                # a health check due (health_check_interval) reads its own reply first; it
                # may reconnect, so the stream is looked up after it
                await conn.check_health()
                replies_of = _Replies.of(conn)
                if replies_of is not None:
                    # parsed as the bytes arrive, without a task step per reply
                    got = replies_of.expect(replies, early, done)
                    try:
                        await conn.send_packed_command(payload, check_health=False)
                        out = await got
                    finally:
                        replies_of.detach()
                        if got.done() and not got.cancelled():
                            got.exception()  # retrieved: the send's own error is what raises
                    complete = not replies_of.dirty
                    return out
                await conn.send_packed_command(payload, check_health=False)
                for i in range(replies):
                    if early is not None and i == early[0]:
                        early[1](out)
                    try:
                        out.append(await conn.read_response())
                    except rex.ResponseError as exc:
                        out.append(exc)
                    except (rex.RedisError, OSError):
                        raise
                    except Exception as exc:  # bytes no Redis sends: a parser's own error
                        raise rex.InvalidResponse(
                            f"unreadable reply from the server ({type(exc).__name__}: {exc})"
                        ) from exc
            complete = True
            return out
        except TimeoutError:
            raise rex.TimeoutError(
                f"no reply from the server within {limit:.1f}s (stalled?)"
            ) from None
        finally:
            if conn is not None:
                if complete and not self.closed:
                    self._idle.append(conn)  # taken again by the next exchange
                else:  # unread replies would reach the next user of this connection
                    await self._discard(conn)


def _marked(conn: Any) -> bool:
    """Whether redis-py marked ``conn`` to reconnect when released (a failover: redis-py >= 6)."""
    marked = getattr(conn, "should_reconnect", None)
    return marked is not None and bool(marked())


_MORE = object()  # hiredis: "not enough data yet"


class _Replies:
    """Replies read on a connection's transport callback instead of in the awaiting task.

    redis-py reads a reply in the task that awaits it: the bytes arrive (the transport calls the
    stream's ``feed_data``), the task is woken, and a few coroutine layers later the parser
    gives the reply. Here, while an exchange is out, the connection's ``asyncio.StreamReader``
    hands its bytes straight to a hiredis reader of ours: the replies are parsed the moment they
    arrive, ``done`` runs there (a subscription hands the new messages to a waiting consumer,
    which then runs before the reading task, as it would if it had read them itself) and the
    awaiting task is woken once, with every reply. Used on connections with redis-py's hiredis
    parser (the ``redis[hiredis]`` dependency); others take the reply-by-reply path.
    """

    __slots__ = ("_done", "_early", "_future", "_n", "_out", "_push", "_reader", "_stream", "dirty")

    @classmethod
    def of(cls, conn: Any) -> _Replies | None:
        """The fast reader of ``conn`` (made on its first use, and again after a reconnect)."""
        stream = getattr(conn, "_reader", None)
        mine = getattr(conn, "_broker_replies", None)
        if mine is not None and mine._stream is stream:
            return mine if not mine.dirty else None
        if type(getattr(conn, "_parser", None)).__name__ != "_AsyncHiredisParser":
            return None
        if not isinstance(stream, asyncio.StreamReader):
            return None
        try:
            import hiredis

            encoder = conn.encoder
            kwargs: dict[str, Any] = {
                "protocolError": rex.InvalidResponse,
                "replyError": conn._parser.parse_error,
                "notEnoughData": _MORE,
            }
            if encoder.decode_responses:
                kwargs["encoding"] = encoder.encoding
                kwargs["errors"] = encoder.encoding_errors
            reader = hiredis.Reader(**kwargs)
        except Exception:  # an older hiredis or redis-py than this was written for
            return None
        if not hasattr(reader, "has_data"):
            return None
        mine = cls(reader, stream, getattr(hiredis, "PushNotification", None))
        conn._broker_replies = mine
        return mine

    def __init__(self, reader: Any, stream: asyncio.StreamReader, push: type | None) -> None:
        self._reader = reader
        self._push = push
        self._stream = stream
        self._future: asyncio.Future[list[Any]] | None = None
        self._n = 0
        self._out: list[Any] = []
        self._early: tuple[int, Callable[[list[Any]], None]] | None = None
        self._done: Callable[[list[Any]], None] | None = None
        #: bytes were left after the replies (or the parse failed): the connection is not reused
        self.dirty = False

    def expect(
        self,
        n: int,
        early: tuple[int, Callable[[list[Any]], None]] | None,
        done: Callable[[list[Any]], None] | None,
    ) -> asyncio.Future[list[Any]]:
        """Take the stream's bytes until ``n`` replies are read (call before sending)."""
        self._future = future = asyncio.get_running_loop().create_future()
        self._n, self._out, self._early, self._done = n, [], early, done
        if early is not None and early[0] == 0:
            early[1](self._out)
        # instance attributes shadow the StreamReader's methods (which its protocol calls)
        # until detach()
        stream: Any = self._stream
        stream.feed_data, stream.feed_eof, stream.set_exception = self._feed, self._eof, self._lost
        if n == 0:
            self._finish()
        return future

    def detach(self) -> None:
        """Give the stream its own methods back (the exchange is over, or abandoned)."""
        stream = self._stream
        for name in ("feed_data", "feed_eof", "set_exception"):
            stream.__dict__.pop(name, None)
        self._future = None
        self._done = self._early = None
        self._out = []  # not held by an idle connection until its next exchange

    def _feed(self, data: bytes) -> None:
        future = self._future
        if future is None or future.done():  # bytes after the replies: nobody asked for them
            self.dirty = True
            return
        reader = self._reader
        out = self._out
        try:
            reader.feed(data)
            while len(out) < self._n:
                reply = reader.gets()
                if reply is _MORE:
                    return
                if self._push is not None and isinstance(reply, self._push):
                    continue  # a RESP3 push, not a reply (redis-py's parser skips them too)
                if isinstance(reply, rex.ConnectionError) or (
                    isinstance(reply, list) and reply and isinstance(reply[0], rex.ConnectionError)
                ):
                    raise reply if isinstance(reply, rex.ConnectionError) else reply[0]
                out.append(reply)
                early = self._early
                if early is not None and len(out) == early[0]:
                    early[1](out)
        except (rex.RedisError, OSError) as exc:
            self.dirty = True
            future.set_exception(exc)
            return
        except Exception as exc:  # bytes no Redis sends: a parser's own error
            self.dirty = True
            future.set_exception(
                rex.InvalidResponse(
                    f"unreadable reply from the server ({type(exc).__name__}: {exc})"
                )
            )
            return
        if reader.has_data():
            self.dirty = True  # bytes after the last reply: never read as the next exchange's
        self._finish()

    def _finish(self) -> None:
        done, future, out = self._done, self._future, self._out
        self.detach()
        try:
            if done is not None:
                done(out)
        except Exception as exc:  # a bug in done: raised in the awaiting task, not lost here
            if future is not None and not future.done():
                future.set_exception(exc)
            return
        if future is not None and not future.done():
            future.set_result(out)

    def _eof(self) -> None:
        self._fail(rex.ConnectionError("Connection closed by server."))
        self._stream.feed_eof()  # its own: the connection's next user sees it closed

    def _lost(self, exc: Exception) -> None:
        self._fail(rex.ConnectionError(f"Error while reading from the server: {exc!r}"))
        self._stream.set_exception(exc)

    def _fail(self, exc: BaseException) -> None:
        self.dirty = True
        future = self._future
        self.detach()
        if future is not None and not future.done():
            future.set_exception(exc)
