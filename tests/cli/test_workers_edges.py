"""Edges of `broker worker` found by review: handlers that exit, cancel themselves or hang;
signals that merge."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import broker
from broker.workers import list_workers
from tests.cli.test_workers import events, start, stop, until

HERE = "tests.cli.test_workers_edges"


async def exits(msg: broker.Message[Any]) -> None:
    """A handler that calls sys.exit() (a library doing so, a copied CLI entry point)."""
    raise SystemExit(0)


async def cancels_itself(msg: broker.Message[Any]) -> None:
    """A handler awaiting a helper task that someone else cancelled (not the grace period)."""
    helper = asyncio.ensure_future(asyncio.sleep(10))
    asyncio.get_running_loop().call_later(0.01, helper.cancel)
    await helper


async def ignores_cancel(msg: broker.Message[Any]) -> None:
    """A handler that swallows cancellation (a broad ``except BaseException`` in user code)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            pass


async def slow(msg: broker.Message[Any]) -> None:
    await asyncio.sleep(30)


async def _run(
    client: broker.Broker, name: str, namespace: str, url: str, handler: str, *extra: str
) -> Any:
    await client.channel(name).publish({"n": 1})
    return await start(
        url,
        namespace,
        "worker",
        f"{HERE}:{handler}",
        "--channel",
        name,
        "--group",
        "g",
        "--start",
        "all",
        "--heartbeat",
        "0.3",
        "--max-deliveries",
        "2",
        *extra,
    )


async def _running(client: broker.Broker, slots: int = 1) -> None:
    async def check() -> bool:
        rows = await list_workers(client)
        return sum(r.state == "running" and r.in_flight > 0 for r in rows) >= slots

    await until(check, "the handlers to run")


async def test_a_handler_raising_system_exit_does_not_end_the_worker_as_done(
    client: broker.Broker, name: str, namespace: str, redis_url: str
) -> None:
    proc = await _run(client, name, namespace, redis_url, "exits")
    try:
        try:
            await asyncio.wait_for(proc.wait(), 6)
        except TimeoutError:
            pass
        still_up = proc.returncode is None
    finally:
        done = await stop(proc, signal.SIGTERM)
    # nothing asked it to stop: it must not report "every slot is done" with status 0 while
    # the message is still pending (compose `restart: on-failure` would leave it down)
    assert still_up, (done.code, done.err)


async def test_a_handler_cancelling_itself_is_a_failure_not_a_grace_cancel(
    client: broker.Broker, name: str, namespace: str, redis_url: str
) -> None:
    proc = await _run(client, name, namespace, redis_url, "cancels_itself")
    rows: list[Any] = []
    try:
        async with asyncio.timeout(8):
            while not rows or not rows[0].failed:
                if proc.returncode is not None:
                    break
                await asyncio.sleep(0.1)
                rows = await list_workers(client)
        still_up = proc.returncode is None
    except TimeoutError:
        still_up = proc.returncode is None
    finally:
        done = await stop(proc, signal.SIGTERM)
    assert still_up, ("the slot ended by itself", done.code, done.err)
    assert rows and rows[0].failed >= 1, ("heartbeat failed count", rows, done.err)
    assert "handler_failed" in done.err, done.err
    assert "cancelled=0" in done.err, "no grace period ran out, yet it reports cancelled handlers"


async def test_a_handler_that_ignores_cancellation_ends_with_grace_expired_not_a_kill(
    client: broker.Broker, name: str, namespace: str, redis_url: str
) -> None:
    proc = await _run(
        client,
        name,
        namespace,
        redis_url,
        "ignores_cancel",
        "--grace",
        "0.5",
        "--log-format",
        "json",
    )
    started = time.monotonic()
    await _running(client)
    done = await stop(proc, signal.SIGTERM)
    took = time.monotonic() - started
    # grace 0.5 s + the 10 s close deadline, then the slot ends itself with status 3 rather
    # than hanging until the supervisor's SIGKILL (which made the command exit 1)
    assert done.code == 3, (done.code, done.err[-2000:])
    assert "stuck" in [e["event"] for e in events(done.err)]
    assert took < 25, took
    pending = await client.channel(name).pending("g")
    assert len(pending) == 1  # never acked: delivered again


async def test_a_double_sigterm_forces_every_slot_out_fast(
    client: broker.Broker, name: str, namespace: str, redis_url: str
) -> None:
    await client.channel(name).publish_many([{"n": i} for i in range(20)])
    proc = await _run(
        client, name, namespace, redis_url, "slow", "-p", "3", "-c", "2", "--grace", "60"
    )
    await _running(client, slots=3)
    started = time.monotonic()
    # close together (not so close that the supervisor itself sees one): it forwards both, the
    # second as SIGINT, since two SIGTERMs to a child can merge into one pending signal
    proc.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.05)
    done = await stop(proc, signal.SIGTERM)
    took = time.monotonic() - started
    assert done.code == 143, (done.code, done.err[-2000:])
    assert "child_killed" not in done.err, done.err[-2000:]
    assert took < 4, took
