"""broker worker / workers, as real processes against the real server."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

import pytest

import broker
from broker.workers import list_workers
from tests.cli.conftest import ENV, ROOT, TIMEOUT, Done, argv, assert_clean, finish
from tests.conftest import compare_ids

H = "tests.helpers.handlers"


async def start(
    url: str, namespace: str, *args: str, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *argv(url, namespace, *args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**ENV, **(env or {})},
    )


async def until(check: Any, what: str, bound: float = TIMEOUT) -> None:
    async with asyncio.timeout(bound):
        while not await check():
            await asyncio.sleep(0.05)


async def stop(proc: asyncio.subprocess.Process, *sigs: int) -> Done:
    """Send ``sigs`` (default one SIGTERM) and collect the exit; kills it on a timeout."""
    try:
        for sig in sigs or (signal.SIGTERM,):
            if proc.returncode is None:
                proc.send_signal(sig)
            await asyncio.sleep(0)
        return await finish(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def events(err: str) -> list[dict[str, Any]]:
    """Every stderr line must be one JSON object with ts, level and event."""
    out = [json.loads(line) for line in err.splitlines()]
    assert all({"ts", "level", "event"} <= set(e) for e in out), out
    return out


async def test_consumer_runs_lists_checks_logs_json_and_stops_on_sigterm(
    client: broker.Broker, name: str, namespace: str, redis_url: str, sh, raw
) -> None:
    ch = client.channel(name)
    sent = await ch.publish_many({"n": i} for i in range(10))
    proc = await start(
        redis_url,
        namespace,
        "worker",
        "broker.workers.examples:print_message",
        "--channel",
        name,
        "--group",
        "printers",
        "--start",
        "all",
        "-p",
        "2",
        "-c",
        "2",
        "--name",
        "printer",
        "--heartbeat",
        "0.3",
        "--log-format",
        "json",
    )
    try:

        async def counted() -> bool:
            rows = await list_workers(client)
            return len(rows) == 2 and sum(r.processed for r in rows) == 10

        await until(counted, "both slots reporting 10 processed")
        listed = await sh("workers", "--json")
        table = await sh("workers")
        healthy = await sh("worker", "--check", "--name", "printer")
        other = await sh("worker", "--check", "--name", "nobody")
    finally:
        done = await stop(proc)
    rows = json.loads(listed.out)  # one JSON array, like `broker channels --json`
    assert sorted(r["slot"] for r in rows) == [0, 1]
    for r in rows:
        assert r["name"] == "printer" and r["alive"] and r["state"] == "running"
        assert (r["channels"], r["group"], r["kind"]) == ([name], "printers", "consume")
        assert r["host"] and r["pid"] > 0 and r["started"] > 0
        assert r["failed"] == 0 and r["in_flight"] == 0
    assert "printer/" in table.out and "running" in table.out and "IN FLIGHT" in table.out
    assert healthy.code == 0 and healthy.out.startswith("healthy: 2 slot(s) of printer")
    assert other.code == 1 and other.err.startswith("error: unhealthy: no worker 'nobody'")
    assert len(other.err.splitlines()) == 1
    assert done.code == 0, done.err
    assert_clean(done.err)
    printed = [line.split()[1] for line in done.out.splitlines() if line.startswith(name)]
    compare_ids(sent, printed)
    log = events(done.err)
    kinds = [(e["event"], e.get("role", "slot")) for e in log]
    for expected in [
        ("starting", "supervisor"),
        ("child_started", "supervisor"),
        ("ready", "slot"),
        ("stopping", "supervisor"),
        ("stopping", "slot"),
        ("stopped", "slot"),
        ("stopped", "supervisor"),
    ]:
        assert expected in kinds, (expected, kinds)
    assert [e["processed"] for e in log if e["event"] == "stopped" and "role" not in e]
    none = await sh("workers", "--json")
    assert (none.code, json.loads(none.out)) == (0, []), "an empty array, not nothing"
    gone = await sh("worker", "--check", "--name", "printer")
    assert gone.code == 1 and "unhealthy" in gone.err


async def test_example_producer_and_consumer_pass_every_order(
    client: broker.Broker, name: str, namespace: str, redis_url: str, raw
) -> None:
    producer = await start(
        redis_url,
        namespace,
        "worker",
        "broker.workers.examples:orders",
        "--channel",
        name,
        env={"ORDERS_COUNT": "25", "ORDERS_RATE": "0"},
    )
    made = await finish(producer)
    assert made.code == 0, made.err
    assert 'stopped reason="producer finished" processed=25' in made.err
    async with client.channel(name).tail(start="beginning", follow=False) as tail:
        orders = [m.data["order_id"] async for m in tail]
    assert len(set(orders)) == 25
    consumer = await start(
        redis_url,
        namespace,
        "worker",
        "broker.workers.examples:process_order",
        "--channel",
        name,
        "--group",
        "billing",
        "--start",
        "all",
        "-c",
        "4",
        env={"PROCESS_MS": "1"},
    )
    ch = client.channel(name)
    try:

        async def drained() -> bool:
            info = await ch.info()
            return bool(info.groups) and info.groups[0].lag == 0 and info.groups[0].pending == 0

        await until(drained, "the group drained")
    finally:
        done = await stop(consumer)
    assert done.code == 0, done.err
    assert_clean(done.err)
    processed = [line.split()[2] for line in done.out.splitlines()]
    compare_ids(orders, processed)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([f"{H}:record", "--channel", "x"], "is a consumer (async def handler(msg)): it needs"),
        ([f"{H}:numbers", "--channel", "a", "--channel", "b"], "exactly one --channel, got 2"),
        ([f"{H}:numbers", "--channel", "a", "--group", "g"], "--group is for consumers"),
        ([f"{H}:ticker", "--channel", "a", "-c", "4"], "--concurrency is for consumers"),
        ([f"{H}:not_async", "--channel", "a"], "is not async: a consumer is"),
        ([f"{H}:no_args", "--channel", "a"], "cannot tell what"),
        ([f"{H}:record", "--group", "g"], "give at least one --channel"),
        ([], "missing MODULE:HANDLER"),
        (["no.such.module:fn", "--channel", "a", "-g", "g"], "cannot load 'no.such.module:fn'"),
        (
            ["tests.helpers.broken_at_import:fn", "--channel", "a", "-g", "g"],
            "importing it raised RuntimeError: this module fails at import",
        ),
        ([f"{H}:record", "--channel", "a b", "-g", "g"], "invalid channel name"),
        (
            [f"{H}:record", "--channel", "a", "-g", "g", "--stop-token", "a b"],
            "invalid stop token name 'a b'",
        ),
        ([f"{H}:record", "--channel", "a", "-g", "g", "--log-format", "xml"], "'xml' is not"),
    ],
)
async def test_usage_errors_are_one_line_with_status_2(invoke, args, message) -> None:
    result = await invoke("worker", *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


async def test_grace_expiry_exits_3_and_a_second_signal_forces_143(
    client: broker.Broker, name: str, namespace: str, redis_url: str, raw
) -> None:
    ch = client.channel(name)
    stuck = await ch.publish("stuck")

    async def run(*extra: str) -> asyncio.subprocess.Process:
        proc = await start(
            redis_url,
            namespace,
            "worker",
            f"{H}:hang",
            "--channel",
            name,
            "--group",
            "g",
            "--start",
            "all",
            "--heartbeat",
            "0.3",
            *extra,
        )

        async def handling() -> bool:
            rows = await list_workers(client)
            return [r.in_flight for r in rows] == [1]

        try:
            await until(handling, "the handler running")
        except BaseException:
            await stop(proc, signal.SIGKILL)
            raise
        return proc

    expired = await stop(await run("--grace", "0.2"))
    assert expired.code == 3, expired.err
    assert "grace_expired" in expired.err and "exit=3" in expired.err
    assert_clean(expired.err)

    proc = await run("--grace", "60")
    try:

        async def stopping() -> bool:
            return [r.state for r in await list_workers(client)] == ["stopping"]

        proc.send_signal(signal.SIGTERM)
        await until(stopping, "the slot stopping")
    finally:
        forced = await stop(proc, signal.SIGTERM)
    assert forced.code == 143, forced.err
    assert "forced" in forced.err
    assert_clean(forced.err)
    pending = await ch.pending("g")
    assert [(p.id, p.deliveries) for p in pending] == [(stuck, 2)], "never acked"
    assert await list_workers(client) == []


async def test_stop_token_option_stops_the_worker(
    client: broker.Broker, name: str, namespace: str, redis_url: str, sh
) -> None:
    proc = await start(
        redis_url,
        namespace,
        "worker",
        f"{H}:ticker",
        "--channel",
        name,
        "--stop-token",
        "release-9",
        "--heartbeat",
        "0.3",
    )
    try:

        async def running() -> bool:
            return [r.state for r in await list_workers(client)] == ["running"]

        await until(running, "the producer running")
        fired = await sh("stop", "release-9", "--reason", "rollback")
        assert fired.code == 0, fired.err
        done = await finish(proc)
    finally:
        if proc.returncode is None:
            await stop(proc, signal.SIGKILL)
    assert done.code == 0, done.err
    assert "stopping reason=\"stop token 'release-9': rollback\"" in done.err
    assert_clean(done.err)
    assert (await client.channel(name).info()).length > 0
    assert await list_workers(client) == [], "no heartbeat left behind"


async def test_workers_json_with_no_workers_prints_an_empty_array(invoke) -> None:
    result = await invoke("workers", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == []
    table = await invoke("workers")
    assert table.exit_code == 0 and table.stdout == ""
    assert "no workers" in table.stderr
