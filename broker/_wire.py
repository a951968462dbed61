"""The hot commands on the wire: RESP packed here, replies read without per-reply overhead.

redis-py's generic path costs several microseconds per command (argument encoding, a timeout
context per reply, response callbacks). ``XADD``, ``XREADGROUP`` and ``XACK`` carry every
message, so they are packed here and sent on a pooled connection of the same client: the
connection, its TLS/auth/reconnect handling and the error types stay redis-py's. Replies come
back as the parser gives them (RESP2 arrays of bytes), and server errors come back as values, as
in a pipeline.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable
from typing import Any

import redis.exceptions as rex

__all__ = ["bulk", "execute", "pack", "pack_strs"]


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


async def execute(redis: Any, payload: bytes, replies: int, *, wait: float = 0.0) -> list[Any]:
    """Send ``payload`` (``replies`` commands) on one pooled connection and read the replies.

    Server errors are returned as ``redis.exceptions.ResponseError`` values. A lost or silent
    connection raises redis-py's ``ConnectionError``/``TimeoutError`` after being discarded,
    so the pool never hands out a connection with replies still unread; the same holds when
    the call is cancelled. ``wait`` is how long the server may legitimately hold the reply
    (a ``BLOCK``); the socket timeout comes on top.
    """
    pool = redis.connection_pool
    conn = await pool.get_connection()
    complete = False
    try:
        await conn.send_packed_command(payload)
        limit = (conn.socket_timeout or 30.0) + wait
        out: list[Any] = []
        try:
            async with asyncio.timeout(limit):
                for _ in range(replies):
                    try:
                        out.append(await conn.read_response(timeout=math.inf))
                    except rex.ResponseError as exc:
                        out.append(exc)
        except TimeoutError:
            raise rex.TimeoutError(f"no reply from the server within {limit:.0f} s") from None
        complete = True
        return out
    finally:
        if not complete:  # unread replies would reach the next user of this connection
            await conn.disconnect(nowait=True)
        await pool.release(conn)
