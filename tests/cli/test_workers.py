"""broker worker / workers / bench, as real processes against the real server."""

from __future__ import annotations

import asyncio
import json
import signal

import broker
from tests.cli.conftest import argv, assert_clean, finish, spawn
from tests.conftest import compare_ids


async def test_worker_consume_runs_lists_and_stops_on_sigterm(
    client: broker.Broker, name: str, namespace: str, redis_url: str, sh, raw
) -> None:
    ch = client.channel(name)
    sent = await ch.publish_many({"n": i} for i in range(10))
    proc = await spawn(
        *argv(
            redis_url,
            namespace,
            "worker",
            "consume",
            name,
            "-g",
            "printers",
            "--start",
            "all",
            "--handler",
            "workers.examples:print_message",
            "-p",
            "2",
            "-c",
            "2",
            "--name",
            "printer",
        )
    )
    try:
        async with asyncio.timeout(30):
            while (
                (await ch.info()).groups == []
                or (await ch.lag("printers")) > 0
                or (await raw.xpending(ch.key, "printers"))["pending"] > 0
            ):
                await asyncio.sleep(0.1)
            while True:
                listed = await sh("workers", "--json")
                rows = [json.loads(line) for line in listed.out.splitlines()]
                if len(rows) == 2 and sum(r["processed"] for r in rows) == 10:
                    break  # heartbeats carry the counts, every 2 s
                await asyncio.sleep(0.1)
        assert {r["name"] for r in rows} == {"printer"} and all(r["alive"] for r in rows)
        table = await sh("workers")
        assert "printer/" in table.out and "running" in table.out
    finally:
        proc.send_signal(signal.SIGTERM)
        done = await finish(proc)
    assert done.code == 0, done.err
    assert_clean(done.err)
    printed = [line.split()[1] for line in done.out.splitlines() if line.startswith(name)]
    compare_ids(sent, printed)
    assert (await sh("workers", "--json")).out.strip() == ""


async def test_worker_bad_handler_is_one_line(sh, name: str) -> None:
    done = await sh("worker", "consume", name, "-g", "g", "--handler", "no.such.module:fn")
    assert done.code == 2 and "cannot load 'no.such.module:fn'" in done.err
    assert_clean(done.err)
