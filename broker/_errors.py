"""The error tree of the library, and the one place where Redis errors are translated.

::

    BrokerError
    ├── ConfigurationError          bad URL, option or channel name (also a ValueError)
    ├── ConnectionLostError         the server stayed unreachable past the reconnect deadline
    │   └── AuthenticationError     wrong user or password (never retried)
    ├── ChannelError                carries .channel
    │   ├── GroupMissingError       the stream or the group was deleted under a subscription
    │   ├── WrongTypeError          the key under the channel's name is not a stream
    │   └── ChannelFullError        a bounded channel is over its lag limit (on_full="raise")
    ├── ClosedError                 a broker or subscription was used after it was closed
    ├── PermissionDeniedError       the ACL user may not run that command, key or channel
    ├── ReplicationTimeoutError     written on the master, not confirmed by enough replicas
    ├── RequestTimeoutError         no answer to a request in time (also a TimeoutError)
    ├── RemoteError                 the responder's handler raised: carries .type and .text
    ├── VersionConflictError        a compare-and-set of a watched value found another version
    └── RedisCommandError           any other error the server answered with

Every error raised by ``broker`` is a ``BrokerError``; errors of redis-py never leak out of the
library, they are mapped by :func:`map_redis_errors` with ``raise ... from exc``. A payload that
cannot be decoded is not an error of the caller: a subscription dead-letters it with the reason,
a tail hands it out with ``message.error`` set.
"""

from __future__ import annotations

import ast
import contextlib
import re
from collections.abc import Iterator

import redis.exceptions as rex

__all__ = [
    "AuthenticationError",
    "BrokerError",
    "ChannelError",
    "ChannelFullError",
    "ClosedError",
    "ConfigurationError",
    "ConnectionLostError",
    "GroupMissingError",
    "PermissionDeniedError",
    "RedisCommandError",
    "RemoteError",
    "ReplicationTimeoutError",
    "RequestTimeoutError",
    "VersionConflictError",
    "WrongTypeError",
    "map_redis_errors",
]


class BrokerError(Exception):
    """Root of every error raised by the library."""


class ConfigurationError(BrokerError, ValueError):
    """A URL, an option or a name is invalid; the message says what a valid one looks like."""


class ConnectionLostError(BrokerError):
    """The server could not be reached (after retrying until the reconnect deadline)."""


class AuthenticationError(ConnectionLostError):
    """The server refused the username or password."""


class ChannelError(BrokerError):
    """An error about one channel."""

    def __init__(self, message: str, *, channel: str | None = None) -> None:
        super().__init__(message)
        self.channel = channel


class GroupMissingError(ChannelError):
    """The stream or the consumer group of a running subscription no longer exists."""

    def __init__(self, channel: str, group: str) -> None:
        super().__init__(
            f"consumer group {group!r} of channel {channel!r} no longer exists "
            "(the stream or the group was deleted); subscribe again to recreate it",
            channel=channel,
        )
        self.group = group


class WrongTypeError(ChannelError):
    """The key behind a channel holds something other than a stream."""

    def __init__(self, channel: str | None, key: str | None = None) -> None:
        where = f"the key {key!r}" if key else "the key"
        super().__init__(
            f"{where} of channel {channel!r} is not a Redis stream (it holds another type); "
            "pick another channel name or --namespace, or delete that key",
            channel=channel,
        )


class ChannelFullError(ChannelError):
    """A bounded channel's slowest group lagged more than the limit for longer than the wait."""


class ClosedError(BrokerError):
    """An object was used after it was closed."""


class PermissionDeniedError(BrokerError):
    """The server refused a command, a key or a pub/sub channel to this ACL user (``NOPERM``);
    the connection itself is fine, so this is never retried."""


class ReplicationTimeoutError(BrokerError):
    """A write asked to wait for replicas (``replicas=N``) was applied by the master, but fewer
    than N replicas confirmed it (``WAIT``) within the timeout.

    The write is on the master: it stays if the master does, and may be lost if the master fails
    before a replica has it. So it may or may not survive a failover; it is not retried (a second
    publish may append the message twice). :attr:`acked` replicas confirmed it.
    """

    def __init__(
        self,
        what: str,
        *,
        replicas: int,
        acked: int,
        timeout: float,
        channel: str | None = None,
        message_id: str | None = None,
        reason: str | None = None,
    ) -> None:
        why = reason or f"only {acked} of {replicas} replica(s) confirmed it within {timeout:g}s"
        super().__init__(
            f"{what} is on the master, but {why}: it may or may not survive a failover of the "
            "master (not retried; check for it before publishing again, or accept a duplicate)"
        )
        self.channel = channel
        self.message_id = message_id
        self.replicas = replicas
        self.acked = acked


class RequestTimeoutError(BrokerError, TimeoutError):
    """A request got no answer within its timeout (``channel.request(..., timeout=)``).

    The request message may still be handled (late, or after a retry): its answer is then
    dropped and counted. Also a ``TimeoutError``, so ``except TimeoutError`` catches it.
    """

    def __init__(self, channel: str, timeout: float, correlation_id: str) -> None:
        super().__init__(
            f"no answer to the request on channel {channel!r} within {timeout:g}s (is a "
            "responder consuming the channel? raise timeout= if handlers are slow)"
        )
        self.channel = channel
        self.timeout = timeout
        self.correlation_id = correlation_id


class RemoteError(BrokerError):
    """The responder's handler raised instead of answering a request.

    :attr:`type` is the qualified name of the exception's class (``ValueError``,
    ``myapp.errors.OutOfStock``), :attr:`text` its ``str()``. Nothing is unpickled: the
    exception itself never crosses the wire.
    """

    def __init__(self, type: str, text: str, *, channel: str | None = None) -> None:
        where = f" on channel {channel!r}" if channel else ""
        super().__init__(f"the responder{where} raised {type}: {text}")
        self.type = type
        self.text = text
        self.channel = channel


class VersionConflictError(BrokerError):
    """A compare-and-set (``if_version=``) of a watched value found another current version;
    nothing was changed. :attr:`current` is the version found (0: no value set)."""

    def __init__(self, name: str, *, expected: int | None, current: int) -> None:
        found = f"version {current}" if current else "no value"
        super().__init__(
            f"watch {name!r}: expected version {expected}, found {found}; nothing changed "
            "(read the current value and try again)"
        )
        self.name = name
        self.expected = expected
        self.current = current


class RedisCommandError(BrokerError):
    """The server answered a command with an error that has no more specific class."""


@contextlib.contextmanager
def map_redis_errors(channel: str | None = None, key: str | None = None) -> Iterator[None]:
    """Translate redis-py exceptions raised inside the block into the ``BrokerError`` tree."""
    try:
        yield
    except rex.AuthenticationError as exc:
        raise AuthenticationError(
            f"authentication failed: {exc}; check the username and password in the URL"
        ) from exc
    except rex.ResponseError as exc:
        text = _unannotated(str(exc))
        if isinstance(exc, rex.NoPermissionError) or text.startswith("NOPERM"):
            raise PermissionDeniedError(
                f"permission denied: {text}; grant that command, key or channel to the ACL user "
                "(ACL SETUSER) or connect as another user"
            ) from exc
        if text.startswith(("WRONGPASS", "NOAUTH")):
            raise AuthenticationError(
                f"authentication failed: {text}; check the username and password in the URL"
            ) from exc
        if text.startswith("WRONGTYPE"):
            raise WrongTypeError(channel, key) from exc
        raise RedisCommandError(text) from exc
    except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
        raise ConnectionLostError(f"cannot reach the server: {exc}") from exc
    except rex.RedisError as exc:
        raise RedisCommandError(str(exc)) from exc


_ANNOTATION = re.compile(r"^Command # \d+ \((\S+).*?\) of pipeline caused error: (.*)$", re.DOTALL)


def _unannotated(text: str) -> str:
    """redis-py prefixes an error inside a pipeline with the whole command, arguments included
    (raw payload bytes, say): keep the server's words and the command's name only."""
    m = _ANNOTATION.match(text)
    if m is None:
        return text
    error = m.group(2)
    if error.startswith(("('", '("')) and error.endswith(",)"):
        # some redis-py versions put the whole args tuple there: keep its one string
        try:
            value = ast.literal_eval(error)
        except (ValueError, SyntaxError):
            pass
        else:
            if isinstance(value, tuple) and len(value) == 1 and isinstance(value[0], str):
                error = value[0]
    return f"{error} (in {m.group(1).upper()})"
