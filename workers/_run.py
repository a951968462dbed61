"""The work of one slot, by kind: consume messages, or publish what a producer makes.

Each runner's :meth:`run` returns when the work ends by itself (a producer finished) or after
the stop token fired and what was running finished; once ``hurry`` is set it cancels what is
still running (a consumer's handlers: their messages stay pending, never acked) and returns.

A consumer also tells its slot (the :class:`Control`) when to end early: ``retire`` once it
handled ``max_messages`` or its memory reached ``max_memory`` (a graceful stop; the supervisor
starts a fresh slot at once), ``fail`` when a handler raised ``MemoryError`` (the slot stops
and its message stays pending: it is not a failure of the message).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from typing import Any, Protocol, cast

import broker
from broker import StopToken
from broker._consume import default_prefetch, run_consumer
from broker._observe import instrument_handler
from broker._request import REPLY_TO, answer_failure, answer_result
from broker._resource import cancel_and_wait

from ._health import rss_bytes
from ._logging import event
from ._spec import WorkerSpec
from ._target import Target

__all__ = ["Control", "Runner", "make_runner"]

log = logging.getLogger("workers")
Ready = Callable[[], Awaitable[None]]


class Control(Protocol):
    """What a runner may ask of its slot."""

    def retire(self, reason: str) -> None:
        """Stop gracefully and exit as retired (the supervisor starts a fresh slot at once)."""

    def fail(self, exc: BaseException) -> None:
        """Stop, and end the slot with ``exc`` as its failure (a crash: restarted with backoff)."""


class Runner(Protocol):
    @property
    def processed(self) -> int: ...

    @property
    def failed(self) -> int: ...

    @property
    def cancelled(self) -> int:
        """Handlers (or the producer) cancelled when the grace period ran out."""

    def in_flight(self) -> int: ...

    async def run(self, ready: Ready, stop: StopToken, hurry: asyncio.Event) -> None: ...


def make_runner(
    b: broker.Broker, spec: WorkerSpec, slot: int, target: Target, control: Control
) -> Runner:
    if target.style == "consume":
        return Consumer(b, spec, slot, target, control)
    if target.style == "generate":
        return Generator(b, spec, target)
    return Producer(b, spec, target)


async def until_hurried(coro: Coroutine[Any, Any, None], *hurry: asyncio.Event) -> bool:
    """Run ``coro`` to its end, or cancel it once any ``hurry`` event is set; True if it was
    cancelled.

    Every task is owned here: cancelled and awaited in the ``finally``, whatever happens.
    """
    task = asyncio.ensure_future(coro)
    waiters = [asyncio.ensure_future(h.wait()) for h in hurry]
    try:
        await asyncio.wait({task, *waiters}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hurried = not task.done()
        for waiter in waiters:
            await cancel_and_wait(waiter)
        await cancel_and_wait(task)
    if not hurried:
        task.result()  # its error, as itself
    return hurried


class Consumer:
    """``async def handler(msg)`` on every message, at most ``concurrency`` at a time."""

    def __init__(
        self, b: broker.Broker, spec: WorkerSpec, slot: int, target: Target, control: Control
    ) -> None:
        self.b, self.spec, self.slot, self.target = b, spec, slot, target
        self.control = control
        self.processed = self.failed = self.cancelled = 0
        self._sub: broker.Subscription[Any] | None = None
        #: handlers running, and those of them parked after a fatal error (MemoryError)
        self._running = self._fatal = 0
        #: set once only fatal handlers run: cancel them, their messages stay pending
        self._abandon = asyncio.Event()
        self._fn = target.fn

    def in_flight(self) -> int:
        return 0 if self._sub is None else self._sub.statistics().in_flight

    async def run(self, ready: Ready, stop: StopToken, hurry: asyncio.Event) -> None:
        spec = self.spec
        assert spec.group is not None
        # the read-ahead that Broker.consume uses: a slow process does not hoard messages
        prefetch = default_prefetch(spec.concurrency)
        async with self.b.subscribe(
            [self.b.channel(name, partitions=spec.partitions) for name in spec.channels],
            group=spec.group,
            consumer=spec.consumer_name(self.slot),
            start=spec.start,
            prefetch=prefetch,
            max_deliveries=spec.max_deliveries,
            claim_idle=spec.claim_idle,
        ) as sub:
            self._sub = sub
            # metrics and traces around the handler itself, which sees its errors (_handle
            # settles them); so consume() below does not instrument _handle again
            self._fn = instrument_handler(self.target.fn, sub)
            await ready()
            # on stop, consume() stops taking messages, releases the fetched ones at once and
            # returns when running handlers are done; leaving the `async with` sends their acks
            await until_hurried(
                run_consumer(
                    sub,
                    self._handle,
                    concurrency=spec.concurrency,
                    group_concurrency=spec.group_concurrency,
                    stop=stop,
                    instrument=False,
                ),
                hurry,
                self._abandon,
            )

    async def _handle(self, msg: broker.Message[Any]) -> None:
        self._running += 1
        try:
            result = await self._fn(msg)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                self.cancelled += 1  # the grace period ran out: left pending, delivered again
                raise
            self._failed(msg, exc)  # the handler cancelled itself: a failure like any other
        except MemoryError as exc:
            await self._fatal_error(msg, exc)  # never returns: cancelled, left pending
        except BaseException as exc:  # SystemExit too: a handler never ends the worker
            if msg._header(REPLY_TO) is not None:  # a request: answer the error at once
                await answer_failure(msg, exc)
            self._failed(msg, exc)
        else:
            # a request is answered before consume() acks it (one not sent is nacked instead)
            if msg._header(REPLY_TO) is not None:
                await answer_result(msg, result)
            self.processed += 1
        finally:
            self._running -= 1
            self._check_abandon()
        self._check_limits()

    async def _fatal_error(self, msg: broker.Message[Any], exc: MemoryError) -> None:
        """The process is out of memory: stop the slot and leave this message unsettled (not
        nacked: it is not the message's failure). It stays pending and the restarted slot
        replays it; one that keeps causing this is dead-lettered by its delivery count."""
        event(
            log,
            logging.ERROR,
            "fatal",
            channel=msg.channel,
            id=msg.id,
            delivery=msg.deliveries,
            error=type(exc).__name__,
            detail="the slot stops; the message stays pending and is delivered again",
        )
        self.control.fail(exc)
        self._fatal += 1
        self._check_abandon()
        try:
            await asyncio.Event().wait()  # until cancelled, with the consume loop
        finally:
            self._fatal -= 1

    def _check_abandon(self) -> None:
        if self._fatal and self._running == self._fatal:
            self._abandon.set()

    def _check_limits(self) -> None:
        spec = self.spec
        if spec.max_messages is not None:
            handled = self.processed + self.failed
            if handled >= spec.max_messages:
                self.control.retire(f"handled {handled} messages (--max-messages)")
        if spec.max_memory is not None:  # after every message: a pread, under 1 µs
            rss = rss_bytes()
            if rss >= spec.max_memory * 2**20:
                self.control.retire(f"rss {rss / 2**20:.1f} MiB (--max-memory)")

    def _failed(self, msg: broker.Message[Any], exc: BaseException) -> None:
        self.failed += 1
        last = msg.deliveries >= self.spec.max_deliveries
        event(
            log,
            logging.WARNING,
            "handler_failed",
            channel=msg.channel,
            id=msg.id,
            delivery=msg.deliveries,
            max_deliveries=self.spec.max_deliveries,
            then="dead letter" if last else "retry",
            error=type(exc).__name__,
            detail=str(exc)[:300],
        )
        # nack here rather than re-raise, so the failure is logged once, with these fields;
        # consume()'s ack after our return is then a no-op (already settled)
        msg.nack(error=exc)


class Generator:
    """An async generator: each item it yields is published to the channel, in order."""

    def __init__(self, b: broker.Broker, spec: WorkerSpec, target: Target) -> None:
        self.b, self.spec, self.target = b, spec, target
        self.processed = self.failed = self.cancelled = 0
        self._publishing = 0

    def in_flight(self) -> int:
        return self._publishing

    async def run(self, ready: Ready, stop: StopToken, hurry: asyncio.Event) -> None:
        channel = self.b.channel(self.spec.channels[0], partitions=self.spec.partitions)
        await ready()

        async def produce() -> None:
            # a stop cancels the generator where it waits for its next item (and closes it);
            # a publish already started is finished first
            items = cast(AsyncGenerator[Any, None], stop.stop_stream(self.target.fn()))
            async with contextlib.aclosing(items):
                async for item in items:
                    self._publishing = 1
                    await channel.publish(item)
                    self._publishing = 0
                    self.processed += 1

        if await until_hurried(produce(), hurry):
            self.cancelled = self._publishing


class Producer:
    """``async def producer(channel, stop_token)``: runs until it returns."""

    def __init__(self, b: broker.Broker, spec: WorkerSpec, target: Target) -> None:
        self.b, self.spec, self.target = b, spec, target
        self.failed = self.cancelled = 0
        self._base: int | None = None
        self._final: int | None = None
        self._running = 0

    @property
    def processed(self) -> int:
        """Messages published with ``channel.publish`` (through this process's batcher)."""
        if self._final is not None:
            return self._final
        if self._base is None:
            return 0
        return self.b.publisher.statistics().published - self._base

    def in_flight(self) -> int:
        return self._running

    async def run(self, ready: Ready, stop: StopToken, hurry: asyncio.Event) -> None:
        channel = self.b.channel(self.spec.channels[0], partitions=self.spec.partitions)
        self._base = self.b.publisher.statistics().published
        await ready()
        self._running = 1
        try:
            if await until_hurried(self.target.fn(channel, stop), hurry):
                self.cancelled = 1
        finally:
            self._running = 0
            self._final = self.processed
