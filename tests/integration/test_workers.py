"""The worker runtime: serve(), kinds, graceful and forced shutdown, heartbeats, the supervisor."""

from __future__ import annotations

import asyncio
import calendar
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

import broker
from broker.workers import (
    ExitCode,
    Supervisor,
    WorkerSpec,
    check_health,
    inspect_target,
    list_workers,
    serve,
    this_host,
)
from tests.conftest import compare_ids
from tests.helpers import handlers

ROOT = Path(__file__).resolve().parents[2]
H = "tests.helpers.handlers"


def spec_for(redis_url: str, namespace: str, name: str, target: str, **kw: Any) -> WorkerSpec:
    kw.setdefault("kind", "consume")
    if kw["kind"] == "consume":
        kw.setdefault("group", "g")
        kw.setdefault("start", "all")
    return WorkerSpec(
        name="w" + name[-6:],
        target=f"{H}:{target}",
        channels=(name,),
        url=redis_url,
        namespace=namespace,
        heartbeat=0.2,
        **kw,
    )


async def until(check: Callable[[], Any], what: str, bound: float = 20) -> None:
    """Poll ``check`` (sync or async) until true; fail after ``bound`` seconds."""
    deadline = time.monotonic() + bound
    while True:
        ok = check()
        if isinstance(ok, Awaitable):
            ok = await ok
        if ok:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {bound}s")
        await asyncio.sleep(0.02)


@pytest.fixture(autouse=True)
def _fresh_handlers() -> None:
    handlers.reset()


# -- kinds ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "style"),
    [
        ("record", "consume"),
        ("with_default", "consume"),
        ("callable_object", "consume"),
        ("numbers", "generate"),
        ("ticker", "produce"),
    ],
)
def test_kind_is_told_from_the_signature(target: str, style: str) -> None:
    assert inspect_target(f"{H}:{target}").style == style


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("not_async", "is not async"),
        ("no_args", "cannot tell what"),
        ("three_args", "cannot tell what"),
        ("generator_with_args", "requires count"),
        ("missing", "cannot load"),
    ],
)
def test_kind_errors_name_the_accepted_shapes(target: str, message: str) -> None:
    with pytest.raises(broker.ConfigurationError, match=message) as info:
        inspect_target(f"{H}:{target}")
    if message != "cannot load" and message != "requires count":
        assert "async def handler(msg)" in str(info.value)


def test_spec_errors_are_clear() -> None:
    with pytest.raises(broker.ConfigurationError, match="needs a --group"):
        WorkerSpec(name="x", kind="consume", target="m:f", channels=("a",))
    with pytest.raises(broker.ConfigurationError, match="one --channel, got 2"):
        WorkerSpec(name="x", kind="produce", target="m:f", channels=("a", "b"))
    with pytest.raises(broker.ConfigurationError, match="no --group"):
        WorkerSpec(name="x", kind="produce", target="m:f", channels=("a",), group="g")
    with pytest.raises(ValueError, match="processes"):
        Supervisor(WorkerSpec(name="x", kind="produce", target="m:f", channels=("a",)), 0)


# -- serve: consumers -------------------------------------------------------------------------


async def test_serve_consumes_reports_health_and_stops_remotely(
    client: broker.Broker, name: str, namespace: str, redis_url: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name)
    sent = await ch.publish_many(range(20))
    spec = spec_for(redis_url, namespace, name, "record", concurrency=4)
    ready = asyncio.Event()
    task = asyncio.create_task(serve(spec, 0, ready=ready.set))
    try:
        async with asyncio.timeout(20):
            await ready.wait()
            await until(lambda: len(handlers.recorded) >= 20, "20 handled")
            await until(lambda: _processed(client, 20), "a heartbeat with processed=20", bound=5)
        [status] = await list_workers(client)
        assert (status.name, status.kind, status.state, status.alive) == (
            spec.name,
            "consume",
            "running",
            True,
        )
        assert (status.host, status.pid, status.slot) == (this_host(), os.getpid(), 0)
        assert (status.channels, status.group, status.consumer) == (
            [name],
            "g",
            spec.consumer_name(0),
        )
        assert (status.failed, status.in_flight) == (0, 0)
        assert time.time() - 20 < status.started <= time.time()
        healthy, line = await check_health(client, this_host(), spec.name)
        assert healthy, line
        assert not (await check_health(client, "another-host", spec.name))[0]
        assert not (await check_health(client, this_host(), "another-name"))[0]
        await client.stop_source(f"workers/{spec.name}").stop("deploy")
        outcome = await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
        await client.stop_source(f"workers/{spec.name}").reset()
    assert outcome.remote and "workers/" in outcome.reason and "deploy" in outcome.reason
    assert (outcome.processed, outcome.exit_code) == (20, ExitCode.OK)
    compare_ids(sent, handlers.recorded)
    assert await list_workers(client) == [], "the heartbeat is removed on a clean stop"
    healthy, line = await check_health(client, this_host(), spec.name)
    assert not healthy and "no worker" in line
    assert (await raw.xpending(ch.key, "g"))["pending"] == 0


async def _processed(client: broker.Broker, n: int) -> bool:
    return sum(w.processed for w in await list_workers(client)) >= n


async def test_stop_finishes_running_handlers_and_releases_fetched_ones(
    client: broker.Broker, name: str, namespace: str, redis_url: str, raw: aioredis.Redis
) -> None:
    """concurrency 1, prefetch 4 (four per slot): one message in the handler, three fetched
    but not started, two not read."""
    ch = client.channel(name)
    sent = await ch.publish_many(["a", "b", "c", "d", "e", "f"])
    spec = spec_for(redis_url, namespace, name, "gated", grace=20)
    source = broker.StopSource()
    task = asyncio.create_task(serve(spec, 0, stop=source.token))
    try:
        await until(lambda: handlers.started, "a handler start")

        async def pending() -> int:
            return (await raw.xpending(ch.key, "g"))["pending"]

        await until(lambda: _eq(pending(), 4), "4 pending (in flight + fetched)")
        source.stop("shutdown")
        # the fetched ones are released at once, while the handler still runs
        for fetched in sent[1:4]:
            await until(lambda f=fetched: _released(ch, f), "the fetched messages released")
        assert not task.done() and handlers.recorded == []
        handlers.gate.set()
        outcome = await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
    assert (outcome.processed, outcome.cancelled, outcome.exit_code) == (1, 0, ExitCode.OK)
    assert handlers.started == handlers.recorded == [sent[0]]  # acked, below
    rows = await raw.xpending_range(ch.key, "g", "-", "+", 10)
    assert [r["message_id"].decode() for r in rows] == sent[1:4]
    # another slot takes the released ones at once (not after claim_idle) and the unread ones
    other = asyncio.create_task(serve(spec, 1))
    try:
        await until(lambda: len(handlers.recorded) == 6, "6 handled")
    finally:
        await client.stop_source(f"workers/{spec.name}").stop("done")
        await asyncio.wait_for(other, 10)
        await client.stop_source(f"workers/{spec.name}").reset()
    compare_ids(sent, handlers.recorded)
    assert (await raw.xpending(ch.key, "g"))["pending"] == 0


async def _eq(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def _released(ch: broker.Channel[Any], entry_id: str) -> bool:
    return any(p.id == entry_id and p.released for p in await ch.pending("g"))


async def test_grace_period_then_cancel_leaves_the_message_pending(
    client: broker.Broker, name: str, namespace: str, redis_url: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name)
    stuck, done = await ch.publish_many(["stuck", "fine"])
    spec = spec_for(redis_url, namespace, name, "hang_on_stuck", grace=0.3, concurrency=2)
    source = broker.StopSource()
    task = asyncio.create_task(serve(spec, 0, stop=source.token))
    try:
        await until(lambda: len(handlers.started) == 2 and handlers.recorded, "both started")
        t0 = time.monotonic()
        source.stop("shutdown")
        outcome = await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
    assert 0.3 <= time.monotonic() - t0 < 3
    assert outcome.grace_expired and outcome.cancelled == 1
    assert (outcome.processed, outcome.exit_code) == (1, ExitCode.GRACE_EXPIRED)
    pending = await raw.xpending_range(ch.key, "g", "-", "+", 10)
    assert [(p["message_id"].decode(), p["consumer"].decode()) for p in pending] == [
        (stuck, spec.consumer_name(0))
    ], "the cancelled one stays pending with this slot; the finished one was acked"
    assert handlers.recorded == [done]


async def test_handler_errors_are_retried_then_dead_lettered_and_the_worker_goes_on(
    client: broker.Broker,
    name: str,
    namespace: str,
    redis_url: str,
    raw: aioredis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ch = client.channel(name)
    sent = await ch.publish_many(range(10))
    odd, even = sent[1::2], sent[::2]
    spec = spec_for(redis_url, namespace, name, "fail_odd", concurrency=4, max_deliveries=2)
    caplog.set_level(logging.INFO)
    task = asyncio.create_task(serve(spec, 0))
    try:

        async def dead() -> list[broker.DeadLetter]:
            return await ch.dead_letters()

        await until(lambda: _count(dead(), len(odd)), "5 dead letters", bound=30)
        await ch.publish(100)  # still consuming after the failures
        await until(lambda: len(handlers.recorded) == len(even) + 1, "the next message handled")
        await client.stop_source(f"workers/{spec.name}").stop()
        outcome = await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
        await client.stop_source(f"workers/{spec.name}").reset()
    letters = await ch.dead_letters()
    compare_ids(odd, [d.original_id for d in letters])
    assert all(d.deliveries == 2 and "ValueError" in d.error for d in letters), letters
    assert (outcome.processed, outcome.failed, outcome.exit_code) == (6, 10, ExitCode.OK)
    failures = [r for r in caplog.records if r.getMessage() == "handler_failed"]
    fields = [r.worker_fields for r in failures]  # type: ignore[attr-defined]
    assert sorted((f["id"], f["delivery"]) for f in fields) == sorted(
        (i, d) for i in odd for d in (1, 2)
    ), "one line per failure"
    assert {(f["channel"], f["error"]) for f in fields} == {(name, "ValueError")}
    assert {f["then"] for f in fields if f["delivery"] == 2} == {"dead letter"}
    assert not [r for r in caplog.records if r.name == "broker.consume"], "logged once"
    assert (await raw.xpending(ch.key, "g"))["pending"] == 0


async def _count(value: Awaitable[list[Any]], n: int) -> bool:
    return len(await value) >= n


async def test_a_failing_worker_ends_with_its_error_instead_of_hanging(
    client: broker.Broker, name: str, namespace: str, redis_url: str, raw: aioredis.Redis
) -> None:
    spec = spec_for(redis_url, namespace, name, "record")
    await raw.set(client.channel(name).key, "not a stream")
    with pytest.raises(broker.WrongTypeError):
        await asyncio.wait_for(serve(spec, 0), 15)
    assert await list_workers(client) == [], "no heartbeat left claiming it is alive"


async def test_a_recorded_stop_token_ends_a_worker_that_starts_later(
    client: broker.Broker, name: str, namespace: str, redis_url: str
) -> None:
    await client.stop_source("release-7").stop("rolled back")
    spec = spec_for(redis_url, namespace, name, "record", stop_tokens=("release-7",))
    outcome = await asyncio.wait_for(serve(spec, 0), 15)
    assert outcome.remote and outcome.reason == "stop token 'release-7': rolled back"
    assert outcome.exit_code == ExitCode.OK


# -- serve: producers -------------------------------------------------------------------------


async def test_generator_producer_publishes_what_it_yields_then_finishes(
    client: broker.Broker, name: str, namespace: str, redis_url: str
) -> None:
    spec = spec_for(redis_url, namespace, name, "numbers", kind="produce")
    outcome = await asyncio.wait_for(serve(spec, 0), 15)
    assert (outcome.reason, outcome.processed, outcome.exit_code) == ("producer finished", 10, 0)
    async with client.channel(name).tail(start="beginning", follow=False) as tail:
        got = [m.data async for m in tail]
    assert got == list(range(10))
    assert await list_workers(client) == []


@pytest.mark.parametrize("target", ["forever", "ticker"])
async def test_producers_stop_between_messages(
    client: broker.Broker, name: str, namespace: str, redis_url: str, target: str
) -> None:
    spec = spec_for(redis_url, namespace, name, target, kind="produce")
    ch = client.channel(name)
    source = broker.StopSource()
    task = asyncio.create_task(serve(spec, 0, stop=source.token))
    try:
        await until(lambda: _xlen(ch, 5), "5 published")
        source.stop("enough")
        outcome = await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
    assert (outcome.reason, outcome.exit_code, outcome.cancelled) == ("enough", 0, 0)
    assert outcome.processed == (await ch.info()).length >= 5
    async with ch.tail(start="beginning", follow=False) as tail:
        assert [m.data async for m in tail] == list(range(outcome.processed)), "in order"


async def _xlen(ch: broker.Channel[Any], n: int) -> bool:
    return await ch.exists() and (await ch.info()).length >= n


# -- the supervisor ---------------------------------------------------------------------------


def _supervise(spec: WorkerSpec, *args: str, env: dict[str, str] | None = None) -> Any:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.supervise", spec.to_json(), *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stderr=subprocess.PIPE,
        text=True,
    )


async def _end(proc: subprocess.Popen[str], sig: int | None = signal.SIGTERM) -> tuple[int, str]:
    """Signal ``proc`` (if ``sig``), wait for it (bounded) and return (status, stderr)."""
    try:
        if sig is not None and proc.poll() is None:
            proc.send_signal(sig)
        _, err = await asyncio.to_thread(proc.communicate, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err


def _events(err: str, name: str) -> list[dict[str, Any]]:
    lines = [json.loads(x) for x in err.splitlines() if x.startswith("{")]
    return [e for e in lines if e["event"] == name]


async def test_supervisor_restarts_a_killed_slot_which_replays_its_own_pending(
    client: broker.Broker, name: str, namespace: str, redis_url: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name)
    sent = await ch.publish_many(range(80))
    spec = spec_for(redis_url, namespace, name, "record_redis", concurrency=3, processes=2)
    done_key = f"{namespace}:done"
    env = {"TEST_REDIS_URL": redis_url, "TEST_DONE_KEY": done_key}
    sup = _supervise(spec, env=env)
    try:

        async def done() -> list[tuple[int, str, int]]:
            rows = [x.decode().split() for x in await raw.lrange(done_key, 0, -1)]
            return [(int(p), i, int(d)) for p, i, d in rows]

        await until(lambda: _workers(client, 2), "2 slots", bound=30)
        await until(lambda: _count(done(), 10), "10 handled", bound=30)
        victim = next(w for w in await list_workers(client) if w.slot == 0)
        os.kill(victim.pid, signal.SIGKILL)
        await until(lambda: _dead(victim.pid), "the victim dead")  # its pending list is frozen
        held = {
            r["message_id"].decode()
            for r in await raw.xpending_range(
                ch.key, "g", "-", "+", 100, consumername=spec.consumer_name(0)
            )
        }
        assert held, "the victim held messages when it died"

        async def restarted() -> bool:
            now = {w.slot: w.pid for w in await list_workers(client)}
            return now.get(0) not in (None, victim.pid)

        await until(restarted, "slot 0 restarted", bound=30)
        await until(lambda: _all_done(done(), sent), "every message handled", bound=30)
        new_pid = next(w.pid for w in await list_workers(client) if w.slot == 0)
        code, err = await _end(sup)
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
    assert code == ExitCode.OK, err
    rows = await done()
    compare_ids(sent, {i for _, i, _ in rows})
    # its own pending messages came back to the restarted slot (claim_idle is 60 s: no one
    # else could have taken them), delivered again
    replayed = {i for p, i, d in rows if p == new_pid and d >= 2}
    assert replayed == held, (sorted(held - replayed), sorted(replayed - held))
    assert (await raw.xpending(ch.key, "g"))["pending"] == 0
    assert await list_workers(client) == []
    consumers = {c["name"].decode() for c in await raw.xinfo_consumers(ch.key, "g")}
    assert consumers == {spec.consumer_name(0), spec.consumer_name(1)}, "stable per slot"
    exits = _events(err, "child_exited")
    assert [(e["slot"], e["restart"]) for e in exits if e["code"] != 0] == [(0, True)]


def _dead(pid: int) -> bool:
    """Gone, or a zombie not yet reaped by the supervisor."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


async def _workers(client: broker.Broker, n: int) -> bool:
    return len([w for w in await list_workers(client) if w.state == "running"]) == n


async def _all_done(rows: Awaitable[list[tuple[int, str, int]]], sent: list[str]) -> bool:
    return {i for _, i, _ in await rows} >= set(sent)


async def test_a_poison_message_that_kills_the_process_backs_off_then_is_dead_lettered(
    client: broker.Broker, name: str, namespace: str, redis_url: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name)
    poison = await ch.publish("poison")
    spec = spec_for(redis_url, namespace, name, "crash_on_poison", max_deliveries=3)
    done_key = f"{namespace}:done"
    env = {"TEST_REDIS_URL": redis_url, "TEST_DONE_KEY": done_key}
    sup = _supervise(spec, "1", "0.2", env=env)
    try:
        await until(lambda: _count(ch.dead_letters(), 1), "the poison dead-lettered", bound=40)
        after = await ch.publish("fine")
        await until(lambda: _eq(raw.llen(done_key), 1), "the next message handled")
        code, err = await _end(sup)
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
    assert code == ExitCode.OK, err
    [letter] = await ch.dead_letters()
    assert letter.original_id == poison and "delivered 4 times" in letter.error
    assert [x.decode() for x in await raw.lrange(done_key, 0, -1)] == [after]
    starts = [_ts(e["ts"]) for e in _events(err, "child_started")]
    exits = _events(err, "child_exited")
    assert [e["restart_in"] for e in exits if e["restart"]] == [0.2, 0.4, 0.8], exits
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert len(gaps) == 3, starts
    assert all(g >= d for g, d in zip(gaps, (0.2, 0.4, 0.8), strict=True)), gaps


def _ts(text: str) -> float:
    whole, ms = text.rstrip("Z").split(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(ms) / 1000


async def test_remote_stop_ends_the_supervisor_instead_of_restarting(
    client: broker.Broker, name: str, namespace: str, redis_url: str
) -> None:
    spec = spec_for(redis_url, namespace, name, "record", grace=1.0)
    sup = _supervise(spec, "2")
    try:
        await until(lambda: _workers(client, 2), "2 slots", bound=30)
        await client.stop_source(f"workers/{spec.name}").stop("deploy done")
        code, err = await _end(sup, None)
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
        await client.stop_source(f"workers/{spec.name}").reset()
    assert code == ExitCode.OK, err
    assert len(_events(err, "child_started")) == 2, "a clean exit is not restarted"
    [stopped] = _events(err, "stopped")
    assert stopped["reason"] == "every slot is done" and stopped["exit"] == 0


async def test_a_stop_while_a_slot_waits_for_its_restart_exits_1(
    client: broker.Broker, name: str, namespace: str, redis_url: str
) -> None:
    ch = client.channel(name)
    spec = spec_for(redis_url, namespace, name, "crash_on_poison")
    env = {"TEST_REDIS_URL": redis_url, "TEST_DONE_KEY": f"{namespace}:done"}
    sup = _supervise(spec, "1", "30", env=env)
    try:
        await until(lambda: _workers(client, 1), "the slot running", bound=30)
        [slot] = await list_workers(client)
        await ch.publish("poison")
        # reaped by the supervisor (gone from /proc, not a zombie): it waits to restart it
        await until(lambda: not os.path.exists(f"/proc/{slot.pid}"), "the slot reaped")
        code, err = await _end(sup)
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
    assert code == ExitCode.FAILED, err
    [exited] = _events(err, "child_exited")
    assert (exited["code"], exited["restart"], exited["restart_in"]) == (1, True, 30)
    [stopped] = _events(err, "stopped")
    assert stopped["exit"] == 1 and stopped["slots"] == {"0": 1}


async def test_a_sigterm_while_slots_are_still_starting_is_a_clean_stop(
    client: broker.Broker, name: str, namespace: str, redis_url: str
) -> None:
    spec = spec_for(redis_url, namespace, name, "record")
    sup = _supervise(spec, "2")
    try:

        def children() -> list[str]:
            return Path(f"/proc/{sup.pid}/task/{sup.pid}/children").read_text().split()

        # both children spawned, still importing: no signal handlers of their own yet
        await until(lambda: len(children()) == 2, "2 children spawned")
        code, err = await _end(sup)
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
    assert code == ExitCode.OK, err
    [stopped] = _events(err, "stopped")
    assert stopped["slots"] == {"0": 0, "1": 0}


# -- MemoryError is fatal for the slot, not a failure of the message -------------------------


async def test_a_memory_error_ends_the_slot_and_leaves_the_message_pending(
    client: broker.Broker, name: str, namespace: str, redis_url: str, raw: aioredis.Redis
) -> None:
    """With max_deliveries=1 a nack would dead-letter it at once: it must not be nacked."""
    ch = client.channel(name)
    ok1, boom, ok2 = await ch.publish_many(["ok1", "boom", "ok2"])
    os.environ["TEST_REDIS_URL"], os.environ["TEST_DONE_KEY"] = redis_url, f"{namespace}:done"
    try:
        spec = spec_for(redis_url, namespace, name, "out_of_memory_on_boom", max_deliveries=1)
        with pytest.raises(MemoryError):
            await asyncio.wait_for(serve(spec, 0), 15)
    finally:
        del os.environ["TEST_REDIS_URL"], os.environ["TEST_DONE_KEY"]
    assert await ch.dead_letters() == [], "a MemoryError is not the message's failure"
    pending = await raw.xpending_range(ch.key, "g", "-", "+", 10)
    assert [(p["message_id"].decode(), p["times_delivered"]) for p in pending][:1] == [(boom, 1)]
    done = [x.decode().split()[1] for x in await raw.lrange(f"{namespace}:done", 0, -1)]
    assert done == [ok1], "handled before; ok2 was not started (released or never read)"
    assert ok2 not in done
    assert await list_workers(client) == []


async def test_a_message_that_keeps_raising_memory_error_is_dead_lettered_by_its_count(
    client: broker.Broker, name: str, namespace: str, redis_url: str, raw: aioredis.Redis
) -> None:
    ch = client.channel(name)
    sent = await ch.publish_many(["a", "b", "boom", "c", "d"])
    boom = sent[2]
    spec = spec_for(
        redis_url, namespace, name, "out_of_memory_on_boom", max_deliveries=2, log_format="json"
    )
    done_key = f"{namespace}:done"
    env = {"TEST_REDIS_URL": redis_url, "TEST_DONE_KEY": done_key}
    sup = _supervise(spec, "1", "0.2", env=env)
    try:
        await until(lambda: _count(ch.dead_letters(), 1), "the message dead-lettered", bound=40)

        async def rest_handled() -> bool:
            got = {x.decode().split()[1] for x in await raw.lrange(done_key, 0, -1)}
            return got >= set(sent) - {boom}

        await until(rest_handled, "the other messages handled")
        code, err = await _end(sup)
    finally:
        if sup.poll() is None:
            sup.kill()
            sup.wait()
    assert code == ExitCode.OK, err
    [letter] = await ch.dead_letters()
    assert letter.original_id == boom and "delivered 3 times without an ack" in letter.error
    assert len(_events(err, "fatal")) == 2, "one per delivery that raised it"
    assert _events(err, "handler_failed") == [], "never a message failure"
    crashed = [e for e in _events(err, "child_exited") if e["restart"]]
    assert [(e["code"], e["restart_in"]) for e in crashed] == [(1, 0.2), (1, 0.4)], crashed
    handled = [x.decode().split()[1] for x in await raw.lrange(done_key, 0, -1)]
    compare_ids(set(sent) - {boom}, handled)
    assert (await raw.xpending(ch.key, "g"))["pending"] == 0
