"""``broker server`` in the foreground, ``broker demo``, and ``python -m broker.cli``."""

from __future__ import annotations

import asyncio
import socket
import sys

import redis.asyncio as aioredis

from .conftest import ENV, ROOT, assert_clean, interrupt, spawn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_server_runs_until_ctrl_c():
    port = free_port()
    proc = await spawn(sys.executable, "-m", "cli", "server", "--port", str(port))
    try:
        assert proc.stdout is not None
        url = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode().strip()
        assert url == f"redis://127.0.0.1:{port}/0"
        r = aioredis.Redis.from_url(url)
        try:
            assert await r.ping()
        finally:
            await r.aclose()
        done = await interrupt(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert done.code == 0, done.err
    assert_clean(done.err)
    with socket.socket() as s:  # the redis-server went with it
        assert s.connect_ex(("127.0.0.1", port)) != 0


async def test_server_port_in_use():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = await spawn(sys.executable, "-m", "cli", "server", "--port", str(port))
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1
    assert err.decode().startswith("error: cannot start redis-server") and b"--port" in err
    assert_clean(err.decode())


async def test_demo(redis_url):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "broker.cli.main",
        "--url",
        redis_url,
        "demo",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env=ENV,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err
    assert b"30/30 orders delivered" in out
