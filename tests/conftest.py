"""Shared fixtures: one real server per session, a fresh namespace per test, leak checks.

The server is, in order:

1. ``$BROKER_TEST_URL``, when set (any server: a compose service, a cloud instance);
2. a private local server: ``$BROKER_REDIS_SERVER``, else ``redis-server`` on PATH, else the
   embedded one (the ``server`` extra). It needs no image pull and starts in milliseconds;
3. a Docker container (``redis:7.0``, through testcontainers) when no local server can be had,
   or when asked with ``BROKER_TEST_DOCKER=1``.

A missing server fails the run with a message; no test skips for want of one.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

import broker
from broker import EmbeddedServer, ServerNotFoundError

#: what the session's server is, for the report header
_SERVER_NOTE: list[str] = []


def _docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _redis_container(image: str = "redis:7.0") -> object:
    try:
        from testcontainers.community.redis import RedisContainer
    except ImportError:  # testcontainers < 4.15 has it at the old place only
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from testcontainers.redis import RedisContainer
    return RedisContainer(image)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    explicit = os.environ.get("BROKER_TEST_URL")
    if explicit:
        _SERVER_NOTE.append("BROKER_TEST_URL")
        yield explicit
        return
    want_docker = os.environ.get("BROKER_TEST_DOCKER", "") not in ("", "0")
    if not want_docker:
        try:
            server = EmbeddedServer()
        except ServerNotFoundError as exc:
            if not _docker_answers():
                pytest.fail(f"no Redis server for the tests: {exc}", pytrace=False)
            _SERVER_NOTE.append(f"no local server ({exc}); using a container")
        else:
            _SERVER_NOTE.append(f"local {server.binary}")
            with server:
                yield server.url
            return
    if not _docker_answers():
        pytest.fail("BROKER_TEST_DOCKER=1 but no Docker engine answers", pytrace=False)
    with _redis_container() as container:  # type: ignore[attr-defined]
        _SERVER_NOTE.append("a redis:7.0 container")
        host = container.get_container_host_ip()
        port = container.get_exposed_port(6379)
        yield f"redis://{host}:{port}/0"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _SERVER_NOTE:
        terminalreporter.write_line(f"broker tests ran on: {'; '.join(_SERVER_NOTE)}")


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
