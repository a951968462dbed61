"""redis-py clients for what a URL points at: one server (``Redis``), a Redis Cluster
(``RedisCluster``, also when a plain ``redis://`` URL reaches a node in cluster mode) or the
master of a Sentinel service (redis-py's asyncio ``Sentinel``: every new connection asks the
sentinels where the master is, so a reconnect after a failover reaches the new one).

Every client is made the same way: bytes replies, the connect timeout, a socket timeout that
only catches dead peers, and no retries of redis-py's own (reconnecting is the library's job:
after a reconnect, subscriptions replay their pending entries).
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from ._settings import Endpoint, Settings

__all__ = ["client_options", "cluster_client", "sentinel_client", "single_client"]

CLIENT_NAME = "broker-py"


def client_options(settings: Settings) -> dict[str, Any]:
    """The options every client of the library shares."""
    options: dict[str, Any] = {
        "decode_responses": False,
        "socket_connect_timeout": settings.connect_timeout,
        # a dead peer must not hang a read forever; blocking reads stay far below this
        "socket_timeout": settings.stall_timeout,
        "health_check_interval": 15,
        # reconnects are ours: after one, subscriptions replay their pending entries
        "retry": Retry(NoBackoff(), 0),
        "client_name": CLIENT_NAME,
    }
    if not settings.url.startswith("unix:"):
        options["socket_keepalive"] = True
    return options


def single_client(settings: Settings, url: str | None = None) -> Any:
    """A client of one server (``url`` defaults to the settings' URL)."""
    return aioredis.Redis.from_url(url or settings.url, **client_options(settings))


async def cluster_client(settings: Settings, seeds: list[tuple[str, int]], node_url: str) -> Any:
    """A cluster client that knows the slot map (``initialize`` has run).

    ``node_url`` carries the user, password, TLS and query options, which every node shares.
    """
    options = client_options(settings)
    client = RedisCluster.from_url(
        node_url,
        startup_nodes=[ClusterNode(host, port) for host, port in seeds],
        # the slot map is refreshed by the library on MOVED; redis-py refreshes too on errors
        **options,
    )
    try:
        await client.initialize()
    except BaseException:
        await client.aclose()
        raise
    return client


async def sentinel_client(settings: Settings, endpoint: Endpoint) -> Any:
    """A client of the master of ``endpoint.service``, found through the sentinels of
    ``endpoint.hosts`` (the client's ``connection_pool.sentinel_manager`` is the ``Sentinel``:
    close it after the client).

    The URL's user, password, database and query options are the data nodes' (the ACL user of
    the application); the sentinels are asked without a password. ``rediss+sentinel://`` is
    TLS to both, with the URL's ``ssl_*`` options.
    """
    options = client_options(settings)
    node: dict[str, Any] = dict(parse_url(endpoint.node_url))
    del node["host"], node["port"]
    node["db"] = endpoint.db
    tls = node.pop("connection_class", None) is SSLConnection
    ssl = {k: v for k, v in node.items() if k.startswith("ssl_")}
    if tls:
        node["ssl"] = True  # SentinelConnectionPool picks its TLS connection class on this
    watch: dict[str, Any] = {
        "socket_connect_timeout": settings.connect_timeout,
        # a sentinel answers at once: a silent one is skipped for the next in the list
        "socket_timeout": settings.connect_timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if tls:
        watch.update(ssl, ssl=True)
    sentinel = Sentinel(endpoint.hosts, sentinel_kwargs=watch)  # type: ignore[no-untyped-call]
    assert endpoint.service is not None
    client = sentinel.master_for(
        endpoint.service, redis_class=aioredis.Redis, **{**options, **node}
    )
    try:
        # the first connection asks the sentinels: an unknown service fails here, at connect
        await client.ping()
    except BaseException:
        await client.aclose()
        await sentinel.aclose()
        raise
    return client
