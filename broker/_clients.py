"""redis-py clients for what a URL points at: one server (``Redis``), a Redis Cluster
(``RedisCluster``, also when a plain ``redis://`` URL reaches a node in cluster mode) or the
master of a Sentinel service (redis-py's asyncio ``Sentinel``: every new connection asks the
sentinels where the master is, so a reconnect after a failover reaches the new one).

Every client is made the same way: bytes replies, the connect timeout, a socket timeout that
only catches dead peers, and no retries of redis-py's own (reconnecting is the library's job:
after a reconnect, subscriptions replay their pending entries).
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.backoff import NoBackoff

from ._settings import Endpoint, Settings

__all__ = ["EpochSentinel", "client_options", "cluster_client", "sentinel_client", "single_client"]

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
    the application); the sentinels are asked with ``?sentinel_password=`` (and
    ``sentinel_username=``) when given, else without a password. ``rediss+sentinel://`` is
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
    if endpoint.sentinel_password is not None:
        watch["password"] = endpoint.sentinel_password
        if endpoint.sentinel_username is not None:
            watch["username"] = endpoint.sentinel_username
    sentinel = EpochSentinel(endpoint.hosts, sentinel_kwargs=watch)
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


class EpochSentinel(Sentinel):
    """redis-py's ``Sentinel``, asking every sentinel where the master is and believing the
    newest configuration (the highest ``config-epoch``) among the first majority to answer.

    redis-py believes the first sentinel that names a master it does not think is down. A
    sentinel that has not yet heard of a failover names the old master, and once that node is
    started again (empty, and a master until the sentinels make it a replica) it is not down:
    every connection then went to the empty old master, whose writes are lost when it becomes a
    replica. Every failover raises the epoch, so the newest answer names the promoted node.
    Waiting for a majority, not for all, keeps one silent sentinel from slowing every connect.
    """

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        errors: list[str] = []
        refused: list[str] = []  # sentinels that want (other) credentials
        found: list[tuple[int, str, int]] = []
        need = len(self.sentinels) // 2 + 1

        async def ask(sentinel: Any) -> None:
            try:
                masters = await sentinel.sentinel_masters()
            except rex.AuthenticationError as exc:
                refused.append(f"{_address(sentinel)}: {exc}")
                errors.append(refused[-1])
                return
            except (OSError, rex.ConnectionError, rex.TimeoutError, rex.ResponseError) as exc:
                errors.append(f"{sentinel}: {type(exc).__name__}: {exc}")
                return
            state = masters.get(service_name)
            if state and self.check_master_state(state, service_name):
                found.append((int(state.get("config-epoch", 0)), state["ip"], int(state["port"])))
            else:
                errors.append(f"{sentinel}: no master for {service_name!r}")

        pending = {asyncio.ensure_future(ask(s)) for s in self.sentinels}
        try:
            while pending and len(found) + len(errors) < need:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            while pending and not found:  # no answer named a master yet: the others may
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        if not found and refused:
            raise rex.AuthenticationError(
                f"the sentinels refused to answer ({', '.join(refused)}): give their own "
                "password as ?sentinel_password=... (and ?sentinel_username=... for an ACL "
                "user) in the URL; the URL's user and password are the data nodes'"
            )
        if not found:
            raise MasterNotFoundError(f"No master found for {service_name!r}: {', '.join(errors)}")
        _, ip, port = max(found)
        if self._force_master_ip is not None:
            ip = self._force_master_ip
        return ip, port


def _address(client: Any) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host')}:{kwargs.get('port')}"
