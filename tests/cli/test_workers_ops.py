"""`broker worker` as operators expect it: handlers from the current folder."""

from __future__ import annotations

import asyncio
import pathlib
import sys
import textwrap

import broker
from tests.cli.conftest import ENV
from tests.cli.test_workers import stop, until
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
