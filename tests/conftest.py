"""Shared fixtures: the project's tests use the plugin shipped with the package.

``broker/pytest_plugin.py`` (entry point ``pytest11``) provides ``broker_url`` (one real server
per session: ``$BROKER_TEST_URL``, else a private local server, else a ``redis:7.0`` container),
``broker_namespace`` and ``broker_client``. ``redis_url`` and ``namespace`` below are thin
aliases kept for the tests written against them; this file adds the cluster, the ``server``
parametrization, ``client`` (on either kind, keys deleted after) and the leak check every test
of the project gets.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

import broker
from broker import ServerNotFoundError
from broker._server_cluster import EmbeddedCluster
from broker.pytest_plugin import _SERVER_NOTE
from broker.testing import isolated

# Hypothesis' pytest plugin imports the package lazily, in its terminal summary hook, deep in
# pytest's stack and late in the run. On Debian 12's CPython 3.11.2 (the compose ``tests``
# service) compiling it there once failed with "SystemError: AST constructor recursion depth
# mismatch" (a CPython 3.11 bug: python/cpython#106905, pytest-dev/pytest#10763), turning a
# green run into exit 1. Imported here, early and shallow, it is compiled at collection.
try:
    import hypothesis  # noqa: F401
except ImportError:  # the fuzz tier's dependency: absent, nothing to import early
    pass


@pytest.fixture(scope="session")
def redis_url(broker_url: str) -> str:
    return broker_url


@pytest.fixture
def namespace(broker_namespace: str) -> str:
    return broker_namespace


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
    """``broker_client`` on ``server`` (the single server or the cluster; tests/multihost
    points ``redis_url`` at its own): a fresh namespace, whose keys are deleted after."""
    async with isolated(server, namespace) as b:
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
