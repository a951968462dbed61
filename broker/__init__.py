"""broker: reliable message streams over Redis Streams, as async iterators.

Example::

    import broker

    async with broker.connect() as b:
        orders = b.channel("orders")
        await orders.publish({"id": 1})
        async with orders.subscribe(group="billing") as messages:
            async for msg in messages:
                print(msg.data)
                msg.ack()
"""

from ._broker import Broker, connect
from ._channel import Channel, ChannelInfo, ConsumerInfo, DeadLetter, GroupInfo, PendingEntry
from ._codec import Codec, JsonCodec, MsgpackCodec, RawCodec
from ._errors import (
    AuthenticationError,
    BrokerError,
    ChannelError,
    ChannelFullError,
    ClosedError,
    ConfigurationError,
    ConnectionLostError,
    GroupMissingError,
    PermissionDeniedError,
    RedisCommandError,
    RemoteError,
    ReplicationTimeoutError,
    RequestTimeoutError,
    VersionConflictError,
    WrongTypeError,
)
from ._message import Message
from ._ops import chunks, for_each_concurrent, map_concurrent, merge
from ._publisher import PublisherStatistics
from ._request import RequestStatistics
from ._server import EmbeddedServer, ServerNotFoundError
from ._settings import Settings
from ._stop import RemoteStopSource, RemoteStopToken, StopSource, StopToken
from ._subscription import ChannelStatistics, Subscription, SubscriptionStatistics
from ._tail import Tail
from ._watch import Version, Watch, WatchStatistics, WatchSubscription, WatchTotals

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "Broker",
    "BrokerError",
    "Channel",
    "ChannelError",
    "ChannelFullError",
    "ChannelInfo",
    "ChannelStatistics",
    "ClosedError",
    "Codec",
    "ConfigurationError",
    "ConnectionLostError",
    "ConsumerInfo",
    "DeadLetter",
    "EmbeddedServer",
    "GroupInfo",
    "GroupMissingError",
    "JsonCodec",
    "Message",
    "MsgpackCodec",
    "PendingEntry",
    "PermissionDeniedError",
    "PublisherStatistics",
    "RawCodec",
    "RedisCommandError",
    "RemoteError",
    "RemoteStopSource",
    "RemoteStopToken",
    "ReplicationTimeoutError",
    "RequestStatistics",
    "RequestTimeoutError",
    "ServerNotFoundError",
    "Settings",
    "StopSource",
    "StopToken",
    "Subscription",
    "SubscriptionStatistics",
    "Tail",
    "Version",
    "VersionConflictError",
    "Watch",
    "WatchStatistics",
    "WatchSubscription",
    "WatchTotals",
    "WrongTypeError",
    "__version__",
    "chunks",
    "connect",
    "for_each_concurrent",
    "map_concurrent",
    "merge",
]
