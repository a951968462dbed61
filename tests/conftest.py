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
from typing import Any

import pytest
import redis.asyncio as aioredis

import broker
from broker import EmbeddedServer, ServerNotFoundError
from broker._server_cluster import EmbeddedCluster

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


@pytest.fixture(scope="session")
def cluster() -> Iterator[EmbeddedCluster]:
    """A Redis Cluster of 3 primaries and 3 replicas, started from the suite's server binary
    (PATH or the embedded one) on loopback, for the session; stopped even when a test fails."""
    try:
        with EmbeddedCluster(masters=3, replicas=1, node_timeout=2000) as c:
            _SERVER_NOTE.append(f"a cluster of 6 {c.nodes[0].binary}")
            yield c
    except ServerNotFoundError as exc:
        pytest.fail(f"no server binary for the cluster: {exc}", pytrace=False)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module that sets ``SERVERS = ("single", "cluster")`` runs each of its tests that use
    a server (the ``server``, ``client`` or ``raw`` fixtures) on each kind."""
    kinds = getattr(metafunc.module, "SERVERS", None)
    if kinds and "server" in metafunc.fixturenames:
        metafunc.parametrize("server", kinds, indirect=True)


@pytest.fixture
def server(request: pytest.FixtureRequest, redis_url: str) -> str:
    """The URL a test runs against: the single server, or the cluster (see ``SERVERS``)."""
    kind = getattr(request, "param", "single")
    if kind == "cluster":
        return str(request.getfixturevalue("cluster").url)
    return redis_url


@pytest.fixture
async def client(server: str, namespace: str) -> AsyncIterator[broker.Broker]:
    async with broker.connect(server, namespace=namespace, reconnect_deadline=10) as b:
        yield b


def raw_client(url: str) -> Any:
    """A plain redis-py client for ``url`` (a ``RedisCluster`` for a cluster URL)."""
    if url.startswith("redis+cluster://"):
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        hosts = url.split("://", 1)[1].split("/")[0].split(",")
        nodes = [ClusterNode(h.rsplit(":", 1)[0], int(h.rsplit(":", 1)[1])) for h in hosts]
        return RedisCluster(startup_nodes=nodes)
    return aioredis.Redis.from_url(url)


@pytest.fixture
async def raw(server: str) -> AsyncIterator[aioredis.Redis]:
    """A plain redis-py client, for checking the server's side (a cluster client on a cluster)."""
    r = raw_client(server)
    if hasattr(r, "nodes_manager"):
        await r.initialize()  # the slot map, for get_node_from_key
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
