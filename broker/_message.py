"""The message handed to applications."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    from ._stream import Stream

__all__ = ["Message", "Settles", "id_to_datetime", "id_to_ms"]

T = TypeVar("T")


def id_to_ms(entry_id: str) -> int:
    """The millisecond part of a stream entry id."""
    return int(entry_id.split("-", 1)[0])


def id_to_datetime(entry_id: str) -> datetime:
    """The time (UTC) at which an entry was added, from its id."""
    return datetime.fromtimestamp(id_to_ms(entry_id) / 1000, tz=UTC)


class Settles(Protocol):
    """What a message needs of the subscription it came from."""

    def ack(self, messages: Message[Any]) -> None: ...

    def nack(
        self,
        message: Message[Any],
        *,
        delay: float | None = None,
        error: BaseException | str | None = None,
    ) -> None: ...


class Message(Generic[T]):
    """One entry of a channel.

    ``data`` is the decoded payload, or for a foreign entry (written without the ``d`` field, e.g.
    by ``redis-cli XADD``) a dict of its fields. ``deliveries`` counts how often the group handed
    this entry out (1 on first delivery). ``error`` is set only by read-only tails, when the
    payload could not be decoded (``data`` is then the raw fields). ``headers`` and ``fields``
    (the entry's raw fields) are dicts, made when first read for an entry that has none of its
    own to show: a subscription's hot path allocates neither (each allocation of a container
    feeds the garbage collector, whose full passes over a large heap cost more per message
    than the decoding).
    """

    __slots__ = (
        "_fields",
        "_headers",
        "_replied",
        "_stream",
        "_subscription",
        "channel",
        "data",
        "deliveries",
        "error",
        "foreign",
        "id",
    )

    id: str
    channel: str
    data: T
    deliveries: int
    foreign: bool
    error: str | None
    _subscription: Settles | None
    #: the stream (of a partition, for a partitioned channel) the entry was read from
    _stream: Stream | None
    #: whether an answer to this request was sent (see :meth:`reply`)
    _replied: bool

    def __init__(
        self,
        id: str,
        channel: str,
        data: T,
        headers: dict[str, str] | None = None,
        deliveries: int = 1,
        foreign: bool = False,
        error: str | None = None,
        fields: dict[bytes, bytes] | bytes | None = None,
        _subscription: Settles | None = None,
        _stream: Stream | None = None,
    ) -> None:
        # ``fields`` as bytes is the payload of an entry whose only field is ``d`` (what
        # publish() writes): the dict is made when read
        self.id = id
        self.channel = channel
        self.data = data
        self._headers = headers or None
        self.deliveries = deliveries
        self.foreign = foreign
        self.error = error
        self._fields = fields
        self._subscription = _subscription
        self._stream = _stream
        self._replied = False

    @property
    def headers(self) -> dict[str, str]:
        """The headers the publisher sent (an empty dict when none)."""
        h = self._headers
        if h is None:
            h = self._headers = {}
        return h

    @headers.setter
    def headers(self, value: dict[str, str]) -> None:
        self._headers = value

    @property
    def fields(self) -> dict[bytes, bytes]:
        """The entry's fields as stored in the stream."""
        f = self._fields
        if f is None:
            f = self._fields = {}
        elif isinstance(f, bytes):  # the payload alone (see __init__)
            f = self._fields = {b"d": f}
        return f

    @fields.setter
    def fields(self, value: dict[bytes, bytes]) -> None:
        self._fields = value

    def _header(self, name: str) -> str | None:
        """One header's value, without making the dict of a message that has none."""
        h = self._headers
        return None if not h else h.get(name)

    def __repr__(self) -> str:
        return (
            f"Message(id={self.id!r}, channel={self.channel!r}, data={self.data!r}, "
            f"headers={self.headers!r}, deliveries={self.deliveries!r}, "
            f"foreign={self.foreign!r}, error={self.error!r})"
        )

    @property
    def partition(self) -> int | None:
        """The partition the entry was read from; None for an unpartitioned channel."""
        return None if self._stream is None else self._stream.partition

    @property
    def timestamp(self) -> datetime:
        """When the entry was added (from its id), in UTC."""
        return id_to_datetime(self.id)

    @property
    def reply_to(self) -> str | None:
        """The requester's inbox key if this message is a request (``channel.request()``);
        None otherwise, also for a ``reply-to`` header that is not an inbox key (never
        answered: see :attr:`is_request`)."""
        from ._request import reply_address

        address = reply_address(self)
        return None if address is None else address[0]

    @property
    def is_request(self) -> bool:
        """Whether this message was sent by ``channel.request()`` and awaits an answer."""
        from ._request import reply_address

        return reply_address(self) is not None

    async def reply(self, value: Any = None, *, error: BaseException | str | None = None) -> bool:
        """Answer this request with ``value`` (encoded as msgpack), or with ``error``, which the
        requester raises as :class:`RemoteError` (its class's qualified name and its text).

        ``consume()`` and workers answer on their own with the handler's return value (or its
        exception); call this when reading with ``subscribe()``, then ack. Returns False when
        the requester is gone (its inbox expired): nothing was written.

        :raises ValueError: if the message is not a request (see :attr:`is_request`).
        :raises TypeError: if the message came from a read-only tail.
        :raises ConnectionLostError: if the server stays unreachable past the deadline.
        """
        from ._request import answer

        link = getattr(self._owner(), "link", None)
        if link is None:
            raise TypeError("this message's subscription cannot send answers")
        written = await answer(link, self, value, error)
        self._replied = True
        return written

    def ack(self) -> None:
        """Acknowledge: the group will not deliver this message again.

        Acks are batched (one ``XACK`` per channel per round trip) and flushed before the
        subscription closes; ``await subscription.flush()`` waits until they reached the server.

        :raises TypeError: if the message came from a read-only tail.
        """
        sub = self._subscription
        if sub is None:
            self._owner()  # raises
        else:
            sub.ack(self)

    def nack(self, delay: float | None = None, error: BaseException | str | None = None) -> None:
        """Reject: deliver again after ``delay`` seconds (default: exponential backoff).

        After the subscription's ``max_deliveries`` the message moves to the dead-letter stream
        with ``error`` instead, and the original is acked in the same atomic step.
        """
        self._owner().nack(self, delay=delay, error=error)

    def _owner(self) -> Settles:
        if self._subscription is None:
            raise TypeError(
                "this message came from a read-only tail; subscribe with a group to ack or nack"
            )
        return self._subscription
