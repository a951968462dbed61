"""Operators over any async iterable: merging, batching, bounded concurrent mapping.

Pure asyncio, no Redis; modelled on futures-rs ``StreamExt`` and tokio-stream's
``chunks_timeout``. Each operator checks its arguments when it is called and returns an
:class:`OpIterator`, meant to be entered before it is iterated::

    async with merge(a, b) as items:
        async for item in items:
            ...

Lifetimes, the same for every operator:

* Sources are advanced, and ``fn`` runs, in helper tasks owned by the iteration. However
  the iteration ends (exhaustion, an error, cancellation of the consumer, ``aclose()``
  or leaving ``async with``), those tasks are cancelled and awaited, then the sources
  are closed with ``aclose()``. A plain ``async for`` that breaks out early cleans up
  when the iterator is garbage-collected, as an async generator does; ``async with``
  cleans up on the spot.
* The first error from a source or from ``fn`` propagates unchanged (not wrapped in
  an ``ExceptionGroup``) once the rest is cancelled. Cancellation is never swallowed.
* Items already read from a source but not yet handed to the consumer are discarded on
  an early exit; each operator's docstring says how many there can be.
* Because a source is advanced from helper tasks, it must not hold task-bound scopes
  (``asyncio.timeout``, ``asyncio.TaskGroup``) open across its ``yield``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
from collections import deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
)
from types import TracebackType
from typing import Any, Literal, Self, TypeVar

__all__ = ["OpIterator", "chunks", "for_each_concurrent", "map_concurrent", "merge"]

T = TypeVar("T")
R = TypeVar("R")
T_co = TypeVar("T_co", covariant=True)


class _End(enum.Enum):
    """What a read task returns for an exhausted source: no task ends in StopAsyncIteration."""

    END = enum.auto()


class OpIterator(AsyncIterator[T_co]):
    """The iterator an operator returns: an async iterator and an async context manager.

    ``aclose()``, which leaving ``async with`` calls, cancels and awaits the operator's
    tasks and closes the sources it iterated. It is idempotent. Like an async
    generator, it has one reader at a time: to stop a reader from another task, cancel
    that task rather than calling ``aclose()`` while it waits for an item.
    """

    __slots__ = ("_gen",)

    def __init__(self, gen: AsyncGenerator[T_co, None]) -> None:
        # The work is an async generator so that the event loop's async-generator
        # hooks finalize an iterator abandoned mid-iteration, as for any generator.
        self._gen = gen

    def __aiter__(self) -> Self:
        return self

    def __anext__(self) -> Awaitable[T_co]:
        return self._gen.__anext__()

    async def aclose(self) -> None:
        await self._gen.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def merge(*sources: AsyncIterable[T]) -> OpIterator[T]:
    """Yield items from all sources as soon as any has one; end when all have ended.

    Each source has at most one read in flight, so at most one item per source is
    read ahead of the consumer; on an early exit those read-ahead items are
    discarded. An error in one source cancels the reads of the others and propagates.

    :raises TypeError: if a source is not an async iterable.
    :raises ValueError: if the same iterator is given twice.
    """
    iterators = [aiter(source) for source in sources]
    if len({id(it) for it in iterators}) < len(iterators):
        raise ValueError("merge() got the same iterator twice; it can have one reader")
    return OpIterator(_merge(iterators))


def chunks(
    source: AsyncIterable[T], size: int, *, timeout: float | None = None
) -> OpIterator[list[T]]:
    """Yield lists of up to ``size`` items, like tokio-stream's ``chunks_timeout``.

    A batch is emitted when it holds ``size`` items, when ``timeout`` seconds have
    passed since its first item arrived, or when the source ends; a batch is never
    empty. A timeout does not interrupt the pending read, so no item is lost to it;
    that one read may complete while the consumer holds the batch, and its item is
    discarded on an early exit. If the source raises, the partial batch is emitted
    first and the error comes on the next step.

    :raises ValueError: if size is not an int >= 1, or timeout is neither None nor a
        finite number of seconds > 0.
    :raises TypeError: if source is not an async iterable.
    """
    _check_count("size", size)
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout < math.inf
    ):
        raise ValueError(f"timeout must be None or a finite number of seconds > 0, got {timeout!r}")
    iterator = aiter(source)
    if timeout is None:
        return OpIterator(_chunks(iterator, size))
    return OpIterator(_chunks_timeout(iterator, size, timeout))


def map_concurrent(
    source: AsyncIterable[T],
    fn: Callable[[T], Awaitable[R]],
    *,
    limit: int,
    ordered: bool = False,
) -> OpIterator[R]:
    """Yield ``await fn(item)`` for each item, with at most ``limit`` calls in flight.

    Results come in completion order, or in source order with ``ordered=True``. At
    most ``limit`` items are held at a time (calls in flight plus results not yet
    yielded), so an ordered map reads at most ``limit`` items past the oldest
    unfinished call. The first error from ``fn`` or the source cancels and awaits the
    calls in flight, then propagates; results not yet yielded are discarded, as they
    are on an early exit.

    :raises ValueError: if limit is not an int >= 1.
    :raises TypeError: if fn is not callable or source is not an async iterable.
    """
    _check_count("limit", limit)
    if not callable(fn):
        raise TypeError(f"fn must be an async callable, got {fn!r}")
    return OpIterator(_map_concurrent(aiter(source), fn, limit, ordered))


async def for_each_concurrent(
    source: AsyncIterable[T], fn: Callable[[T], Awaitable[object]], *, limit: int
) -> None:
    """Await ``fn(item)`` for each item, with at most ``limit`` calls in flight.

    Returns once the source has ended and every call has finished. The first error from
    ``fn`` or the source cancels and awaits the calls in flight, then propagates.

    :raises ValueError: if limit is not an int >= 1.
    :raises TypeError: if fn is not callable or source is not an async iterable.
    """
    async with map_concurrent(source, fn, limit=limit) as results:
        async for _ in results:
            pass


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")


async def _merge(iterators: list[AsyncIterator[T]]) -> AsyncGenerator[T, None]:
    # Dict order is the order reads were started, so draining finished reads in that
    # order is round-robin fair and deterministic.
    reads: dict[asyncio.Task[T | Literal[_End.END]], AsyncIterator[T]] = {}
    try:
        for it in iterators:
            reads[_spawn(_next(it), "merge")] = it
        while reads:
            done, _ = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
            for read in [r for r in reads if r in done]:
                it = reads.pop(read)
                item = read.result()
                if item is _End.END:
                    continue
                yield item
                # Read again only when the consumer asks for more: one item ahead.
                reads[_spawn(_next(it), "merge")] = it
    finally:
        await _shutdown(reads, iterators)


async def _chunks(iterator: AsyncIterator[T], size: int) -> AsyncGenerator[list[T], None]:
    batch: list[T] = []
    try:
        while True:
            try:
                item = await anext(iterator)
            except StopAsyncIteration:
                break
            except Exception:
                if batch:
                    yield batch
                raise
            batch.append(item)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch
    finally:
        await _shutdown((), [iterator])


async def _chunks_timeout(
    iterator: AsyncIterator[T], size: int, window: float
) -> AsyncGenerator[list[T], None]:
    loop = asyncio.get_running_loop()
    # The read survives a timeout and carries over to the next batch: cancelling it
    # could lose an item the source had already produced.
    read: asyncio.Task[T | Literal[_End.END]] | None = None
    batch: list[T] = []
    deadline = 0.0
    try:
        while True:
            if read is None:
                read = _spawn(_next(iterator), "chunks")
            left = deadline - loop.time() if batch else None
            done, _ = await asyncio.wait({read}, timeout=left)
            if not done:
                yield batch
                batch = []
                continue
            finished, read = read, None
            try:
                item = finished.result()
            except Exception:
                if batch:
                    yield batch
                raise
            if item is _End.END:
                if batch:
                    yield batch
                return
            if not batch:
                deadline = loop.time() + window
            batch.append(item)
            if len(batch) == size:
                yield batch
                batch = []
    finally:
        await _shutdown(() if read is None else (read,), [iterator])


async def _map_concurrent(
    iterator: AsyncIterator[T],
    fn: Callable[[T], Awaitable[R]],
    limit: int,
    ordered: bool,
) -> AsyncGenerator[R, None]:
    calls: deque[asyncio.Task[R]] = deque()  # in source order, finished or not
    read: asyncio.Task[T | Literal[_End.END]] | None = None
    exhausted = False
    try:
        while True:
            if read is None and not exhausted and len(calls) < limit:
                read = _spawn(_next(iterator), "map_concurrent")
            if read is None and not calls:
                return
            waiting: set[asyncio.Future[Any]] = set(calls)
            if read is not None:
                waiting.add(read)
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            # Fail fast, even in ordered mode: the first failure found stops everything.
            for call in calls:
                if call.done() and (call.cancelled() or call.exception() is not None):
                    call.result()
            if read is not None and read.done():
                item, read = read.result(), None
                if item is _End.END:
                    exhausted = True
                else:
                    calls.append(_spawn(_call(fn, item), "map_concurrent"))
            if ordered:
                while calls and calls[0].done():
                    yield calls.popleft().result()
            else:
                for call in [c for c in calls if c.done()]:
                    calls.remove(call)
                    yield call.result()
    finally:
        await _shutdown([*calls, *([] if read is None else [read])], [iterator])


def _spawn(coro: Coroutine[Any, Any, T], operator: str) -> asyncio.Task[T]:
    return asyncio.create_task(coro, name=f"broker.{operator}")


async def _next(iterator: AsyncIterator[T]) -> T | Literal[_End.END]:
    try:
        return await anext(iterator)
    except StopAsyncIteration:
        return _End.END


async def _call(fn: Callable[[T], Awaitable[R]], item: T) -> R:
    # A coroutine around fn, so any awaitable it returns can run as a task.
    return await fn(item)


async def _shutdown(
    tasks: Iterable[asyncio.Task[Any]], iterators: Iterable[AsyncIterator[Any]]
) -> None:
    """Cancel and await ``tasks``, then ``aclose()`` every iterator that has it."""
    try:
        await _cancel_and_wait(list(tasks))
    finally:
        async with contextlib.AsyncExitStack() as stack:
            for it in iterators:
                aclose = getattr(it, "aclose", None)
                if aclose is not None:
                    stack.push_async_callback(aclose)


async def _cancel_and_wait(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    interrupted: asyncio.CancelledError | None = None
    # Like TaskGroup.__aexit__, keep waiting if we are cancelled meanwhile: an owner
    # must not return while its tasks still run. The cancellation is re-raised after.
    while pending := [task for task in tasks if not task.done()]:
        try:
            await asyncio.wait(pending)
        except asyncio.CancelledError as exc:
            interrupted = exc
    for task in tasks:
        if not task.cancelled():
            task.exception()  # mark retrieved; the error that matters propagates
    if interrupted is not None:
        raise interrupted
