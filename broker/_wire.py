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
        await self.pool.disconnect()

    async def execute(
        self,
        payload: bytes,
        replies: int,
        *,
        wait: float = 0.0,
        limit: float | None = None,
        early: tuple[int, Callable[[list[Any]], None]] | None = None,
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
        ``seen`` must not raise.

        :raises ClosedError: after :meth:`aclose`.
        """
        if self.closed:
            raise ClosedError("the broker is closed; use it inside `async with connect(...)`")
        pool = self.pool
        conn = None
        complete = False
        limit = (self.timeout if limit is None else limit) + wait
        try:
            out: list[Any] = []
            async with asyncio.timeout(limit):
                conn = await pool.get_connection()
                if await conn.can_read():
                    # bytes nobody asked for (or the server closed it) since its last use: they
                    # must not be read as this exchange's replies. (redis-py's pool checks this
                    # too, but not on RESP3 connections, where it awaits push notifications)
                    await conn.disconnect(nowait=True)
                    await conn.connect()
                await conn.send_packed_command(payload)
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
                if not complete:  # unread replies would reach the next user of this connection
                    await conn.disconnect(nowait=True)
                await pool.release(conn)
