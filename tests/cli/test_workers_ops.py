"""`broker worker` as operators expect it: handlers from the current folder, RSS in the
heartbeat, blocked slots shown stale."""

from __future__ import annotations

import asyncio
import json
import pathlib
import sys
import textwrap
from typing import Any

import broker
from broker.workers import list_workers
from tests.cli.conftest import ENV
from tests.cli.test_workers import start, stop, until
from tests.conftest import compare_ids

H = "tests.helpers.handlers"


def console_script() -> str:
    """The installed ``broker`` command (not ``python -m``, which puts the folder on the path
    by itself)."""
    path = pathlib.Path(sys.executable).parent / "broker"
    assert path.exists(), f"the console script is not installed next to {sys.executable}"
    return str(path)


async def test_handlers_are_imported_from_the_current_folder(
    client: broker.Broker, name: str, namespace: str, redis_url: str, tmp_path: pathlib.Path
) -> None:
    """Like uvicorn, gunicorn, celery and arq. The application's own ``workers`` package is
    the one imported: the runtime is ``broker.workers``, so nothing shadows anything."""
    app = tmp_path / "workers"
    app.mkdir()
    (app / "__init__.py").write_text("")
    (app / "handlers.py").write_text(
        textwrap.dedent(
            """
            import os

            async def handle(msg):
                with open(os.environ["HANDLED"], "a") as f:
                    f.write(msg.id + "\\n")
            """
        )
    )
    handled = tmp_path / "handled.txt"
    handled.touch()
    sent = await client.channel(name).publish_many(range(5))
    env = {**ENV, "HANDLED": str(handled), "PYTHONSAFEPATH": "1"}  # no implicit '' on the path
    proc = await asyncio.create_subprocess_exec(
        console_script(),
        "--url",
        redis_url,
        "--namespace",
        namespace,
        "worker",
        "workers.handlers:handle",
        "--channel",
        name,
        "--group",
        "g",
        "--start",
        "all",
        "-p",
        "2",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,
        env=env,
    )
    try:

        async def all_handled() -> bool:
            return len(handled.read_text().split()) >= len(sent) or proc.returncode is not None

        await until(all_handled, "every message handled")
    finally:
        done = await stop(proc)
    assert done.code == 0, done.err[-2000:]
    compare_ids(sent, handled.read_text().split())


def _worker_args(name: str, target: str, *extra: str) -> list[str]:
    return [
        "worker",
        f"{H}:{target}",
        "--channel",
        name,
        "--group",
        "g",
        "--start",
        "all",
        "--heartbeat",
        "0.3",
        "--log-format",
        "json",
        *extra,
    ]


async def test_a_slot_with_a_blocked_event_loop_is_listed_stale_not_gone(
    client: broker.Broker, name: str, namespace: str, redis_url: str, sh: Any
) -> None:
    proc = await start(
        redis_url,
        namespace,
        *_worker_args(name, "block_loop"),
        env={"BLOCK_SECONDS": "4"},
    )
    try:

        async def running() -> bool:
            return [(w.state, w.alive) for w in await list_workers(client)] == [("running", True)]

        await until(running, "the slot running")
        [before] = await list_workers(client)
        assert before.rss is not None and 10 * 2**20 < before.rss < 2**31, before.rss
        await client.channel(name).publish("block")

        async def stale() -> bool:
            rows = await list_workers(client)
            return len(rows) == 1 and not rows[0].alive and rows[0].age > 1.5

        await until(stale, "the slot listed stale", bound=10)
        table = await sh("workers")
        listed = await sh("workers", "--json")
        await until(running, "the slot alive again once its loop is free", bound=15)
    finally:
        done = await stop(proc)
    assert done.code == 0, done.err[-2000:]
    [row] = json.loads(listed.out)
    assert (row["alive"], row["state"]) == (False, "running"), row
    assert row["age"] > 3 * row["interval"] and row["rss"] > 0
    head, line = table.out.splitlines()
    assert "RSS" in head and "LAST SEEN" in head
    assert " stale " in line and "ago" in line, line
