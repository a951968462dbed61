"""Testing handlers on a real server: publish messages, run a handler on them, wait for the acks.

Example (with the pytest plugin's ``broker_client`` fixture)::

    from broker.testing import run_handler

    async def test_billing(broker_client):
        run = await run_handler(broker_client, "orders", bill, [{"id": 1}, {"id": 2}])
        assert run.acked == run.ids
        assert not run.failures
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

from ._broker import Broker, connect
from ._channel import Channel, DeadLetter
from ._message import Message
from ._stop import StopSource

__all__ = ["Delivery", "HandlerRun", "delete_namespace", "isolated", "run_handler"]


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One call of the handler."""

    id: str
    data: Any
    headers: dict[str, str]
    #: 1 on the first delivery, 2 on the first retry, ...
    deliveries: int
    #: what the handler raised, or None
    error: BaseException | None
    #: what the handler returned (None when it raised)
    result: Any


@dataclasses.dataclass(frozen=True)
class HandlerRun:
    """What :func:`run_handler` saw: every published id is settled (acked or dead-lettered)."""

    channel: str
    group: str
    #: the published ids, in order
    ids: list[str]
    #: every call of the handler, in the order they finished
    calls: list[Delivery]
    #: the dead letters of these messages (after ``max_deliveries`` failures)
    dead_letters: list[DeadLetter]
    #: seconds from the first publish until every message was settled
    seconds: float

    @property
    def acked(self) -> list[str]:
        """Ids whose handler succeeded and that were acked, in publish order."""
        dead = {d.original_id for d in self.dead_letters}
        return [i for i in self.ids if i not in dead]

    @property
    def failures(self) -> list[Delivery]:
        """The calls that raised (each is retried, then dead-lettered)."""
        return [c for c in self.calls if c.error is not None]

    def results(self) -> dict[str, Any]:
        """Id -> what the handler returned on its successful call."""
        return {c.id: c.result for c in self.calls if c.error is None}


async def run_handler(
    b: Broker,
    channel: str | Channel[Any],
    handler: Callable[[Message[Any]], Awaitable[Any]],
    messages: Iterable[Any],
    *,
    group: str = "test",
    concurrency: int = 1,
    max_deliveries: int = 5,
    retry_delay: float = 0.01,
    within: float = 10.0,
    **options: Any,
) -> HandlerRun:
    """Publish ``messages``, run ``handler`` on them as ``group`` and return once every one is
    acked (its handler returned) or dead-lettered (it raised ``max_deliveries`` times).

    It runs what production runs: :meth:`Broker.consume` on the real server, with its retries
    (``retry_delay`` seconds of backoff, short for tests), dead letters and acks. ``messages``
    are payloads or ``(payload, headers)`` tuples. The group is created at the channel's end
    first, so only these messages are handled. ``options`` go to the subscription.

    :raises TimeoutError: if some message is still unsettled after ``within`` seconds (the
        message says which, and what the handler raised so far).
    :raises Exception: what the consumer raised, if it failed (not what the handler raised).
    """
    ch = b.channel(channel) if isinstance(channel, str) else channel
    await ch.create_group(group, start="new")
    calls: list[Delivery] = []

    async def recorded(msg: Message[Any]) -> Any:
        try:
            result = await handler(msg)
        except Exception as exc:
            calls.append(Delivery(msg.id, msg.data, msg.headers, msg.deliveries, exc, None))
            raise
        calls.append(Delivery(msg.id, msg.data, msg.headers, msg.deliveries, None, result))
        return result

    started = time.monotonic()
    ids = await ch.publish_many(messages)
    stop = StopSource()
    consumer = asyncio.ensure_future(
        b.consume(
            ch,
            recorded,
            group=group,
            concurrency=concurrency,
            stop=stop.token,
            max_deliveries=max_deliveries,
            retry_delay=retry_delay,
            **options,
        )
    )
    # a deadline checked between polls, not asyncio.timeout: on Python 3.11 a cancel that
    # lands inside redis-py's own wait_for can be lost, and the poll would never end
    deadline = started + within
    try:
        while not await _settled(ch, group, ids):
            if consumer.done():
                consumer.result()  # its error
                raise RuntimeError("the consumer ended before the messages were settled")
            if time.monotonic() >= deadline:
                left = await _unsettled(ch, group, ids)
                errors = [f"{c.id}#{c.deliveries}: {c.error!r}" for c in calls if c.error][:10]
                raise TimeoutError(
                    f"{len(left)} of {len(ids)} messages not settled after {within}s: "
                    f"{left[:10]}; handler errors so far: {errors or 'none'}"
                )
            await asyncio.sleep(0.01)
        seconds = time.monotonic() - started
    finally:
        # a stop lets running handlers finish; one that hangs is cancelled after a short grace
        stop.stop("run_handler done")
        await asyncio.wait([consumer], timeout=2.0)
        if not consumer.done():
            consumer.cancel()
            await asyncio.wait([consumer])
    consumer.result()
    wanted = set(ids)
    dead = [
        d for d in await ch.dead_letters(count=max(100, 2 * len(ids))) if d.original_id in wanted
    ]
    return HandlerRun(ch.name, group, ids, calls, dead, seconds)


@contextlib.asynccontextmanager
async def isolated(
    url: str | None = None, namespace: str | None = None, **options: Any
) -> AsyncIterator[Broker]:
    """A connected broker in a namespace of its own (default: a fresh random one); every key
    of the namespace is deleted on exit, whatever happened. ``options`` go to :func:`connect`
    (``reconnect_deadline`` defaults to 10 s, so a test fails fast when the server is gone).
    """
    namespace = namespace or f"t{uuid.uuid4().hex[:10]}"
    options.setdefault("reconnect_deadline", 10)
    try:
        async with connect(url, namespace=namespace, **options) as b:
            yield b
    finally:
        await delete_namespace(url, namespace)


async def delete_namespace(url: str | None, namespace: str) -> int:
    """Delete every key of ``namespace`` (``SCAN`` + ``UNLINK``, on every node of a cluster);
    returns how many there were."""
    async with connect(url, namespace=namespace, reconnect_deadline=10) as b:
        r = b.redis
        # namespaces are letters, digits and _ - . : only: nothing to escape in the pattern
        keys = [k async for k in r.scan_iter(match=f"{namespace}:*", count=500)]
        for i in range(0, len(keys), 500):
            await r.unlink(*keys[i : i + 500])  # a cluster client splits it by slot
        return len(keys)


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


async def _settled(ch: Channel[Any], group: str, ids: list[str]) -> bool:
    """Every id delivered to the group, and none of them pending any more."""
    if not ids:
        return True
    return not await _unsettled(ch, group, ids)


async def _unsettled(ch: Channel[Any], group: str, ids: list[str]) -> list[str]:
    info = await ch.info()
    mine = next((g for g in info.groups if g.name == group), None)
    if mine is None:
        return list(ids)
    last = _id_key(mine.last_delivered_id)
    undelivered = [i for i in ids if _id_key(i) > last]
    first, final = min(ids, key=_id_key), max(ids, key=_id_key)
    r = ch.broker.redis
    rows = await ch.broker.call(
        lambda: r.xpending_range(ch.key, group, min=first, max=final, count=len(ids) + 1000),
        ch.name,
    )
    wanted = set(ids)
    pending = [i for row in rows if (i := row["message_id"].decode()) in wanted]
    return sorted(set(undelivered) | set(pending), key=_id_key)
