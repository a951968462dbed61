"""One Redis stream of a channel (a channel with P partitions has P of them).

A :class:`Stream` is what subscriptions, tails and settlements work on: they never need the
channel object, only the keys, the codec and the payload bound.
"""

from __future__ import annotations

import dataclasses

from ._codec import Codec

__all__ = ["Stream"]


@dataclasses.dataclass(frozen=True, eq=False, slots=True)
class Stream:
    """A stream of channel ``channel`` (``partition`` is None for an unpartitioned channel)."""

    channel: str
    key: str
    dead_key: str
    codec: Codec
    #: bound on the payload size accepted by the decoder, in bytes
    max_payload: int
    partition: int | None = None

    def __repr__(self) -> str:
        return f"<Stream {self.key}>"
