"""Partitioned channels: a channel ``orders`` with P partitions is P streams
``<namespace>:{orders#0}`` ... ``{orders#P-1}``, each with its own hash tag, so a cluster spreads
them over its primaries. ``#`` is not allowed in channel names, so no user channel collides.

The partition count is recorded on the server, in the hash ``<namespace>:{orders}:meta``
(field ``partitions``), the first time a process uses the channel (``HSETNX``: the first
writer wins). Every process reads it, so the CLI and other processes find the count without
being told, and a process that asks for another count gets :class:`ConfigurationError` instead
of silently writing elsewhere. An unpartitioned channel records ``1``.

A message with a key goes to partition ``crc32(key) % P`` (``zlib.crc32``, IEEE 802.3, of the
key's UTF-8 bytes: the same in every process, version and language), so the messages of one
key keep their order on the wire. Without a key, messages go to the partitions in turn.
"""

from __future__ import annotations

import zlib
from typing import Any

from ._errors import ConfigurationError

__all__ = ["MAX_PARTITIONS", "meta_key", "partition_for", "partition_key", "record_partitions"]

MAX_PARTITIONS = 1024


def meta_key(namespace: str, channel: str) -> str:
    """The hash that records the channel's partition count (the channel's own hash tag)."""
    return f"{namespace}:{{{channel}}}:meta"


def partition_key(namespace: str, channel: str, partition: int) -> str:
    """The stream of one partition: ``<namespace>:{<channel>#<partition>}``."""
    return f"{namespace}:{{{channel}#{partition}}}"


def partition_for(key: str | bytes | int, partitions: int) -> int:
    """The partition of a message key: ``crc32(utf-8 bytes of key) % partitions``."""
    if isinstance(key, int) and not isinstance(key, bool):
        key = str(key)
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, bytes):
        raise TypeError(f"a message key is a str, bytes or int, got {type(key).__name__}")
    return zlib.crc32(key) % partitions


def check_partitions(partitions: object) -> int | None:
    if partitions is None:
        return None
    if (
        not isinstance(partitions, int)
        or isinstance(partitions, bool)
        or not 1 <= partitions <= MAX_PARTITIONS
    ):
        raise ConfigurationError(
            f"partitions must be an int from 1 to {MAX_PARTITIONS}, got {partitions!r}"
        )
    return partitions


async def record_partitions(
    redis: Any,
    namespace: str,
    channel: str,
    asked: int | None,
    stream_key: str,
    *,
    write: bool = True,
) -> int:
    """The channel's partition count: the one recorded on the server, else ``asked`` (or 1),
    recorded now (unless ``write`` is false: inspecting a channel creates nothing).

    :raises ConfigurationError: if ``asked`` differs from the recorded count, or asks for
        partitions of a channel whose unpartitioned stream already exists.
    """
    key = meta_key(namespace, channel)
    recorded = await redis.hget(key, "partitions")
    if recorded is None:
        want = asked or 1
        if not write:
            return want
        if want > 1 and await redis.exists(stream_key):
            raise ConfigurationError(
                f"channel {channel!r} already exists without partitions ({stream_key}); "
                "its partition count cannot change: use another channel name, or delete it "
                "first (broker channel delete, Channel.delete())"
            )
        await redis.hsetnx(key, "partitions", want)
        recorded = await redis.hget(key, "partitions")  # ours, or the one of a faster process
    count = int(recorded)
    if asked is not None and asked != count:
        raise ConfigurationError(
            f"channel {channel!r} has {count} partition(s) on the server (recorded in {key}), "
            f"not {asked}: a partition count cannot change under running producers; pass "
            f"partitions={count} or none, use another channel name, or delete the channel first"
        )
    return count
