"""Tests for broker._ops: ordering, cleanup on every kind of exit, errors, limits."""

from __future__ import annotations

import asyncio
import gc
import math
import time
from collections import defaultdict
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

import pytest

from broker._ops import OpIterator, chunks, for_each_concurrent, map_concurrent, merge

T = TypeVar("T")

# Only guards against hangs; no test waits for it unless the code under test is broken.
HANG = 60.0


class Boom(Exception):
    pass


async def assert_no_leaked_tasks(turns: int = 2) -> None:
    """Fail if, after ``turns`` loop turns, any task but the current one is alive."""
    for _ in range(turns):
        await asyncio.sleep(0)
    leaked = asyncio.all_tasks() - {asyncio.current_task()}
    assert not leaked, f"tasks outlived the operator: {leaked}"


@pytest.fixture(autouse=True)
async def _clean_loop() -> AsyncIterator[None]:
    """Fail on leaked tasks and on anything reported to the loop's exception handler.

    That handler receives "Task was destroyed but it is pending!" and "Task exception
    was never retrieved", which are logged rather than warned.
    """
    loop = asyncio.get_running_loop()
    reports: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: reports.append(context))
    try:
        yield
        await assert_no_leaked_tasks()
        gc.collect()
        await asyncio.sleep(0)
        assert not reports, reports
    finally:
        loop.set_exception_handler(None)


class Clock:
    """The loop's clock, which a test can move forward to fire timeouts at once."""

    def __init__(self) -> None:
        self.offset = 0.0

    def time(self) -> float:
        return time.monotonic() + self.offset

    async def advance(self, seconds: float) -> None:
        self.offset += seconds
        await spin()


@pytest.fixture
async def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(asyncio.get_running_loop(), "time", fake.time)
    return fake


async def spin(turns: int = 20) -> None:
    """Let the loop run ``turns`` times, enough for everything ready to settle."""
    for _ in range(turns):
        await asyncio.sleep(0)


async def wait_until(predicate: Callable[[], bool]) -> None:
    # Polling on purpose: the predicates read state that the code under test changes
    # without signalling, and an Event there would be a change to that code.
    async with asyncio.timeout(HANG):
        while not predicate():
            await asyncio.sleep(0)


async def next_of(iterator: AsyncIterator[T]) -> T:
    async with asyncio.timeout(HANG):
        return await anext(iterator)


def start_next(iterator: AsyncIterator[T]) -> asyncio.Task[T]:
    return asyncio.create_task(next_of(iterator))


async def collect(iterable: AsyncIterable[T]) -> list[T]:
    async with asyncio.timeout(HANG):
        return [item async for item in iterable]


async def agen(items: Iterable[T]) -> AsyncIterator[T]:
    for item in items:
        yield item


_END = object()


class Feed:
    """A source the test feeds by hand, recording how its generator ended."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.produced = 0
        self.waiting = False
        self.cancelled = False
        self.finalized = False

    def put(self, *items: object) -> None:
        for item in items:
            self.queue.put_nowait(item)

    def end(self) -> None:
        self.queue.put_nowait(_END)

    async def items(self) -> AsyncIterator[Any]:
        try:
            while True:
                self.waiting = True
                item = await self.queue.get()
                self.waiting = False
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                self.produced += 1
                yield item
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        finally:
            self.waiting = False
            self.finalized = True


class Numbers:
    """An endless source that never waits, counting what it produced."""

    def __init__(self) -> None:
        self.produced = 0
        self.finalized = False

    async def items(self, tag: str = "") -> AsyncIterator[Any]:
        try:
            while True:
                item = (tag, self.produced) if tag else self.produced
                self.produced += 1
                yield item
        finally:
            self.finalized = True


class Gated:
    """An ``fn`` whose calls block until the test releases them."""

    def __init__(self) -> None:
        self.gates: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)
        self.started: list[int] = []
        self.running: set[int] = set()
        self.released: set[int] = set()
        self.cancelled: set[int] = set()
        self.peak = 0

    async def __call__(self, item: int) -> int:
        self.started.append(item)
        self.running.add(item)
        self.peak = max(self.peak, len(self.running))
        try:
            await self.gates[item].wait()
        except asyncio.CancelledError:
            self.cancelled.add(item)
            raise
        finally:
            self.running.discard(item)
        return item * 10

    def release(self, item: int) -> None:
        self.released.add(item)
        self.gates[item].set()

    async def release_in_waves(self, total: int, limit: int) -> None:
        """Each time ``limit`` unreleased calls (or all that remain) run, release them."""
        while len(self.released) < total:
            expected = min(limit, total - len(self.released))
            await wait_until(lambda: len(self.running - self.released) == expected)  # noqa: B023
            for item in self.running - self.released:
                self.release(item)


# merge


async def test_merge_yields_each_item_as_soon_as_its_source_has_it() -> None:
    a, b = Feed(), Feed()
    async with merge(a.items(), b.items()) as merged:
        b.put("b1")
        assert await next_of(merged) == "b1"
        a.put("a1")
        assert await next_of(merged) == "a1"
        a.put("a2")
        assert await next_of(merged) == "a2"
        a.end()
        b.put("b2")
        assert await next_of(merged) == "b2"
        b.end()
        with pytest.raises(StopAsyncIteration):
            await next_of(merged)
    assert a.finalized and b.finalized
    assert not a.cancelled and not b.cancelled


async def test_merge_yields_every_item_keeping_each_sources_order() -> None:
    async with merge(agen(range(10)), agen(range(10, 25)), agen([])) as merged:
        got = await collect(merged)
    assert sorted(got) == list(range(25))
    assert [x for x in got if x < 10] == list(range(10))
    assert [x for x in got if x >= 10] == list(range(10, 25))


async def test_merge_of_no_sources_is_empty() -> None:
    assert await collect(merge()) == []


async def test_merge_reads_at_most_one_item_ahead_per_source() -> None:
    x, y = Numbers(), Numbers()
    seen = {"x": 0, "y": 0}
    async with merge(x.items("x"), y.items("y")) as merged:
        for _ in range(40):
            tag, _n = await next_of(merged)
            seen[tag] += 1
            await spin(5)  # a slow consumer: the sources are free to run ahead
            assert 0 <= x.produced - seen["x"] <= 1
            assert 0 <= y.produced - seen["y"] <= 1
    assert seen["x"] >= 10 and seen["y"] >= 10  # both sources get served
    assert x.finalized and y.finalized  # read-ahead items were dropped with them


async def test_merge_error_in_one_source_cancels_the_others() -> None:
    a, b, c = Feed(), Feed(), Feed()

    async def fail_b_once_all_wait() -> None:
        await wait_until(lambda: a.waiting and b.waiting and c.waiting)
        b.put(Boom("b"))

    async with merge(a.items(), b.items(), c.items()) as merged:
        failer = asyncio.create_task(fail_b_once_all_wait())
        with pytest.raises(Boom, match="b"):
            await next_of(merged)
        await failer
        # Cleanup ran before the error reached us, not later in aclose().
        await assert_no_leaked_tasks(turns=0)
        assert a.cancelled and c.cancelled
        assert a.finalized and b.finalized and c.finalized
        with pytest.raises(StopAsyncIteration):
            await next_of(merged)


async def test_merge_break_cancels_pending_reads_and_closes_sources() -> None:
    a, b = Feed(), Feed()
    a.put(1)
    async with merge(a.items(), b.items()) as merged:
        async for item in merged:
            assert item == 1
            break
    await assert_no_leaked_tasks(turns=0)
    assert b.cancelled and b.finalized  # its read was in flight
    assert a.finalized and not a.cancelled  # it was suspended at its yield


async def test_merge_abandoned_by_plain_async_for_is_finalized() -> None:
    a, b = Feed(), Feed()
    a.put(1)
    async for _ in merge(a.items(), b.items()):
        break
    gc.collect()
    await wait_until(lambda: a.finalized and b.finalized)
    await assert_no_leaked_tasks(turns=5)
    assert b.cancelled


async def test_merge_cancelling_the_consumer_propagates() -> None:
    a, b = Feed(), Feed()

    async def consume() -> None:
        async with merge(a.items(), b.items()) as merged:
            async for _ in merged:
                pass

    consumer = asyncio.create_task(consume())
    await wait_until(lambda: a.waiting and b.waiting)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert consumer.cancelled()
    assert a.cancelled and b.cancelled and a.finalized and b.finalized


async def test_cleanup_outlasts_a_second_cancellation_of_the_consumer() -> None:
    """Like a TaskGroup, the operator does not return while a source is still cleaning up."""
    cleanup_may_end = asyncio.Event()
    cleaning = asyncio.Event()

    async def slow_to_close() -> AsyncIterator[int]:
        try:
            await asyncio.Event().wait()
            yield 0
        finally:
            cleaning.set()
            await cleanup_may_end.wait()

    async def consume() -> None:
        async with merge(slow_to_close()) as merged:
            async for _ in merged:
                pass

    consumer = asyncio.create_task(consume())
    await spin()
    consumer.cancel()
    await wait_until(cleaning.is_set)
    consumer.cancel()
    await spin()
    assert not consumer.done()
    cleanup_may_end.set()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    await assert_no_leaked_tasks(turns=0)


async def test_merge_checks_arguments_at_the_call() -> None:
    with pytest.raises(TypeError):
        merge(agen([1]), [2])  # type: ignore[arg-type]
    same = agen([1])
    with pytest.raises(ValueError, match="same iterator twice"):
        merge(same, same)


# chunks


@pytest.mark.parametrize("window", [None, 60.0])
async def test_chunks_emits_full_batches_then_the_rest(window: float | None) -> None:
    async with chunks(agen(range(7)), 3, timeout=window) as batches:
        assert await collect(batches) == [[0, 1, 2], [3, 4, 5], [6]]
    assert await collect(chunks(agen(range(3)), 1, timeout=window)) == [[0], [1], [2]]
    assert await collect(chunks(agen(range(4)), 2, timeout=window)) == [[0, 1], [2, 3]]


@pytest.mark.parametrize("window", [None, 60.0])
async def test_chunks_of_an_empty_source_emits_nothing(window: float | None) -> None:
    assert await collect(chunks(agen([]), 3, timeout=window)) == []


async def test_chunks_timeout_emits_while_the_next_read_is_pending(clock: Clock) -> None:
    feed = Feed()
    feed.put(1, 2)
    async with chunks(feed.items(), 5, timeout=5) as batches:
        pending = start_next(batches)
        await wait_until(lambda: feed.produced == 2 and feed.waiting)
        assert not pending.done()
        await clock.advance(6)
        assert pending.done()
        assert await pending == [1, 2]
        assert feed.waiting and not feed.cancelled  # the read survived the timeout

        # With nothing read, no deadline runs: an empty batch is never emitted.
        pending = start_next(batches)
        await clock.advance(30)
        assert not pending.done()

        feed.put(3, 4, 5, 6, 7, 8)
        assert await pending == [3, 4, 5, 6, 7]  # 3 came through the surviving read
        feed.end()
        assert await next_of(batches) == [8]
        with pytest.raises(StopAsyncIteration):
            await next_of(batches)
    assert feed.finalized and not feed.cancelled


async def test_chunks_deadline_counts_from_the_first_item_of_the_batch(
    clock: Clock,
) -> None:
    feed = Feed()
    async with chunks(feed.items(), 10, timeout=5) as batches:
        pending = start_next(batches)
        feed.put(1)
        await wait_until(lambda: feed.produced == 1 and feed.waiting)
        await clock.advance(3)
        feed.put(2)
        await wait_until(lambda: feed.produced == 2 and feed.waiting)
        assert not pending.done()
        await clock.advance(3)  # 6 s after item 1, only 3 s after item 2
        assert pending.done()
        assert await pending == [1, 2]


async def test_chunks_emits_the_partial_batch_before_a_source_error() -> None:
    async def failing() -> AsyncIterator[int]:
        yield 1
        yield 2
        raise Boom

    for window in (None, 60.0):
        async with chunks(failing(), 5, timeout=window) as batches:
            assert await next_of(batches) == [1, 2]
            with pytest.raises(Boom):
                await next_of(batches)


async def test_chunks_early_exit_cancels_the_pending_read(clock: Clock) -> None:
    feed = Feed()
    feed.put(1)
    async with chunks(feed.items(), 5, timeout=5) as batches:
        pending = start_next(batches)
        await wait_until(lambda: feed.produced == 1 and feed.waiting)
        await clock.advance(6)
        assert await pending == [1]
        feed.put(2)  # read ahead while we hold the batch; dropped when we leave
        await wait_until(lambda: feed.produced == 2)
    await assert_no_leaked_tasks(turns=0)
    assert feed.finalized


@pytest.mark.parametrize("window", [None, 5.0])
async def test_chunks_cancelling_the_consumer_propagates(window: float | None) -> None:
    feed = Feed()
    feed.put(1)

    async def consume() -> None:
        async with chunks(feed.items(), 5, timeout=window) as batches:
            async for _ in batches:
                pass

    consumer = asyncio.create_task(consume())
    await wait_until(lambda: feed.produced == 1 and feed.waiting)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert feed.cancelled and feed.finalized


@pytest.mark.parametrize("size", [0, -1, 1.5, True, None, "3"])
async def test_chunks_rejects_a_bad_size_at_the_call(size: Any) -> None:
    with pytest.raises(ValueError, match="size must be"):
        chunks(agen([]), size)


@pytest.mark.parametrize("window", [0, -1.0, math.nan, math.inf, True, "1"])
async def test_chunks_rejects_a_bad_timeout_at_the_call(window: Any) -> None:
    with pytest.raises(ValueError, match="timeout must be None or"):
        chunks(agen([]), 3, timeout=window)


async def test_chunks_messages_name_the_fix() -> None:
    with pytest.raises(ValueError, match=r"^size must be >= 1, got 0$"):
        chunks(agen([]), 0)
    with pytest.raises(TypeError):
        chunks([1, 2], 3)  # type: ignore[arg-type]


# map_concurrent


async def test_map_ordered_yields_in_source_order() -> None:
    fn = Gated()
    async with map_concurrent(agen(range(5)), fn, limit=5, ordered=True) as results:
        collecting = asyncio.create_task(collect(results))
        await wait_until(lambda: len(fn.running) == 5)
        for item in reversed(range(5)):
            fn.release(item)
            await spin(5)
        assert await collecting == [0, 10, 20, 30, 40]


async def test_map_unordered_yields_in_completion_order() -> None:
    fn = Gated()
    order = [3, 0, 4, 1, 2]
    async with map_concurrent(agen(range(5)), fn, limit=5) as results:
        got = []
        for item in order:
            pending = start_next(results)
            await wait_until(lambda: len(fn.running | fn.released) == 5)
            fn.release(item)
            got.append(await pending)
        with pytest.raises(StopAsyncIteration):
            await next_of(results)
    assert got == [item * 10 for item in order]


@pytest.mark.parametrize("ordered", [False, True])
async def test_map_runs_exactly_limit_calls_at_a_time(ordered: bool) -> None:
    fn = Gated()
    async with map_concurrent(agen(range(50)), fn, limit=5, ordered=ordered) as results:
        collecting = asyncio.create_task(collect(results))
        await fn.release_in_waves(total=50, limit=5)
        got = await collecting
    assert fn.peak == 5
    assert (got if ordered else sorted(got)) == [item * 10 for item in range(50)]


async def test_map_ordered_reads_no_further_than_limit_past_the_oldest_call() -> None:
    source = Numbers()
    first_done = asyncio.Event()

    async def fn(item: int) -> int:
        if item == 0:
            await first_done.wait()
        return item

    async with map_concurrent(source.items(), fn, limit=3, ordered=True) as results:
        pending = start_next(results)
        await wait_until(lambda: source.produced == 3)
        await spin()
        assert source.produced == 3 and not pending.done()
        first_done.set()
        assert await pending == 0
        assert [await next_of(results) for _ in range(10)] == list(range(1, 11))
        assert source.produced <= 11 + 3
    assert source.finalized


@pytest.mark.parametrize("ordered", [False, True])
async def test_map_error_in_fn_cancels_the_calls_in_flight(ordered: bool) -> None:
    gated = Gated()

    async def fn(item: int) -> int:
        if item == 3:
            raise Boom(item)
        return await gated(item)

    feed = Feed()
    feed.put(*range(10))
    async with map_concurrent(feed.items(), fn, limit=4, ordered=ordered) as results:
        with pytest.raises(Boom):
            await next_of(results)
        await assert_no_leaked_tasks(turns=0)
    assert gated.cancelled == {0, 1, 2}
    assert gated.started == [0, 1, 2]
    assert feed.finalized


async def test_map_error_in_the_source_cancels_the_calls_in_flight() -> None:
    fn = Gated()

    async def failing() -> AsyncIterator[int]:
        yield 0
        yield 1
        await wait_until(lambda: len(fn.running) == 2)
        raise Boom

    async with map_concurrent(failing(), fn, limit=4) as results:
        with pytest.raises(Boom):
            await next_of(results)
    assert fn.cancelled == {0, 1}


@pytest.mark.parametrize("ordered", [False, True])
async def test_map_break_cancels_calls_in_flight_and_closes_the_source(
    ordered: bool,
) -> None:
    fn = Gated()
    fn.release(0)
    source = Numbers()
    async with map_concurrent(source.items(), fn, limit=3, ordered=ordered) as results:
        async for result in results:
            assert result == 0
            break
    await assert_no_leaked_tasks(turns=0)
    assert fn.cancelled == set(fn.started) - {0}
    assert source.finalized


async def test_map_cancelling_the_consumer_propagates() -> None:
    fn = Gated()

    async def consume() -> None:
        async with map_concurrent(agen(range(10)), fn, limit=3) as results:
            async for _ in results:
                pass

    consumer = asyncio.create_task(consume())
    await wait_until(lambda: len(fn.running) == 3)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert consumer.cancelled()
    assert fn.cancelled == {0, 1, 2}


async def test_map_accepts_fn_returning_any_awaitable() -> None:
    loop = asyncio.get_running_loop()

    def fn(item: int) -> asyncio.Future[int]:
        future: asyncio.Future[int] = loop.create_future()
        future.set_result(item + 1)
        return future

    assert await collect(map_concurrent(agen(range(3)), fn, limit=2, ordered=True)) == [
        1,
        2,
        3,
    ]


@pytest.mark.parametrize("limit", [0, -1, 1.5, True, None, "2"])
async def test_map_rejects_a_bad_limit_at_the_call(limit: Any) -> None:
    with pytest.raises(ValueError, match="limit must be"):
        map_concurrent(agen([]), Gated(), limit=limit)


async def test_map_checks_arguments_at_the_call() -> None:
    with pytest.raises(ValueError, match=r"^limit must be >= 1, got 0$"):
        map_concurrent(agen([]), Gated(), limit=0)
    with pytest.raises(TypeError, match="fn must be"):
        map_concurrent(agen([]), None, limit=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        map_concurrent([1], Gated(), limit=1)  # type: ignore[arg-type]


# for_each_concurrent


async def test_for_each_runs_every_call_exactly_limit_at_a_time() -> None:
    fn = Gated()
    running = asyncio.create_task(for_each_concurrent(agen(range(50)), fn, limit=5))
    await fn.release_in_waves(total=50, limit=5)
    async with asyncio.timeout(HANG):
        await running
    assert fn.peak == 5
    assert sorted(fn.started) == list(range(50))


async def test_for_each_first_error_cancels_the_rest_and_propagates() -> None:
    gated = Gated()
    source = Numbers()

    async def fn(item: int) -> None:
        if item == 2:
            await wait_until(lambda: gated.running == {0, 1})
            raise Boom
        await gated(item)

    with pytest.raises(Boom):
        async with asyncio.timeout(HANG):
            await for_each_concurrent(source.items(), fn, limit=3)
    assert gated.cancelled == {0, 1}
    assert source.finalized


async def test_for_each_cancelling_the_caller_propagates() -> None:
    fn = Gated()
    running = asyncio.create_task(for_each_concurrent(agen(range(10)), fn, limit=2))
    await wait_until(lambda: len(fn.running) == 2)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert fn.cancelled == {0, 1}


async def test_for_each_rejects_a_bad_limit() -> None:
    with pytest.raises(ValueError, match=r"^limit must be >= 1, got 0$"):
        await for_each_concurrent(agen([]), Gated(), limit=0)


# OpIterator


async def test_op_iterator_is_its_own_context_and_closes_idempotently() -> None:
    feed = Feed()
    feed.put(1)
    operator = merge(feed.items())
    assert isinstance(operator, OpIterator)
    async with operator as entered:
        assert entered is operator
        assert await next_of(entered) == 1
    await operator.aclose()
    await operator.aclose()
    assert feed.finalized
    with pytest.raises(StopAsyncIteration):
        await next_of(operator)


async def test_op_iterator_closed_before_iteration_never_starts() -> None:
    operator = chunks(agen(range(3)), 2)
    await operator.aclose()
    assert await collect(operator) == []


async def test_closing_a_pipeline_closes_it_all_the_way_down() -> None:
    a, b = Feed(), Feed()
    a.put(1, 2, 3)
    async with chunks(merge(a.items(), b.items()), 3) as batches:
        assert await next_of(batches) == [1, 2, 3]
    await assert_no_leaked_tasks(turns=0)
    assert a.finalized and b.finalized and b.cancelled
