"""Durable writes: Kafka's ``acks=all`` in Redis terms.

Redis replicates asynchronously: a master that dies before its replicas have a write loses it,
although it already answered. ``WAIT n timeout`` on the connection that made the writes returns
once ``n`` replicas acknowledged every write of that connection so far, or at the timeout with
how many did. So a durable write is the write, then ``WAIT``, in one round trip on one
connection (a publish batch has one ``WAIT`` per node, not one per entry).

``WAIT`` makes a write survive the loss of its master when the replica that has it is the one
promoted; it does not make Redis strongly consistent (a failover may still promote a replica
that has not got it, when several replicas exist and fewer were waited for).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from ._errors import (
    ConfigurationError,
    ConnectionLostError,
    ReplicationTimeoutError,
    map_redis_errors,
)
from ._retry import RetryPolicy
from ._wire import pack

if TYPE_CHECKING:
    from ._topology import Topology

__all__ = ["WaitFor", "durability", "durably"]


@dataclasses.dataclass(frozen=True)
class WaitFor:
    """Wait until ``replicas`` replicas have the writes (``WAIT``), at most ``timeout`` seconds."""

    replicas: int
    timeout: float
    command: bytes = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # WAIT n 0 would wait for ever: at least one millisecond
        ms = max(1, round(self.timeout * 1000))
        object.__setattr__(self, "command", pack(b"WAIT", self.replicas, ms))

    def short(self, reply: Any) -> tuple[int, str | None] | None:
        """None when ``reply`` (the WAIT's) confirms the writes; else how many replicas did
        and, when the server refused the WAIT, why."""
        if isinstance(reply, int) and reply >= self.replicas:
            return None
        if isinstance(reply, int):
            return reply, None
        return 0, f"the server refused WAIT ({reply})"

    def error(
        self,
        what: str,
        reply: Any,
        *,
        channel: str | None = None,
        message_id: str | None = None,
    ) -> ReplicationTimeoutError | None:
        """The error for a WAIT that fell short (None when it did not)."""
        short = self.short(reply)
        if short is None:
            return None
        acked, reason = short
        return ReplicationTimeoutError(
            what,
            replicas=self.replicas,
            acked=acked,
            timeout=self.timeout,
            channel=channel,
            message_id=message_id,
            reason=reason,
        )


def durability(replicas: int, timeout: float) -> WaitFor | None:
    """What a write with ``replicas=`` waits for (None for 0).

    :raises ConfigurationError: on a count < 0 or a timeout <= 0.
    """
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
        raise ConfigurationError(f"replicas must be an int >= 0, got {replicas!r}")
    if not timeout > 0:
        raise ConfigurationError(f"replica_timeout must be > 0 seconds, got {timeout!r}")
    return WaitFor(replicas, float(timeout)) if replicas else None


async def durably(
    topology: Topology,
    retry: RetryPolicy,
    key: str,
    commands: list[bytes],
    wait: WaitFor,
) -> tuple[list[Any], Any]:
    """Run ``commands`` (packed RESP) on the node that owns ``key``, then ``WAIT``, in one
    round trip on one connection; return their replies and the WAIT's.

    Lost connections and "not run here" replies (a failover, a moved slot) are retried until
    the reconnect deadline, re-reading where ``key`` lives: ``commands`` must be safe to run
    twice (a lost reply sends them again). Any other error reply is raised, mapped.
    """
    from ._topology import routing_error

    payload = b"".join([*commands, wait.command])
    backoff = retry.backoff()
    while True:
        started = time.monotonic()
        try:
            with map_redis_errors():
                raw = await topology.wire_for(key).execute(
                    payload, len(commands) + 1, limit=backoff.limit(), wait=wait.timeout
                )
            replies = raw[:-1]
            refused = next((r for r in replies if routing_error(r) is not None), None)
            if refused is not None:
                raise ConnectionLostError(f"not run here: {refused}")
            for r in replies:
                if isinstance(r, BaseException):
                    with map_redis_errors(None, key):
                        raise r
            return replies, raw[-1]
        except ConnectionLostError as exc:
            await backoff.wait(exc, started)
            await topology.refresh(str(exc))
